"""Train KAN-ViT / DeiT on every XLA device of this host (run it on every host of a TPU pod).

    python launch/train_tpu.py --config configs/kan_s16.yaml [--set section.key=value ...]

The whole config (keys, values, combinations, datasets) is checked before any process starts;
a problem prints one line and exits with status 2. Rerunning the same command resumes from
run.output_dir/last.pth (run.resume: auto | never | PATH).
"""
from __future__ import annotations

import sys

import yaml

from kan_vit.config import ConfigError, launcher_parser, to_dict
from kan_vit.train import DivergenceError, check_resume, expected_world_size, launch, load_checked_config


def main(argv=None) -> int:
    args = launcher_parser(__doc__, "YAML config (sections data, augment, model, optim, schedule, run)").parse_args(argv)
    try:
        cfg = load_checked_config(args.config, args.set)
        check_resume(cfg, expected_world_size())
    except (ConfigError, ValueError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
    try:
        launch(cfg)
    except DivergenceError as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
