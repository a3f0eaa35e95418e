"""Checkpoint files: atomic writes, weights_only-loadable contents.

A checkpoint is a dict of tensors, dicts, lists and Python scalars only, so
`torch.load(path, weights_only=True)` reads it (timm's loader does, and uses its "model" key).
Only the global master calls `save` (one writer per file on pods; output_dir on shared storage).
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager

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


@contextmanager
def atomic_outputs(*paths: str):
    """Yield temporary paths in the directories of `paths`; when the body succeeds, fsync them,
    give them the umask's permissions and rename them over `paths`, then fsync the directories.
    On any failure the temporary files are removed: each path is the old or the complete new file."""
    paths = [os.path.abspath(p) for p in paths]
    temps = []
    try:
        for path in paths:
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                           dir=os.path.dirname(path))
            except OSError as error:
                raise OSError(error.errno, f"cannot write {path}: {error.strerror}") from None
            os.close(fd)
            temps.append(tmp)
        yield temps
        umask = os.umask(0)
        os.umask(umask)
        for tmp, path in zip(temps, paths):
            _fsync(tmp)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and some writers) create 0600 files
            os.replace(tmp, path)
        for directory in {os.path.dirname(p) for p in paths}:
            _fsync(directory)  # make the renames themselves durable
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(obj: dict, path: str) -> None:
    """Write `obj` to `path` atomically (see `atomic_outputs`)."""
    with atomic_outputs(path) as (tmp,):
        with open(tmp, "wb") as file:
            torch.save(obj, file)


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
