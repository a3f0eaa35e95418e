"""The command-line programs: `kan-vit-train` and `kan-vit-eval` (also `launch/train_tpu.py`,
`launch/train_gpu.py` and `launch/evaluate.py`, which call them).

Both run on torch_xla (every XLA device of this host: TPU chips, or CPU devices in tests) or
through accelerate (every process of an `accelerate launch` / torchrun job, or one GPU / CPU
process). `--backend auto` picks accelerate when started by accelerate launch / torchrun, when a
GPU is present or when torch_xla is not installed, else torch_xla. The whole config (keys,
values, combinations, datasets, the checkpoint to resume) is checked before any process starts;
a problem prints one line and exits with status 2; a diverged run exits with status 3; a run
stopped by SIGTERM / SIGINT exits with 128 + the signal (143 / 130) after writing last.pth
(`kan_vit.training.preemption`).
"""

from __future__ import annotations

import json
import os
import sys

import yaml

from kan_vit.training import backend, preemption
from kan_vit.training.checkpoint import check_resume
from kan_vit.training.config import (
    ACCELERATE,
    XLA,
    Config,
    ConfigError,
    from_dict,
    launcher_parser,
    load,
    to_dict,
    validate,
)
from kan_vit.training.data import check_dataset, create_valid_loader
from kan_vit.training.loop import DivergenceError, evaluate, launch
from kan_vit.training.model_factory import build_model_with_weights

TRAIN_DOC = """Train KAN-ViT / DeiT with the original's recipes.

    kan-vit-train --config configs/kan_s16.yaml [--set section.key=value ...]     # a TPU VM / pod host
    accelerate launch launch/train_gpu.py --config configs/kan_s16.yaml            # GPUs

Rerunning the same command resumes from run.output_dir/last.pth (run.resume: auto | never | PATH).
"""

EVAL_DOC = """Evaluate a checkpoint on a config's validation data: every image exactly once.

    kan-vit-eval --config runs/kan-s16/config.yaml --checkpoint runs/kan-s16/best.pth

The checkpoint may be a trainer checkpoint from either backend (last.pth / best.pth), a
.safetensors / .pth state dict, or an original `.msgpack`; a learnable position embedding is
resized to model.image_size. Prints val/acc1, val/acc5, val/loss and val/count as JSON.
"""

BACKENDS = ("auto", XLA, ACCELERATE)


def detect_backend() -> str:
    if "LOCAL_RANK" in os.environ:  # set by accelerate launch and torchrun
        return ACCELERATE
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return ACCELERATE
    import torch

    return ACCELERATE if torch.cuda.is_available() and "PJRT_DEVICE" not in os.environ else XLA


def _parser(doc: str, config_help: str, backend_name: str | None):
    parser = launcher_parser(doc + (__doc__ if backend_name is None else ""), config_help)
    if backend_name is None:
        parser.add_argument("--backend", choices=BACKENDS, default="auto", help="where to run (default: auto)")
    return parser


def load_checked_config(path: str, overrides: list[str]) -> Config:
    """The launchers' config: loaded, `--set` applied, values, combinations (for the current
    backend) and datasets checked, all before any process is spawned (raises ConfigError / ValueError)."""
    cfg = load(path, overrides)
    validate(cfg, backend.current().expected_world_size(), backend.current().name)
    check_dataset(cfg)
    return cfg


def _use_backend(name: str, config: str, overrides: list[str]) -> None:
    if name == ACCELERATE:  # the accelerator's precision and compilation come from the config
        run = load(config, overrides).run
        backend.use(backend.AccelerateBackend(bf16=run.bf16, compile=run.compile))


def train_main(argv=None, backend_name: str | None = None, doc: str = TRAIN_DOC) -> int:
    """`kan-vit-train`; launchers pass `backend_name` to fix the backend."""
    args = _parser(doc, "YAML config (sections data, augment, model, optim, schedule, run)", backend_name).parse_args(
        argv
    )
    name = backend_name or (detect_backend() if args.backend == "auto" else args.backend)
    try:
        _use_backend(name, args.config, args.set)
        cfg = load_checked_config(args.config, args.set)
        check_resume(cfg, backend.current().expected_world_size())
    except (ConfigError, ValueError) as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    if name == XLA or backend.current().accelerator.is_main_process:  # XLA: before spawning
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), flush=True)
    try:
        launch(cfg)
    except DivergenceError as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 3
    except preemption.Preempted as stop:  # the loop logged it
        return stop.exit_status
    return 0


def _evaluate_replica(index: int, cfg_dict: dict, checkpoint: str) -> None:
    """In every replica: its share of the validation set; the first one prints the metrics."""
    cfg, b = from_dict(cfg_dict), backend.current()
    model = build_model_with_weights(cfg, checkpoint, new_head=False).to(b.device)
    loader, _ = create_valid_loader(cfg, world_size=b.world_size, rank=b.rank, local_replicas=b.local_process_count)
    metrics = evaluate(model, b.device_loader(loader), cfg)
    if b.rank == 0:
        print(json.dumps({"checkpoint": checkpoint, **metrics}), flush=True)


def evaluate_main(argv=None) -> int:
    """`kan-vit-eval`."""
    parser = _parser(EVAL_DOC, "the training config (model and validation data)", None)
    parser.add_argument("--checkpoint", required=True, help="trainer checkpoint, .safetensors, .pth or .msgpack")
    args = parser.parse_args(argv)
    name = detect_backend() if args.backend == "auto" else args.backend
    try:
        _use_backend(name, args.config, args.set)
        cfg = load_checked_config(args.config, args.set)
        # a checkpoint that does not fit fails here, before spawning
        build_model_with_weights(cfg, args.checkpoint, new_head=False)
    except (ConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    backend.current().spawn(_evaluate_replica, (to_dict(cfg), args.checkpoint))
    return 0
