"""Train KAN-ViT / DeiT on GPUs through accelerate (DDP), one process per GPU, on one or many machines.

    accelerate config                                    # once: which GPUs / machines
    accelerate launch launch/train_gpu.py --config configs/kan_s16.yaml [--set section.key=value ...]
    torchrun --standalone --nproc_per_node=2 launch/train_gpu.py --config configs/demo_digits.yaml

The last runs two CPU processes that talk over gloo (the CI test of this path). The trainer, the
config and the checkpoints are those of launch/train_tpu.py; run.bf16 is autocast on the GPU (on
CPU processes, CPU autocast), run.compile torch.compiles the model. The config is checked in
every process before training; a problem prints one line and exits with status 2. Rerunning the
same command resumes from run.output_dir/last.pth (run.resume: auto | never | PATH).
"""
from __future__ import annotations

import sys

import yaml

from kan_vit import backend
from kan_vit.config import ConfigError, launcher_parser, load, to_dict
from kan_vit.train import DivergenceError, check_resume, expected_world_size, load_checked_config, train


def main(argv=None) -> int:
    args = launcher_parser(__doc__, "YAML config (sections data, augment, model, optim, schedule, run)").parse_args(argv)
    try:
        run = load(args.config, args.set).run  # the accelerator's precision and compilation come from it
        backend.use(backend.AccelerateBackend(bf16=run.bf16, compile=run.compile))
        cfg = load_checked_config(args.config, args.set)
        check_resume(cfg, expected_world_size())
    except (ConfigError, ValueError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    accelerator = backend.current().accelerator
    if accelerator.is_main_process:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
    try:
        train(cfg)
    except DivergenceError as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 3
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
