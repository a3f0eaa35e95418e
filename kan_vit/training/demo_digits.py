"""The embedded demo: scikit-learn's bundled handwritten digits written once as webdataset shards.

1,797 real 8x8 grey images (10 classes) -> stratified, seeded split of 1,437 train / 360 valid,
upsampled bicubically to 32x32 RGB JPEGs in tar shards with keys `jpg`/`cls`, so the demo runs
through the same shard -> decode -> augment path as ImageNet.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile

import numpy as np
from PIL import Image

DEMO_SIZE = 32
_SPLITS = {"train": 4, "valid": 2}  # shards per split
_SPLIT_SEED = 0


def _patterns(root: str) -> tuple[str, str]:
    return tuple(os.path.join(root, f"digits-{split}-{{0..{n - 1}}}.tar") for split, n in _SPLITS.items())


def _shard_names() -> list[str]:
    return [f"digits-{split}-{i}.tar" for split, n in _SPLITS.items() for i in range(n)]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_split(root: str, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    num_shards = _SPLITS[split]
    for shard in range(num_shards):
        with tarfile.open(os.path.join(root, f"digits-{split}-{shard}.tar"), "w") as tar:
            for i in range(shard, len(images), num_shards):
                grey = Image.fromarray(np.uint8(np.round(images[i] * (255 / 16))), "L")
                rgb = grey.resize((DEMO_SIZE, DEMO_SIZE), Image.BICUBIC).convert("RGB")
                jpg = io.BytesIO()
                rgb.save(jpg, format="JPEG", quality=95)
                _add(tar, f"{split}{i:05d}.jpg", jpg.getvalue())
                _add(tar, f"{split}{i:05d}.cls", str(int(labels[i])).encode())


def prepare_demo_digits(cache_dir: str | None) -> tuple[str, str]:
    """Write the demo shards under `<cache_dir or ~/.cache/kan_vit>/demo_digits` once; return
    (train_pattern, valid_pattern) brace patterns."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    parent = os.path.expanduser(cache_dir or "~/.cache/kan_vit")
    root = os.path.join(parent, "demo_digits")
    if os.path.isdir(root):  # only ever created complete, by the rename below
        missing = [name for name in _shard_names() if not os.path.isfile(os.path.join(root, name))]
        if missing:
            raise ValueError(f"demo cache {root} lacks {missing[0]}: delete that directory to rebuild it")
        return _patterns(root)
    os.makedirs(parent, exist_ok=True)
    digits = load_digits()
    x_train, x_valid, y_train, y_valid = train_test_split(
        digits.images, digits.target, test_size=0.2, stratify=digits.target, random_state=_SPLIT_SEED
    )
    tmp = tempfile.mkdtemp(prefix=".demo_digits-", dir=parent)
    try:
        _write_split(tmp, "train", x_train, y_train)
        _write_split(tmp, "valid", x_valid, y_valid)
        os.rename(tmp, root)
    except OSError:
        if not os.path.isdir(root):  # a concurrent process winning the rename is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _patterns(root)
