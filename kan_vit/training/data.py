"""Train and validation loaders (docs/original.md, "Data"): uint8 batches for the device.

Formats: webdataset tar shards (keys `jpg`/`cls`; local paths, brace patterns, URLs through
webdataset's `gopen`, e.g. `pipe:gsutil cat ...` or http), torchvision ImageFolder directories, and
the embedded demo (`demo_digits`, written as shards and then read like ImageNet).

Determinism: shard and sample order come from `data.shuffle_seed`; each augmentation is seeded by
(shuffle_seed, rank, worker, stream position) and each batch's mixup/cutmix by (mixup_seed + rank,
batch index), so `start_batch` reproduces an uninterrupted run's batches bit for bit (same
world_size and worker count). Resuming replays the decode of the skipped stream (needed to find
where corrupt samples fell) but not its augmentation.

Bad data is never fatal: an undecodable image, a sample without `jpg`/`cls`, or a truncated tar
member is dropped and counted in each batch's `num_skipped`.

`LazyStart` and `DeviceLoader` wrap a loader for the device, in each backend's `device_loader`.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import random
import tarfile
import warnings
from functools import partial
from typing import get_args

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.datasets import ImageFolder
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from kan_vit.training.config import DataFormat
from kan_vit.training.demo_digits import prepare_demo_digits
from kan_vit.training.preemption import ignore_in_loader_worker
from kan_vit.training.seeding import derive_seed, seeded_host_rngs
from kan_vit.training.transforms import train_transform, valid_transform

SKIP = None  # an item that stands for one dropped sample
_SHUFFLE_BUFFER, _SHUFFLE_INITIAL = 1000, 100  # webdataset's defaults, as the original used
_DECODE_ERRORS = (KeyError, ValueError, OSError, SyntaxError, EOFError, Image.DecompressionBombError)


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _source(cfg, split: str) -> str:
    if cfg.data.format == "demo_digits":
        return prepare_demo_digits(cfg.data.cache_dir)[("train", "valid").index(split)]
    return getattr(cfg.data, f"{split}_dataset_shards")


def check_dataset(cfg) -> None:
    """Raise ValueError when a split's shard pattern or folder is unset, empty or missing.

    URLs are only expanded, never opened. For demo_digits, writes the demo shards."""
    fmt = cfg.data.format
    if fmt == "demo_digits":  # written here, once, before any process starts
        try:
            prepare_demo_digits(cfg.data.cache_dir)
        except OSError as exn:
            raise ValueError(
                f"data.cache_dir={cfg.data.cache_dir!r}: cannot write the demo shards ({exn}):"
                " give a writable directory"
            ) from exn
        return
    if fmt not in get_args(DataFormat):
        raise ValueError(f"data.format={fmt!r}: use one of {', '.join(get_args(DataFormat))}")
    for split in ("train", "valid"):
        key, source = f"data.{split}_dataset_shards", getattr(cfg.data, f"{split}_dataset_shards")
        if not source:
            raise ValueError(
                f"{key} is not set: give a {'folder' if fmt == 'imagefolder' else 'shard pattern'}"
                " (or use data.format=demo_digits)"
            )
        if fmt == "imagefolder":
            if not os.path.isdir(source):
                raise ValueError(
                    f"{key}={source!r} is not a directory: give an ImageFolder root (one folder per class)"
                )
            if not any(e.is_dir() and any(os.scandir(e.path)) for e in os.scandir(source)):
                raise ValueError(f"{key}={source!r} has no non-empty class folders: give an ImageFolder root")
            continue
        urls = expand_urls(source)
        if not urls:
            raise ValueError(f"{key}={source!r} expands to no shards: check the brace pattern")
        bad = [u for u in urls if not _is_remote(u) and not (os.path.isfile(u) and os.path.getsize(u) > 0)]
        if bad:
            raise ValueError(
                f"{key}: {len(bad)} of {len(urls)} shards are missing or empty, e.g. {bad[0]!r}:"
                " fix the path or pattern"
            )


def _tar_records(url: str):
    """Yield one dict {extension: bytes} per sample key of a shard, or SKIP for a sample lost to a
    broken member (the shard ends there).

    Our own loop over `tarfile` because webdataset's tar iterators report one truncated member to
    the handler up to twice and merge or drop the partial sample, so their count would not be real.
    """
    try:
        stream = wds.gopen(url)
    except OSError as exn:
        warnings.warn(f"skipping shard {url}: {exn}", stacklevel=2)
        return
    key, record, member = None, {}, None
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                prefix, ext = base_plus_ext(member.name)
                if member.isreg() and prefix is not None:
                    if prefix != key:
                        if key is not None:
                            yield record
                        key, record = prefix, {}
                    record[ext.lower()] = tar.extractfile(member).read()
                member = None
    except (tarfile.TarError, OSError, EOFError) as exn:
        where = "a tar header" if member is None else f"member {member.name!r}"
        warnings.warn(f"shard {url} is broken at {where}, skipping the rest of it: {exn}", stacklevel=2)
        if member is None and key is not None:  # the header broke, not a member of `record`
            yield record
        yield SKIP
        return
    if key is not None:
        yield record


def _stream_records(shards, num_urls: int):
    """Records of a shard sequence; raises when num_urls shards in a row hold no readable sample
    (a dataset with nothing usable, or unreachable, would otherwise hang the loader)."""
    barren = 0
    for url in shards:
        count = 0
        for record in _tar_records(url):
            count += record is not SKIP
            yield record
        barren = 0 if count else barren + 1
        if barren >= num_urls:
            raise RuntimeError(f"{barren} shards in a row held no readable sample (last {url}): check the data")


def _decode(record):
    """(RGB PIL image, int label), or SKIP when the sample is incomplete or undecodable."""
    if record is SKIP:
        return SKIP
    try:
        return Image.open(io.BytesIO(record["jpg"])).convert("RGB"), int(record["cls"])
    except _DECODE_ERRORS:
        return SKIP


def _load_file(path: str):
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except _DECODE_ERRORS:
        return SKIP


def _repeat_group(world_size: int, repeats: int) -> int:
    """Replicas sharing one sample stream: the smallest divisor of world_size >= repeats."""
    return next((k for k in range(repeats, world_size + 1) if world_size % k == 0), world_size)


def _shard_cycle(urls: list[str], seed: int):
    """The shard list, reshuffled by seed every pass, forever."""
    for epoch in itertools.count():
        yield from (urls[i] for i in np.random.default_rng([seed, epoch]).permutation(len(urls)))


# Repeated augmentation across replicas, the stream form of RepeatAugSampler. The original
# reordered each host batch so the copies of an image went to different local devices; with one
# process per device, replicas must share the order instead: replicas form groups of k (above), a
# group reads one shard subsequence (every (world_size/k)-th shard) in one sample order, conceptually
# repeats sample i at positions i*R .. i*R+R-1 and deals position v to replica v % k. So the R
# copies land on R different replicas (when world_size >= R) and each group reads 1/(world_size/k)
# of the shards. A dropped sample is counted once, by the replica holding its copy at position i*R.
def _shard_items(urls, cfg, world_size, rank, worker, num_workers):
    repeats, seed = cfg.augment.augment_repeats, cfg.data.shuffle_seed
    k = _repeat_group(world_size, repeats)
    groups, (group, j) = world_size // k, divmod(rank, k)
    shards = itertools.islice(_shard_cycle(urls, seed), group + worker * groups, None, groups * num_workers)
    records = _stream_records(shards, len(urls))
    rng = random.Random(derive_seed(seed, 0, group, worker))
    for i, record in enumerate(wds.shuffle(_SHUFFLE_BUFFER, _SHUFFLE_INITIAL, rng=rng)(records)):
        positions = [v for v in range(i * repeats, (i + 1) * repeats) if v % k == j]
        if not positions:
            continue
        sample = _decode(record)
        if sample is SKIP:
            if (i * repeats) % k == j:
                yield SKIP
            continue
        for v in positions:
            yield sample + (v,)


def _folder_items(dataset, cfg, world_size, rank, worker, num_workers):
    repeats, seed = cfg.augment.augment_repeats, cfg.data.shuffle_seed
    sampler = RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, num_repeats=repeats, shuffle=True)

    def indices():
        for epoch in itertools.count():
            sampler.set_epoch(
                derive_seed(seed, epoch)
            )  # the sampler seeds its permutation by epoch alone: fold in the seed
            for p, index in enumerate(sampler):  # owner: this replica holds copy 0 of the image
                yield index, (rank + p * world_size) % repeats == 0

    for position, (index, owner) in itertools.islice(enumerate(indices()), worker, None, num_workers):
        path, label = dataset.samples[index]
        image = _load_file(path)
        if image is SKIP:
            if owner:
                yield SKIP
            continue
        yield image, label, position


def mix_batch(images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator, cfg):
    """Soft targets with label smoothing (ce only) before Mixup or CutMix (one per batch), on uint8.

    Returns uint8 images and float32 targets (b, labels)."""
    aug = cfg.augment
    smoothing = aug.label_smoothing if aug.criterion == "ce" else 0.0
    num_classes = cfg.model.labels
    targets = torch.nn.functional.one_hot(labels, num_classes).float() * (1 - smoothing) + smoothing / num_classes
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return images, targets
    use_cutmix = aug.cutmix > 0 and (aug.mixup <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(*(2 * [aug.cutmix if use_cutmix else aug.mixup])))
    # The original pairs each sample with a random permutation of the batch (timm's FastCollateMixup flips it).
    partner = torch.from_numpy(rng.permutation(len(labels)))
    if use_cutmix:
        h, w = images.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = images[partner][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually kept
    else:
        images = (images.float() * lam + images[partner].float() * (1 - lam)).round_().to(torch.uint8)
    return images, targets * lam + targets[partner] * (1 - lam)


def loader_workers(per_host: int, local_replicas: int) -> int:
    """One process's loader workers: the config's per-host figure (the original's, one process per
    host) shared by the host's replicas, at least 1 when any were asked for (0: load in-process)."""
    return max(1, per_host // local_replicas) if per_host > 0 else 0


def _count(value: int) -> torch.Tensor:
    """A count for the device as shape (1,): torch_xla bakes a 0-dim 0 or 1 into the graph as a
    constant, so a 0-dim count would give replicas (and steps) different graphs."""
    return torch.tensor([value], dtype=torch.int64)


def _own_generator() -> torch.Generator:
    """For the DataLoader's per-iterator seed draw (unused: workers seed from the data position),
    which would otherwise advance the global torch RNG: on a CPU device that is the dropout RNG,
    and a resumed run, which starts its iterator at another point, would drift from an uninterrupted one."""
    return torch.Generator()


def _worker():
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


class _TrainBatches(IterableDataset):
    """Infinite fixed-size micro-batches; logical worker w makes batches w, w + W, w + 2W, ..."""

    def __init__(self, items, cfg, rank: int, start_batch: int, batch_size: int):
        self.items, self.cfg, self.rank, self.start_batch, self.batch_size = items, cfg, rank, start_batch, batch_size

    def __iter__(self):
        physical, num_workers = _worker()
        worker = (physical + self.start_batch) % num_workers  # the DataLoader asks worker 0 first
        transform, seed = train_transform(self.cfg), self.cfg.data.shuffle_seed
        batch, skipped, batch_index = [], 0, worker  # this worker's batches: every num_workers-th
        for item in self.items(worker, num_workers):
            if item is SKIP:
                skipped += 1
                if skipped > 100 * self.batch_size + 1000:
                    raise RuntimeError(f"{skipped} samples in a row were undecodable: check the data")
                continue
            image, label, position = item  # the copy's position in the stream: seeds its augmentation
            if batch_index >= self.start_batch:  # batches before start_batch are only counted through, not augmented
                with seeded_host_rngs(derive_seed(seed, 1, self.rank, worker, position)):
                    image = transform(image)
            batch.append((image, label))
            if len(batch) < self.batch_size:
                continue
            if batch_index >= self.start_batch:
                rng = np.random.default_rng([self.cfg.augment.mixup_seed + self.rank, batch_index])
                images, targets = mix_batch(
                    torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), rng, self.cfg
                )
                yield images, targets, _count(skipped)
            batch, skipped, batch_index = [], 0, batch_index + num_workers


def create_train_loader(cfg, *, world_size: int, rank: int, start_batch: int = 0, local_replicas: int = 1):
    """Infinite iterable of (uint8 images (b, 3, S, S), float32 targets (b, labels), int64 num_skipped (1,))
    with b = train_batch_size // world_size // grad_accum, yielding batches start_batch, start_batch + 1, ...
    `local_replicas`: the processes on this host, which share data.train_loader_workers."""
    batch_size = cfg.data.train_batch_size // world_size // cfg.optim.grad_accum
    if batch_size < 1 or cfg.augment.augment_repeats < 1 or not cfg.model.labels:
        raise ValueError(
            f"train loader needs data.train_batch_size >= world_size * optim.grad_accum "
            f"({cfg.data.train_batch_size} < {world_size} * {cfg.optim.grad_accum}?), "
            f"augment.augment_repeats >= 1 and model.labels set"
        )
    if cfg.data.format == "imagefolder":
        dataset = ImageFolder(cfg.data.train_dataset_shards)
        items = partial(_folder_items, dataset, cfg, world_size, rank)  # picklable: spawn-started workers
    else:
        urls = expand_urls(_source(cfg, "train"))
        items = partial(_shard_items, urls, cfg, world_size, rank)  # picklable: spawn-started workers
    workers = loader_workers(cfg.data.train_loader_workers, local_replicas)
    return DataLoader(
        _TrainBatches(items, cfg, rank, start_batch, batch_size),
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=_own_generator(),
        worker_init_fn=ignore_in_loader_worker,
    )


def _shard_samples(urls):
    return map(_decode, itertools.chain.from_iterable(map(_tar_records, urls)))


def _folder_samples(samples):
    for path, label in samples:
        image = _load_file(path)
        yield SKIP if image is SKIP else (image, label)


class _ValidBatches(IterableDataset):
    """Each part (a list of shards or images) yields exactly its planned number of batches, padded
    with label -1 and zero images."""

    def __init__(self, parts, planned, samples, cfg, batch_size):
        self.parts, self.planned, self.samples, self.cfg, self.batch_size = parts, planned, samples, cfg, batch_size

    def _batches(self, part, planned, transform):
        batch, skipped = [], 0
        for sample in self.samples(part):
            if sample is SKIP:
                skipped += 1
                continue
            batch.append((transform(sample[0]), sample[1]))
            if len(batch) == self.batch_size:
                yield self._collate(batch, skipped)
                batch, skipped, planned = [], 0, planned - 1
        for _ in range(planned):
            yield self._collate(batch, skipped)
            batch, skipped = [], 0

    def _collate(self, batch, skipped):
        size = self.cfg.model.image_size
        images = torch.zeros(self.batch_size, 3, size, size, dtype=torch.uint8)
        labels = torch.full((self.batch_size,), -1, dtype=torch.int64)
        for i, (image, label) in enumerate(batch):
            images[i], labels[i] = image, label
        return images, labels, _count(skipped)

    def __iter__(self):
        physical, num_workers = _worker()
        transform = valid_transform(self.cfg)
        for p in range(physical, len(self.parts), num_workers):
            yield from self._batches(self.parts[p], self.planned[p], transform)


def create_valid_loader(cfg, *, world_size: int, rank: int, local_replicas: int = 1):
    """(iterable of (uint8 images, int64 labels with -1 padding, int64 num_skipped (1,)), num_samples).

    Shards (or folder images) are dealt to replicas round-robin, then to loader workers; every
    replica yields the same number of batches of valid_batch_size // world_size (padding batches
    where it has fewer samples). num_samples counts this replica's samples, broken ones included:
    (labels != -1).sum() + sum(num_skipped) == num_samples. Shard sizes come from one read of all
    validation shards here, so every replica knows every replica's batch count. `local_replicas`: the
    processes on this host, which share data.valid_loader_workers."""
    batch_size = cfg.data.valid_batch_size // world_size
    if batch_size < 1:
        raise ValueError(f"data.valid_batch_size={cfg.data.valid_batch_size} is below world_size={world_size}")
    workers = loader_workers(cfg.data.valid_loader_workers, local_replicas)
    num_parts = max(1, workers)
    if cfg.data.format == "imagefolder":
        units, samples = ImageFolder(cfg.data.valid_dataset_shards).samples, _folder_samples
        sizes = [1] * len(units)
    else:
        units, samples = expand_urls(_source(cfg, "valid")), _shard_samples
        sizes = [sum(1 for _ in _tar_records(url)) for url in units]
    # parts[r][p]: unit indices of replica r, worker part p
    parts = [
        [list(range(r, len(units), world_size))[p::num_parts] for p in range(num_parts)] for r in range(world_size)
    ]
    planned = [[math.ceil(sum(sizes[u] for u in part) / batch_size) for part in rp] for rp in parts]
    mine = planned[rank]
    mine[0] += max(map(sum, planned)) - sum(mine)
    dataset = _ValidBatches([[units[u] for u in part] for part in parts[rank]], mine, samples, cfg, batch_size)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=_own_generator(),
        worker_init_fn=ignore_in_loader_worker,
    )
    return loader, sum(sizes[u] for part in parts[rank] for u in part)


class LazyStart:
    """Re-iterable wrapper whose iterator starts lazily: MpDeviceLoader's thread creates the
    iterator outside its try/finally, so an error there (e.g. a worker that cannot start) would
    leave the training loop waiting forever instead of ending the stream."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        yield from self.loader


class DeviceLoader:
    """Re-iterable: each batch's tensors moved to the device. Not accelerator.prepare(loader): the
    data pipeline already shards by rank (as on TPU), and accelerate would shard it again."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def __iter__(self):
        for batch in self.loader:
            yield tuple(t.to(self.device, non_blocking=True) for t in batch)
