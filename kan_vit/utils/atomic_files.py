"""Atomic file writes: each target is either its old contents or the complete new file.

Everything the project writes (checkpoints, configs, converted weights, metrics, reports) goes
through `atomic_outputs`, so a crash or a full disk never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager


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
                fd, tmp = tempfile.mkstemp(
                    prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path)
                )
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
