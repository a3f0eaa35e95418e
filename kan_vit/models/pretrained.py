"""Fine-tuning starts: load any checkpoint into a configured model (docs/original.md, "Fine-tuning").

Accepted files: our trainer checkpoints and `.pth` state dicts (a "model" entry or a plain state
dict), `.safetensors` (the converter's output), and the original's `.msgpack` (converted on the
fly, no JAX). A learnable position embedding is resized bicubically when the grid differs; the
head is re-initialised when missing or of another shape, unless a label mapping builds it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed

_logger = logging.getLogger(__name__)

LABEL_MAPPING_OTHER_BIAS = -10.0  # the original's bias for classes the mapping does not fill

# Readers of other checkpoint formats, by file suffix: path -> state dict. The flax layer
# registers ".msgpack" (`import kan_vit` imports it), so the model needs no converter of its own.
_FORMAT_READERS: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {}


def register_format(suffix: str, reader: Callable[[Path], dict[str, torch.Tensor]]) -> None:
    """Make `read_state_dict` read files ending in `suffix` with `reader`."""
    _FORMAT_READERS[suffix] = reader


class CheckpointError(ValueError):
    """A file that is not a PyTorch checkpoint; the message names the file and what it holds."""


def read_torch_checkpoint(path: str | Path) -> tuple[dict, dict | None]:
    """(state dict, the run's config or None) from .safetensors, a .pth state dict or a trainer
    checkpoint (weights under "model", the resolved config under "config")."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise many kinds for a file that is not theirs
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    config = None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("model"), dict):
        config = state_dict.get("config")
        state_dict = state_dict["model"]
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: holds a {type(state_dict).__name__}, not a state dict")
    return state_dict, config


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A PyTorch state dict from any supported checkpoint file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check model.pretrained_ckpt")
    if path.suffix in _FORMAT_READERS:
        return _FORMAT_READERS[path.suffix](path)
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


def checkpoint_filter_fn(state_dict: dict, model: torch.nn.Module) -> dict:
    """Adapt a state dict to `model` (timm's loader and `kan_vit.models.pretrained` unwrap checkpoints).

    A learnable pos_embed is resampled (bicubic) to the model's grid; a missing head or one of
    another shape is replaced by the model's own freshly initialised head (dropped if the model
    has none).
    """
    state_dict = dict(state_dict)
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and model.pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        # antialiased bicubic (Keys a=-0.5), the same weights as the original's jax.image.resize
        old = int(round(pos_embed.shape[1] ** 0.5))
        state_dict["pos_embed"] = resample_abs_pos_embed(
            pos_embed,
            new_size=model.patch_embed.grid_size,
            old_size=(old, old),
            num_prefix_tokens=0,
            interpolation="bicubic",
            antialias=True,
        )
    head = dict(model.head.named_parameters())
    for key in ("weight", "bias"):
        name = f"head.{key}"
        if key not in head:
            state_dict.pop(name, None)
        elif name not in state_dict or state_dict[name].shape != head[key].shape:
            state_dict[name] = head[key].detach().clone()
    return state_dict


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
