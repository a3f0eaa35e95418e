"""Evaluate a checkpoint on a config's validation data, on every XLA device of this host.

    python launch/evaluate.py --config configs/kan_s16.yaml --checkpoint runs/kan-s16/best.pth

The checkpoint may be a trainer checkpoint (last.pth / best.pth), a .safetensors / .pth state
dict, or an original `.msgpack`; a learnable position embedding is resized to model.image_size.
Prints val/acc1, val/acc5, val/loss and the exact number of images evaluated.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from kan_vit.config import ConfigError, from_dict, to_dict
from kan_vit.pretrained import load_weights
from kan_vit.train import build_model, load_checked_config, spawn


def _model(cfg, checkpoint: str):
    """The configured model with the checkpoint's weights (its head must fit model.labels)."""
    model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained_ckpt=None)))
    load_weights(model, checkpoint, new_head=False)
    return model


def _mp_fn(index: int, cfg_dict: dict, checkpoint: str) -> None:
    import torch_xla
    import torch_xla.distributed.parallel_loader as pl
    import torch_xla.runtime as xr

    from kan_vit.data import create_valid_loader
    from kan_vit.train import LazyStart, evaluate

    cfg = from_dict(cfg_dict)
    device = torch_xla.device()
    model = _model(cfg, checkpoint).to(device)
    loader, _ = create_valid_loader(cfg, world_size=xr.world_size(), rank=xr.global_ordinal(),
                                    local_replicas=xr.local_process_count())
    metrics = evaluate(model, pl.MpDeviceLoader(LazyStart(loader), device), cfg)
    if xr.global_ordinal() == 0:
        print(json.dumps({"checkpoint": checkpoint, **metrics}), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the training config (model and validation data)")
    parser.add_argument("--checkpoint", required=True, help="trainer checkpoint, .safetensors, .pth or .msgpack")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config key; the value is parsed as YAML; repeatable")
    args = parser.parse_args(argv)
    try:
        cfg = load_checked_config(args.config, args.set)
        _model(cfg, args.checkpoint)  # a checkpoint that does not fit fails here, before spawning
    except (ConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    spawn(_mp_fn, (to_dict(cfg), args.checkpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
