"""Data pipeline: mixup/cutmix targets, repeated augmentation across replicas,
sharding, exact validation counts, bit-exact resume, bad data, dataset errors."""

import io
import json
import math
import os
import pickle
import tarfile

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

from kan_vit.training import data
from kan_vit.training.config import Config

SHARDS, PER_SHARD = 12, 40  # unique-label shards: label = global sample index


def _jpeg(rgb) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.asarray(rgb, np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _tar_labels(path):
    with tarfile.open(path) as tar:
        return [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]


@pytest.fixture(scope="module")
def unique_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("unique")
    rng = np.random.default_rng(0)
    for s in range(SHARDS):
        members = []
        for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
            members += [(f"s{i:04d}.jpg", _jpeg(rng.integers(0, 256, (8, 8, 3)))), (f"s{i:04d}.cls", b"%d" % i)]
        _write_tar(root / f"u-{s:02d}.tar", members)
    return str(root / f"u-{{00..{SHARDS - 1:02d}}}.tar")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _plain_cfg(pattern, *, labels, world_size, per_replica, repeats=1, workers=0):
    """No augmentation, no mixing, no smoothing: targets are one-hot sample ids."""
    cfg = Config()
    cfg.data.train_dataset_shards = cfg.data.valid_dataset_shards = pattern
    cfg.data.train_batch_size = cfg.data.valid_batch_size = world_size * per_replica
    cfg.data.train_loader_workers = cfg.data.valid_loader_workers = workers
    cfg.model.image_size, cfg.model.labels = 8, labels
    a = cfg.augment
    a.random_crop, a.auto_augment, a.random_erasing, a.augment_repeats = "none", "none", 0.0, repeats
    a.mixup = a.cutmix = a.label_smoothing = 0.0
    return cfg


def _ids(loader, batches):
    out, skipped = [], []
    for _, (images, targets, num_skipped) in zip(range(batches), loader):
        assert images.dtype == torch.uint8 and targets.dtype == torch.float32
        out += targets.argmax(1).tolist()
        skipped.append(int(num_skipped))
    return out, skipped


# ---------------------------------------------------------------- targets, mixup, cutmix


def _mix_cfg(mixup, cutmix, criterion="ce", smoothing=0.1, labels=16):
    cfg = Config()
    cfg.model.labels = labels
    cfg.augment.mixup, cfg.augment.cutmix, cfg.augment.criterion = mixup, cutmix, criterion
    cfg.augment.label_smoothing = smoothing
    return cfg


def _constant_batch(b=16, size=20):
    """Sample n: every pixel 10 * n + 5, label n."""
    values = torch.arange(b) * 10 + 5
    return values.view(b, 1, 1, 1).expand(b, 3, size, size).to(torch.uint8).clone(), torch.arange(b), values


def _recover(targets, n, smoothing, labels):
    """(lam, partner) from a target row of sample n, in closed form from (1-a)*onehot + a/C."""
    row = (targets[n].double() - smoothing / labels) / (1 - smoothing)
    others = row.clone()
    others[n] = 0
    partner = int(others.argmax()) if others.max() > 1e-6 else n
    return float(row[n]) if partner != n else 1.0, partner


def test_label_smoothing_without_mixing():
    images, labels, _ = _constant_batch()
    out, targets = data.mix_batch(images, labels, np.random.default_rng(0), _mix_cfg(0.0, 0.0, smoothing=0.1))
    expected = np.full((16, 16), 0.1 / 16) + 0.9 * np.eye(16)
    np.testing.assert_allclose(targets.numpy(), expected, rtol=1e-6)
    assert torch.equal(out, images)
    _, targets = data.mix_batch(images, labels, np.random.default_rng(0), _mix_cfg(0.0, 0.0, criterion="bce"))
    np.testing.assert_array_equal(targets.numpy(), np.eye(16))  # no smoothing with bce


@pytest.mark.parametrize("seed", range(5))
def test_mixup_blends_pixels_with_target_weights(seed):
    images, labels, values = _constant_batch()
    out, targets = data.mix_batch(images, labels, np.random.default_rng(seed), _mix_cfg(0.8, 0.0))
    np.testing.assert_allclose(targets.sum(1).numpy(), 1.0, rtol=1e-6)
    partners = []
    for n in range(16):
        lam, p = _recover(targets, n, 0.1, 16)
        partners.append(p)
        expected = lam * float(values[n]) + (1 - lam) * float(values[p])
        assert torch.all((out[n].float() - expected).abs() <= 0.5 + 1e-4)
    assert sorted(partners) == list(range(16))  # a permutation of the batch
    assert partners != list(range(15, -1, -1))  # ... not timm's flip


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_label_weight_is_kept_area(seed):
    images, labels, values = _constant_batch(size=24)
    out, targets = data.mix_batch(images, labels, np.random.default_rng(seed), _mix_cfg(0.0, 1.0, "bce"))
    for n in range(16):
        lam, p = _recover(targets, n, 0.0, 16)
        kept = (out[n, 0] == values[n]).double()
        if p != n:
            assert set(out[n].unique().tolist()) <= {int(values[n]), int(values[p])}
            assert lam == pytest.approx(float(kept.mean()), abs=1e-6)
            rows, cols = np.nonzero((1 - kept).numpy())  # the pasted region is one rectangle
            if len(rows):
                assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_mixup_cutmix_switch_and_beta_lambda():
    images, labels, values = _constant_batch(b=8, size=16)
    cutmix, lams = 0, []
    for seed in range(300):
        out, targets = data.mix_batch(images, labels, np.random.default_rng([7, seed]), _mix_cfg(0.8, 1.0))
        mixed = [n for n in range(8) if _recover(targets, n, 0.1, 16)[1] != n]
        cutmix += not mixed or len(out[mixed[0], 0].unique()) > 1  # no mixed row: an empty cutmix box
    assert 0.4 < cutmix / 300 < 0.6
    for seed in range(300):
        _, targets = data.mix_batch(images, labels, np.random.default_rng([9, seed]), _mix_cfg(0.8, 0.0))
        n = next(n for n in range(8) if _recover(targets, n, 0.1, 16)[1] != n)
        lams.append(_recover(targets, n, 0.1, 16)[0])
    assert scipy.stats.kstest(lams, scipy.stats.beta(0.8, 0.8).cdf).pvalue > 0.01


# ---------------------------------------------------------------- train stream


@pytest.mark.parametrize("world_size", [6, 4])
def test_repeated_copies_land_on_different_replicas(unique_shards, world_size):
    repeats, per_replica, batches = 3, 4, 10
    cfg = _plain_cfg(
        unique_shards, labels=SHARDS * PER_SHARD, world_size=world_size, per_replica=per_replica, repeats=repeats
    )
    ids = [_ids(data.create_train_loader(cfg, world_size=world_size, rank=r), batches)[0] for r in range(world_size)]
    for rank_ids in ids:
        assert len(set(rank_ids)) == len(rank_ids)  # never two copies on one replica
    m = per_replica * batches
    if world_size == 6:  # groups of 3 replicas share one sample order; copy c of each sample on replica c
        assert ids[0] == ids[1] == ids[2] and ids[3] == ids[4] == ids[5]
        shards = [{i // PER_SHARD for i in ids[g]} for g in (0, 3)]
        assert not shards[0] & shards[1]  # the two groups read different shards
    else:  # one group of 4: positions 3i..3i+2 dealt round-robin; 4m positions cover 4m/3 samples
        counts = np.bincount(np.concatenate(ids))
        counts = counts[counts > 0]
        assert len(counts) == math.ceil(4 * m / repeats)
        assert (counts == repeats).sum() == (4 * m - repeats) // repeats + 1


@pytest.mark.parametrize("per_host,local,expected", [(40, 4, 10), (40, 8, 5), (40, 1, 40), (3, 4, 1), (0, 4, 0)])
def test_loader_workers_are_per_host_shared_by_the_local_replicas(unique_shards, per_host, local, expected):
    """The recipes' 40 is the original's per-host figure: 4 chips -> 10 workers per process."""
    cfg = _plain_cfg(unique_shards, labels=SHARDS * PER_SHARD, world_size=local, per_replica=2, workers=per_host)
    train = data.create_train_loader(cfg, world_size=local, rank=0, local_replicas=local)
    valid, _ = data.create_valid_loader(cfg, world_size=local, rank=0, local_replicas=local)
    assert train.num_workers == valid.num_workers == expected


def test_shard_order_follows_shuffle_seed(unique_shards):
    cfg = _plain_cfg(unique_shards, labels=SHARDS * PER_SHARD, world_size=2, per_replica=4)
    first = [_ids(data.create_train_loader(cfg, world_size=2, rank=r), 8)[0] for r in range(2)]
    assert first[0] == _ids(data.create_train_loader(cfg, world_size=2, rank=0), 8)[0]
    assert not {i // PER_SHARD for i in first[0]} & {i // PER_SHARD for i in first[1]}
    cfg.data.shuffle_seed = 1
    assert _ids(data.create_train_loader(cfg, world_size=2, rank=0), 8)[0] != first[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_start_batch_is_bit_exact(demo_dir, workers):
    cfg = Config()
    cfg.data.format, cfg.data.cache_dir, cfg.data.train_loader_workers = "demo_digits", demo_dir, workers
    cfg.data.train_batch_size, cfg.model.image_size, cfg.model.labels = 16, 16, 10
    cfg.augment.color_jitter = 0.3  # everything else: the original's defaults (rrc, rand-m9, erasing, mixup+cutmix)
    full = [b for _, b in zip(range(6), data.create_train_loader(cfg, world_size=2, rank=1))]
    resumed = [b for _, b in zip(range(3), data.create_train_loader(cfg, world_size=2, rank=1, start_batch=3))]
    assert full[0][0].shape == (8, 3, 16, 16)
    assert not torch.equal(full[3][0], full[4][0])
    for want, got in zip(full[3:], resumed):
        for w, g in zip(want, got):
            assert torch.equal(w, g)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("world_size,workers", [(5, 0), (3, 2)])
def test_valid_counts_every_sample_once(unique_shards, world_size, workers):
    cfg = _plain_cfg(unique_shards, labels=SHARDS * PER_SHARD, world_size=world_size, per_replica=9, workers=workers)
    seen, lengths, total = [], set(), 0
    for rank in range(world_size):
        loader, num_samples = data.create_valid_loader(cfg, world_size=world_size, rank=rank)
        batches = list(loader)
        lengths.add(len(batches))
        total += num_samples
        for images, labels, skipped in batches:
            assert images.shape == (9, 3, 8, 8) and labels.dtype == torch.int64 and int(skipped) == 0
            assert not images[labels == -1].any()
            seen += labels[labels != -1].tolist()
        assert sum(int((b[1] != -1).sum()) for b in batches) == num_samples
    assert len(lengths) == 1 and total == SHARDS * PER_SHARD
    assert sorted(seen) == list(range(SHARDS * PER_SHARD))


def test_valid_demo_and_imagefolder_counts(demo_dir, tmp_path):
    cfg = Config()
    cfg.data.format, cfg.data.cache_dir, cfg.data.valid_loader_workers = "demo_digits", demo_dir, 0
    cfg.data.valid_batch_size, cfg.model.image_size = 64, 16
    loader, n = data.create_valid_loader(cfg, world_size=1, rank=0)
    labels = torch.cat([b[1] for b in loader])
    assert n == 360 and sorted(labels[labels != -1].tolist()) == sorted(
        sum((_tar_labels(p) for p in data.expand_urls(data.prepare_demo("demo_digits", demo_dir)[1])), [])
    )
    for cls, count in (("a", 3), ("b", 3)):
        os.makedirs(tmp_path / cls)
        for i in range(count):
            (tmp_path / cls / f"{i}.jpg").write_bytes(_jpeg(np.full((8, 8, 3), 40 * i)))
    (tmp_path / "b" / "bad.jpg").write_bytes(b"not a jpeg")
    cfg = _plain_cfg(str(tmp_path), labels=2, world_size=2, per_replica=2)
    cfg.data.format = "imagefolder"
    results = [data.create_valid_loader(cfg, world_size=2, rank=r) for r in range(2)]
    batches = [list(loader) for loader, _ in results]
    assert len(batches[0]) == len(batches[1]) and [n for _, n in results] == [4, 3]
    labels = torch.cat([b[1] for bs in batches for b in bs])
    assert sorted(labels[labels != -1].tolist()) == [0, 0, 0, 1, 1, 1]
    assert sum(int(b[2]) for bs in batches for b in bs) == 1
    ids, skipped = _ids(data.create_train_loader(cfg, world_size=2, rank=0), 6)
    assert set(ids) == {0, 1} and 0 < sum(skipped) <= 6  # RepeatAugSampler path: bad.jpg skipped, counted


# ---------------------------------------------------------------- bad data


@pytest.fixture
def bad_shard(tmp_path):
    """Records in order: g0, garbage jpg, g1, truncated jpg, g2, jpg without cls, g3, truncated tar member."""
    good = [_jpeg(np.full((8, 8, 3), 30 * i)) for i in range(4)]
    members = [
        ("g0.jpg", good[0]),
        ("g0.cls", b"0"),
        ("b1.jpg", b"\xff\xd8garbage"),
        ("b1.cls", b"1"),
        ("g1.jpg", good[1]),
        ("g1.cls", b"1"),
        ("b2.jpg", good[2][: len(good[2]) // 2]),
        ("b2.cls", b"2"),
        ("g2.jpg", good[2]),
        ("g2.cls", b"2"),
        ("b3.jpg", good[3]),
        ("g3.jpg", good[3]),
        ("g3.cls", b"3"),
        ("z.jpg", good[0]),
    ]
    path = tmp_path / "bad.tar"
    _write_tar(path, members)
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    with open(path, "r+b") as f:
        f.truncate(last.offset_data + last.size // 2)
    return str(path)


@pytest.mark.filterwarnings("ignore:shard")
def test_bad_samples_are_skipped_and_counted(bad_shard, monkeypatch):
    cfg = _plain_cfg(bad_shard, labels=4, world_size=1, per_replica=2)
    loader, n = data.create_valid_loader(cfg, world_size=1, rank=0)
    batches = list(loader)
    labels = torch.cat([b[1] for b in batches])
    assert n == 8 and sorted(labels[labels != -1].tolist()) == [0, 1, 2, 3]
    assert sum(int(b[2]) for b in batches) == 4  # 3 bad samples + 1 truncated member

    # The stream trains through, pass after pass; with shuffling off the counts are exact per batch.
    ids, skipped = _ids(data.create_train_loader(cfg, world_size=1, rank=0), 40)
    assert set(ids) == {0, 1, 2, 3} and abs(sum(skipped) - len(ids)) <= 16  # 4 bad : 4 good
    monkeypatch.setattr(data, "_SHUFFLE_BUFFER", 1)
    monkeypatch.setattr(data, "_SHUFFLE_INITIAL", 1)
    ids, skipped = _ids(data.create_train_loader(cfg, world_size=1, rank=0), 6)
    assert ids == [0, 1, 2, 3] * 3 and skipped == [1, 2, 2, 2, 2, 2]
    # Three replicas share the stream (repeats 3): every replica gets every copy; each loss counted once.
    cfg = _plain_cfg(bad_shard, labels=4, world_size=3, per_replica=2, repeats=3)
    per_rank = [_ids(data.create_train_loader(cfg, world_size=3, rank=r), 6) for r in range(3)]
    assert all(ids == [0, 1, 2, 3] * 3 for ids, _ in per_rank)
    assert [sum(s) for _, s in per_rank] == [11, 0, 0]


# ---------------------------------------------------------------- dataset errors


def test_check_dataset_errors(tmp_path, unique_shards):
    cfg = Config()
    with pytest.raises(ValueError, match="train_dataset_shards is not set"):
        data.check_dataset(cfg)
    cfg.data.train_dataset_shards = unique_shards
    cfg.data.valid_dataset_shards = str(tmp_path / "val-{0..3}.tar")
    with pytest.raises(ValueError, match=r"valid_dataset_shards: 4 of 4 shards are missing or empty"):
        data.check_dataset(cfg)
    (tmp_path / "val-0.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="missing or empty"):
        data.check_dataset(cfg)
    cfg.data.valid_dataset_shards = "pipe:gsutil cat gs://nowhere/val-{0..3}.tar"  # URLs: expanded, not opened
    data.check_dataset(cfg)
    cfg.data.format = "imagefolder"
    cfg.data.train_dataset_shards = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match="is not a directory"):
        data.check_dataset(cfg)
    cfg.data.train_dataset_shards = str(tmp_path)
    with pytest.raises(ValueError, match="no non-empty class folders"):
        data.check_dataset(cfg)
    cfg.data.format, cfg.data.cache_dir = "demo_digits", str(tmp_path / "val-0.tar")  # a file, not a directory
    with pytest.raises(ValueError, match="cannot write the demo shards"):
        data.check_dataset(cfg)
    cfg.data.format = "tfrecord"
    with pytest.raises(ValueError, match="data.format='tfrecord'"):
        data.check_dataset(cfg)


def test_loader_rejects_empty_batches(unique_shards):
    cfg = _plain_cfg(unique_shards, labels=SHARDS * PER_SHARD, world_size=4, per_replica=1)
    cfg.optim.grad_accum = 2
    with pytest.raises(ValueError, match="train_batch_size >= world_size"):
        data.create_train_loader(cfg, world_size=4, rank=0)
    with pytest.raises(ValueError, match="valid_batch_size=4 is below world_size=8"):
        data.create_valid_loader(cfg, world_size=8, rank=0)


@pytest.mark.filterwarnings("ignore:shard")
def test_train_stream_without_usable_samples_raises_instead_of_hanging(tmp_path):
    _write_tar(tmp_path / "garbage.tar", sum(([(f"x{i}.jpg", b"garbage"), (f"x{i}.cls", b"0")] for i in range(20)), []))
    cfg = _plain_cfg(str(tmp_path / "garbage.tar"), labels=2, world_size=1, per_replica=1)
    with pytest.raises(RuntimeError, match="1101 samples in a row were undecodable"):
        next(iter(data.create_train_loader(cfg, world_size=1, rank=0)))
    _write_tar(tmp_path / "cut.tar", [("x0.jpg", _jpeg(np.zeros((8, 8, 3))))])
    with open(tmp_path / "cut.tar", "r+b") as f:
        f.truncate(600)
    cfg.data.train_dataset_shards = str(tmp_path / "{cut,cut}.tar")
    with pytest.raises(RuntimeError, match="2 shards in a row held no readable sample"):
        next(iter(data.create_train_loader(cfg, world_size=1, rank=0)))


def test_pipe_urls_read_like_local_paths(unique_shards):
    local = _plain_cfg(unique_shards, labels=SHARDS * PER_SHARD, world_size=2, per_replica=8)
    piped = _plain_cfg("pipe:cat " + unique_shards, labels=SHARDS * PER_SHARD, world_size=2, per_replica=8)
    data.check_dataset(piped)
    assert _ids(data.create_train_loader(piped, world_size=2, rank=1), 4) == _ids(
        data.create_train_loader(local, world_size=2, rank=1), 4
    )
    loader, n = data.create_valid_loader(piped, world_size=2, rank=0)
    labels = torch.cat([b[1] for b in loader])
    assert n == SHARDS * PER_SHARD // 2 and int((labels != -1).sum()) == n


def test_imagefolder_resume_is_bit_exact(tmp_path):
    rng = np.random.default_rng(1)
    for cls in ("a", "b", "c"):
        os.makedirs(tmp_path / cls)
        for i in range(5):
            (tmp_path / cls / f"{i}.jpg").write_bytes(_jpeg(rng.integers(0, 256, (12, 12, 3))))
    cfg = Config()
    cfg.data.format = "imagefolder"
    cfg.data.train_dataset_shards, cfg.data.train_batch_size, cfg.data.train_loader_workers = str(tmp_path), 8, 2
    cfg.model.image_size, cfg.model.labels, cfg.augment.augment_repeats = 12, 3, 2
    full = [b for _, b in zip(range(7), data.create_train_loader(cfg, world_size=2, rank=1))]
    resumed = [b for _, b in zip(range(2), data.create_train_loader(cfg, world_size=2, rank=1, start_batch=5))]
    for want, got in zip(full[5:], resumed):
        assert all(torch.equal(w, g) for w, g in zip(want, got))


def test_loaders_start_workers_under_spawn(unique_shards):
    """xmp.spawn children start DataLoader workers with `spawn`: the datasets must pickle, and a
    spawned worker must yield the same batch as the in-process loader."""
    cfg = _plain_cfg(unique_shards, labels=SHARDS * PER_SHARD, world_size=2, per_replica=4)
    train = data.create_train_loader(cfg, world_size=2, rank=1)
    valid, _ = data.create_valid_loader(cfg, world_size=2, rank=1)
    spawned = torch.utils.data.DataLoader(
        train.dataset, batch_size=None, num_workers=1, multiprocessing_context="spawn"
    )
    want, got = next(iter(train)), next(iter(spawned))
    assert all(torch.equal(w, g) for w, g in zip(want, got))
    pickle.dumps(valid.dataset)


# ---------------------------------------------------------------- resuming from stream states


@pytest.fixture
def counted_shards(tmp_path):
    """10 shards of 30 samples (label = sample index; every 7th image undecodable), read through
    `pipe:` commands that log each shard they open."""
    rng = np.random.default_rng(2)
    for s in range(10):
        members = []
        for i in range(s * 30, (s + 1) * 30):
            image = b"\xff\xd8garbage" if i % 7 == 3 else _jpeg(rng.integers(0, 256, (8, 8, 3)))
            members += [(f"s{i:04d}.jpg", image), (f"s{i:04d}.cls", b"%d" % i)]
        _write_tar(tmp_path / f"c-{s}.tar", members)
    log = tmp_path / "opened.log"
    return f"pipe:f={tmp_path}/c-{{0..9}}.tar; echo $f >> {log}; cat $f", log


def _opened(log) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_webdataset_shuffle_order_is_kept(unique_shards):
    """The stream's sample order is webdataset's: its shuffle buffer over the worker's shards in
    each pass's seeded permutation (computed here with webdataset itself)."""
    import random

    import webdataset as wds

    cfg = _plain_cfg(unique_shards, labels=SHARDS * PER_SHARD, world_size=1, per_replica=8)
    urls = sorted(os.path.join(os.path.dirname(unique_shards), n) for n in os.listdir(os.path.dirname(unique_shards)))
    order = [urls[i] for epoch in range(2) for i in np.random.default_rng([0, epoch]).permutation(SHARDS)]
    labels = [label for url in order for label in _tar_labels(url)]
    rng = random.Random(data.derive_seed(0, 0, 0, 0))
    want = list(wds.shuffle(data._SHUFFLE_BUFFER, data._SHUFFLE_INITIAL, rng=rng)(iter(labels)))[:400]
    assert _ids(data.create_train_loader(cfg, world_size=1, rank=0), 50)[0] == want


@pytest.mark.filterwarnings("ignore:shard")
def test_resumed_loader_reads_only_the_shards_its_state_names_and_continues_exactly(
    counted_shards, tmp_path, monkeypatch
):
    """2 replicas sharing a stream (2 copies), 2 loader workers, undecodable samples: a loader
    resumed at batch 96 from the states an earlier loader saved opens, before its first batch,
    only the shards those states name (the buffer's, read up to their last referenced record, and
    the current one, read on from its position) and at most one more per prefetched batch
    (two per worker), where replaying from batch 0 opens every shard read since; and it
    yields the batches (and skip counts) of the uninterrupted loader."""
    monkeypatch.setattr(data, "_SHUFFLE_BUFFER", 20)  # a buffer spanning one or two shards, as on ImageNet
    monkeypatch.setattr(data, "_SHUFFLE_INITIAL", 5)
    pattern, log = counted_shards
    cfg = _plain_cfg(pattern, labels=300, world_size=2, per_replica=4, repeats=2, workers=2)
    states = tmp_path / "stream"
    loader = data.create_train_loader(cfg, world_size=2, rank=0, snapshot_dir=str(states))
    full = [b for _, b in zip(range(100), loader)]
    del loader
    assert sum(int(b[2]) for b in full[96:]) > 0  # undecodable samples fall in the compared batches
    named = 0
    for worker in range(2):  # the states at batches 96 and 97 (every 16th batch of each worker)
        (state,) = [json.loads(p.read_text()) for p in states.glob(f"*-w{worker}-{96 + worker}.json")]
        refs = state["buffer"] + ([state["sample"][0]] if state["sample"] else [])
        named += len({shard for shard, _ in refs}) + 1  # the buffer's shards, then the one read on from
    log.unlink()
    replayed = [b for _, b in zip(range(4), data.create_train_loader(cfg, world_size=2, rank=0, start_batch=96))]
    replay_opens = _opened(log)
    log.unlink()
    resumed = iter(data.create_train_loader(cfg, world_size=2, rank=0, start_batch=96, snapshot_dir=str(states)))
    first = next(resumed)
    # each of the 2 workers prefetches 2 batches (DataLoader's prefetch_factor), each of which may open one more shard
    assert _opened(log) <= named + 2 * 2 < replay_opens
    resumed = [first] + [b for _, b in zip(range(3), resumed)]
    for want, got, slow in zip(full[96:], resumed, replayed):
        assert all(torch.equal(w, g) and torch.equal(w, s) for w, g, s in zip(want, got, slow))
