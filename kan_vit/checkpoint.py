"""Checkpoint files: weights_only-loadable contents, written atomically.

A checkpoint is a dict of tensors, dicts, lists and Python scalars only, so
`torch.load(path, weights_only=True)` reads it (timm's loader does, and uses its "model" key).
Only the global master calls `save` (one writer per file on pods; output_dir on shared storage).
"""
from __future__ import annotations

import torch

from .atomic_files import atomic_outputs


def to_cpu(tree):
    """A copy of nested dicts/lists/tuples with every tensor moved to the host."""
    if torch.is_tensor(tree):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {key: to_cpu(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(value) for value in tree)
    return tree


def save(obj: dict, path: str) -> None:
    """Write `obj` to `path` atomically (see `atomic_outputs`)."""
    with atomic_outputs(path) as (tmp,):
        with open(tmp, "wb") as file:
            torch.save(obj, file)


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
