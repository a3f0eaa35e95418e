"""Fine-tuning starts: load any checkpoint into a configured model (docs/original.md, "Fine-tuning").

Accepted files: our trainer checkpoints and `.pth` state dicts (a "model" entry or a plain state
dict), `.safetensors` (the converter's output), and the original's `.msgpack` (converted on the
fly, no JAX). A learnable position embedding is resized bicubically when the grid differs; the
head is re-initialised when missing or of another shape, unless a label mapping builds it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .checkpoint import read_torch_checkpoint
from .flax_layout import flax_to_timm
from .flax_msgpack import load as load_msgpack
from .vision_transformer import checkpoint_filter_fn

_logger = logging.getLogger(__name__)

LABEL_MAPPING_OTHER_BIAS = -10.0  # the original's bias for classes the mapping does not fill


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A PyTorch state dict from any supported checkpoint file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check model.pretrained_ckpt")
    if path.suffix == ".msgpack":
        state_dict, _, _ = flax_to_timm(load_msgpack(path))  # weights do not depend on image size
        return state_dict
    return read_torch_checkpoint(path)[0]


def read_label_mapping(path: str | Path) -> tuple[list[int], list[int]]:
    """The original's label-mapping JSON: {"src": [...], "dst": [...]} of equal length."""
    try:
        mapping = json.loads(Path(path).read_text())
        src, dst = [int(i) for i in mapping["src"]], [int(i) for i in mapping["dst"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f'label mapping {path}: expected a JSON file {{"src": [...], "dst": [...]}} ({e})') from e
    if len(src) != len(dst):
        raise ValueError(f"label mapping {path}: src has {len(src)} entries, dst {len(dst)}")
    return src, dst


def map_head(state_dict: dict, model: torch.nn.Module, src: list[int], dst: list[int]) -> dict:
    """Head rows/biases copied src -> dst; other rows 0, other biases -10 (the original's rule)."""
    if "head.weight" not in state_dict:
        raise ValueError("a label mapping needs a checkpoint with a classification head; it has none")
    if not isinstance(model.head, torch.nn.Linear):
        raise ValueError("a label mapping needs model.labels set (the model has no head)")
    old_w, old_b = state_dict["head.weight"], state_dict["head.bias"]
    num_classes = model.head.out_features
    for name, ids, limit in (("src", src, old_w.shape[0]), ("dst", dst, num_classes)):
        bad = [i for i in ids if not 0 <= i < limit]
        if bad:
            raise ValueError(f"label mapping {name} ids {bad[:5]} are outside [0, {limit})")
    weight = old_w.new_zeros(num_classes, old_w.shape[1])
    bias = old_b.new_full((num_classes,), LABEL_MAPPING_OTHER_BIAS)
    weight[dst] = old_w[src]
    bias[dst] = old_b[src]
    return {**state_dict, "head.weight": weight, "head.bias": bias}


def load_weights(
    model: torch.nn.Module, path: str | Path, *, label_mapping: str | None = None, new_head: bool = True
) -> None:
    """Load a checkpoint file into `model` (strict, after adapting pos_embed and head).

    `new_head=False` (evaluation) refuses a checkpoint whose head does not fit instead of
    re-initialising it.
    """
    state_dict = read_state_dict(path)
    if label_mapping:
        state_dict = map_head(state_dict, model, *read_label_mapping(label_mapping))
    elif not new_head:
        head = {f"head.{k}": tuple(v.shape) for k, v in model.head.named_parameters()}
        found = {k: tuple(state_dict[k].shape) for k in head if k in state_dict}
        if found != head:
            raise ValueError(
                f"checkpoint {path} has head {found or 'none'}, the configured model needs "
                f"{head or 'none'}: set model.labels to the checkpoint's class count"
            )
    state_dict = checkpoint_filter_fn(state_dict, model)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"checkpoint {path} does not fit the configured model "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]}, shapes {mismatched[:4]}); "
            "make model.* (layers, dim, heads, use_kan, polynomial_degree, posemb, pooling, "
            "layerscale, patch_size) match the checkpoint"
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()})
    _logger.info("loaded weights from %s", path)


def load_pretrained(model: torch.nn.Module, model_cfg) -> None:
    """Initialise `model` from `model_cfg.pretrained_ckpt` (+ `model_cfg.label_mapping`)."""
    load_weights(model, model_cfg.pretrained_ckpt, label_mapping=model_cfg.label_mapping)
