"""Evaluate a checkpoint on a config's validation data, on every XLA device of this host or, through
accelerate, on every process of an `accelerate launch` / torchrun job (or one GPU / CPU process).

    python launch/evaluate.py --config configs/kan_s16.yaml --checkpoint runs/kan-s16/best.pth
    accelerate launch launch/evaluate.py --config configs/kan_s16.yaml --checkpoint runs/kan-s16/best.pth

--backend auto (the default) picks accelerate when started by accelerate launch / torchrun or when
torch_xla is not installed, else XLA. The checkpoint may be a trainer checkpoint from either backend
(last.pth / best.pth), a .safetensors / .pth state dict, or an original `.msgpack`; a learnable
position embedding is resized to model.image_size. Prints val/acc1, val/acc5, val/loss and the
exact number of images evaluated.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from kan_vit import backend
from kan_vit.config import ConfigError, from_dict, launcher_parser, load, to_dict
from kan_vit.data import create_valid_loader
from kan_vit.pretrained import load_weights
from kan_vit.train import build_model, evaluate, load_checked_config, spawn


def _model(cfg, checkpoint: str):
    """The configured model with the checkpoint's weights (its head must fit model.labels)."""
    model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_ckpt=None)))
    load_weights(model, checkpoint, new_head=False)
    return model


def evaluate_checkpoint(cfg, checkpoint: str) -> None:
    """In every process: its share of the validation set; the first process prints the metrics."""
    b = backend.current()
    model = _model(cfg, checkpoint).to(b.device)
    loader, _ = create_valid_loader(cfg, world_size=b.world_size, rank=b.rank, local_replicas=b.local_process_count)
    metrics = evaluate(model, b.device_loader(loader), cfg)
    if b.rank == 0:
        print(json.dumps({"checkpoint": checkpoint, **metrics}), flush=True)


def _mp_fn(index: int, cfg_dict: dict, checkpoint: str) -> None:
    evaluate_checkpoint(from_dict(cfg_dict), checkpoint)


def _detect_backend() -> str:
    if "LOCAL_RANK" in os.environ:  # set by accelerate launch and torchrun
        return backend.ACCELERATE
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return backend.ACCELERATE
    return backend.XLA


def main(argv=None) -> int:
    parser = launcher_parser(__doc__, "the training config (model and validation data)")
    parser.add_argument("--checkpoint", required=True, help="trainer checkpoint, .safetensors, .pth or .msgpack")
    parser.add_argument("--backend", choices=("auto", backend.XLA, backend.ACCELERATE), default="auto",
                        help="where to run (default: auto, see above)")
    args = parser.parse_args(argv)
    name = _detect_backend() if args.backend == "auto" else args.backend
    try:
        if name == backend.ACCELERATE:
            backend.use(backend.AccelerateBackend(bf16=load(args.config, args.set).run.bf16))
        cfg = load_checked_config(args.config, args.set)
        _model(cfg, args.checkpoint)  # a checkpoint that does not fit fails here, before spawning
    except (ConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    if name == backend.ACCELERATE:
        evaluate_checkpoint(cfg, args.checkpoint)
    else:
        spawn(_mp_fn, (to_dict(cfg), args.checkpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
