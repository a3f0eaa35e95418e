"""Checkpoint files: atomic writes, weights_only-loadable contents.

A checkpoint is a dict of tensors, dicts, lists and Python scalars only, so
`torch.load(path, weights_only=True)` reads it (timm's loader does, and uses its "model" key).
Only the global master calls `save` (one writer per file on pods; output_dir on shared storage).
"""
from __future__ import annotations

import os
import tempfile

import torch


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
    """Write `obj` to `path` so that `path` is always either the old or the complete new file:
    temp file in the same directory (same filesystem), fsync, atomic rename, fsync the directory."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
