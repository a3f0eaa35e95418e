"""Train and validation loaders (docs/original.md, "Data"): uint8 batches for the device.

Formats: webdataset tar shards (keys `jpg`/`cls`; local paths, brace patterns, URLs through
webdataset's `gopen`, e.g. `pipe:gsutil cat ...` or http), torchvision ImageFolder directories, and
the embedded demos (`demo_digits`, `demo_mnist`: written as shards, then read like ImageNet).

Determinism: shard and sample order come from `data.shuffle_seed`; each augmentation is seeded by
(shuffle_seed, rank, worker, stream position) and each batch's mixup/cutmix by (mixup_seed + rank,
batch index), so `start_batch` reproduces an uninterrupted run's batches bit for bit (same
world_size and worker count). Loader workers save their stream state every SNAPSHOT_EVERY
batches (`StreamSnapshots`); a loader started at `start_batch` continues from the newest state
before it and decodes (without augmenting) only the batches after that state, so a resume costs
the same at any point of a run; without a state it replays the decode of the whole skipped
stream (needed to find where corrupt samples fell).

Bad data is never fatal: an undecodable image, a sample without `jpg`/`cls`, or a truncated tar
member is dropped and counted in each batch's `num_skipped`.

`LazyStart` and `DeviceLoader` wrap a loader for the device, in each backend's `device_loader`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import math
import os
import random
import tarfile
import warnings
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
from kan_vit.training.demo_digits import DEMOS, prepare_demo
from kan_vit.training.preemption import end_loader_workers_at_exit, ignore_in_loader_worker
from kan_vit.training.seeding import derive_seed, seeded_host_rngs
from kan_vit.training.transforms import train_transform, valid_transform
from kan_vit.utils.atomic_files import atomic_outputs

SKIP = None  # an item that stands for one dropped sample
_SHUFFLE_BUFFER, _SHUFFLE_INITIAL = 1000, 100  # webdataset's defaults, as the original used
_DECODE_ERRORS = (KeyError, ValueError, OSError, SyntaxError, EOFError, Image.DecompressionBombError)


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _source(cfg, split: str) -> str:
    if cfg.data.format in DEMOS:
        return prepare_demo(cfg.data.format, cfg.data.cache_dir)[("train", "valid").index(split)]
    return getattr(cfg.data, f"{split}_dataset_shards")


def check_dataset(cfg) -> None:
    """Raise ValueError when a split's shard pattern or folder is unset, empty or missing.

    URLs are only expanded, never opened. For the embedded demos, writes their shards."""
    fmt = cfg.data.format
    if fmt in DEMOS:  # written here, once, before any process starts
        try:
            prepare_demo(fmt, cfg.data.cache_dir)
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


def _cycle_url(urls: list[str], seed: int, index: int) -> str:
    """The index-th shard of the shard list reshuffled by seed every pass, forever."""
    epoch, offset = divmod(index, len(urls))
    return urls[_pass_order(len(urls), seed, epoch)[offset]]


@functools.lru_cache(maxsize=4)
def _pass_order(num_urls: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(np.random.default_rng([seed, epoch]).permutation(num_urls).tolist())


# Repeated augmentation across replicas, the stream form of RepeatAugSampler. The original
# reordered each host batch so the copies of an image went to different local devices; with one
# process per device, replicas must share the order instead: replicas form groups of k (above), a
# group reads one shard subsequence (every (world_size/k)-th shard) in one sample order, conceptually
# repeats sample i at positions i*R .. i*R+R-1 and deals position v to replica v % k. So the R
# copies land on R different replicas (when world_size >= R) and each group reads 1/(world_size/k)
# of the shards. A dropped sample is counted once, by the replica holding its copy at position i*R.
class _ShardStream:
    """One loader worker's items, (RGB image, label, position) or SKIP, from webdataset shards:
    the worker's shard subsequence, webdataset's shuffle buffer (the draws of `wds.shuffle(
    _SHUFFLE_BUFFER, _SHUFFLE_INITIAL)`, so its order), then the copies of each sample.

    `state()` (between items; JSON) names records by reference, [shard number in the worker's
    subsequence, record number in the shard]: how far the current shard is read, the buffer's
    records, the sample whose copies are being dealt, the shuffle RNG and the counters. Built
    from a state, the stream reads only the shards those references name (the ones open at that
    point) and continues exactly as the stream that saved it."""

    def __init__(self, urls, cfg, world_size, rank, worker, num_workers, state=None):
        self.urls, self.seed, self.repeats = urls, cfg.data.shuffle_seed, cfg.augment.augment_repeats
        self.k = _repeat_group(world_size, self.repeats)
        groups, (group, self.j) = world_size // self.k, divmod(rank, self.k)
        self.first, self.stride = group + worker * groups, groups * num_workers  # into the shard cycle
        self.rng = random.Random(derive_seed(self.seed, 0, group, worker))
        # next record to read (shard, member); readable records of that shard so far; barren shards in a row
        self.shard, self.member, self.count, self.barren = 0, 0, 0, 0
        self.buffer = []  # [[shard, member], record] pairs, in webdataset's buffer order
        self.i = 0  # the next sample to leave the buffer
        self.sample, self.sample_ref, self.copies = None, None, []  # the sample being dealt, its positions left
        self._records = None  # the open shard's records from `member` on
        if state is not None:
            self._restore(state)

    def _url(self, shard: int) -> str:
        return _cycle_url(self.urls, self.seed, self.first + shard * self.stride)

    def state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "read": [self.shard, self.member, self.count, self.barren],
            "buffer": [ref for ref, _ in self.buffer],
            "i": self.i,
            "sample": [self.sample_ref, self.copies] if self.copies else None,
            "rng": [version, list(internal), gauss],
        }

    def _restore(self, state: dict) -> None:
        self.shard, self.member, self.count, self.barren = state["read"]
        self.i = state["i"]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        refs = [tuple(ref) for ref in state["buffer"]] + ([tuple(state["sample"][0])] if state["sample"] else [])
        records = {}
        for shard in sorted({shard for shard, _ in refs}):  # one read of each named shard, up to its last reference
            last = max(member for s, member in refs if s == shard)
            for member, record in itertools.islice(enumerate(_tar_records(self._url(shard))), last + 1):
                records[shard, member] = record
        self.buffer = [[list(ref), records[ref]] for ref in refs[: len(state["buffer"])]]
        if state["sample"]:
            self.sample_ref, self.copies = state["sample"]
            self.sample = _decode(records[tuple(self.sample_ref)])

    def _read(self):
        """The next record and its reference; raises when a whole pass of shards in a row held no
        readable sample (a dataset with nothing usable, or unreachable, would otherwise hang)."""
        while True:
            if self._records is None:
                self._records = itertools.islice(enumerate(_tar_records(self._url(self.shard))), self.member, None)
            for member, record in self._records:
                self.member, self.count = member + 1, self.count + (record is not SKIP)
                return [self.shard, member], record
            self.barren = 0 if self.count else self.barren + 1
            if self.barren >= len(self.urls):
                raise RuntimeError(
                    f"{self.barren} shards in a row held no readable sample (last {self._url(self.shard)}): "
                    "check the data"
                )
            self.shard, self.member, self.count, self._records = self.shard + 1, 0, 0, None

    def _next_shuffled(self):
        """One step of webdataset's shuffle (`webdataset.filters._shuffle`) on an endless stream."""
        while True:
            self.buffer.append(self._read())
            if len(self.buffer) < _SHUFFLE_BUFFER:
                self.buffer.append(self._read())
            if len(self.buffer) >= min(_SHUFFLE_INITIAL, _SHUFFLE_BUFFER):
                k = self.rng.randint(0, len(self.buffer) - 1)
                picked, self.buffer[k] = self.buffer[k], self.buffer[-1]
                self.buffer.pop()
                return picked

    def __iter__(self):
        while True:
            while self.copies:
                position = self.copies.pop(0)
                yield self.sample + (position,)
            ref, record = self._next_shuffled()
            i, self.i = self.i, self.i + 1
            positions = [v for v in range(i * self.repeats, (i + 1) * self.repeats) if v % self.k == self.j]
            if not positions:
                continue
            sample = _decode(record)
            if sample is SKIP:
                if (i * self.repeats) % self.k == self.j:
                    yield SKIP
                continue
            self.sample, self.sample_ref, self.copies = sample, ref, positions


class _FolderStream:
    """One loader worker's items from an ImageFolder through timm's RepeatAugSampler, pass after
    pass; its state is the position of its next item, and a stream built from it starts there
    without loading the images before it."""

    def __init__(self, dataset, cfg, world_size, rank, worker, num_workers, state=None):
        self.dataset, self.seed, self.rank, self.world_size = dataset, cfg.data.shuffle_seed, rank, world_size
        self.repeats = cfg.augment.augment_repeats
        self.sampler = RepeatAugSampler(
            dataset, num_replicas=world_size, rank=rank, num_repeats=self.repeats, shuffle=True
        )
        self.next, self.stride = (state["next"] if state is not None else worker), num_workers

    def state(self) -> dict:
        return {"next": self.next}

    def __iter__(self):
        per_pass = len(self.sampler)
        while True:
            epoch, start = divmod(self.next, per_pass)
            self.sampler.set_epoch(derive_seed(self.seed, epoch))  # the sampler seeds by epoch alone: fold in the seed
            order = list(self.sampler)
            for p in range(start, per_pass, self.stride):
                position, self.next = self.next, self.next + self.stride
                owner = (self.rank + p * self.world_size) % self.repeats == 0  # this replica holds copy 0
                path, label = self.dataset.samples[order[p]]
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


def _batch_loader(dataset: IterableDataset, workers: int) -> DataLoader:
    """A DataLoader of a dataset that yields whole batches, in `workers` processes kept across passes.

    Its own generator takes the DataLoader's per-iterator seed draw (unused: workers seed from the
    data position), which would otherwise advance the global torch RNG: on a CPU device that is the
    dropout RNG, and a resumed run, which starts its iterator at another point, would drift from an
    uninterrupted one. The workers ignore SIGTERM / SIGINT and end with their trainer
    (`kan_vit.training.preemption`)."""
    if workers:
        end_loader_workers_at_exit()
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator(),
        worker_init_fn=ignore_in_loader_worker,
    )


def _worker():
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


SNAPSHOT_EVERY = 16  # a loader worker saves its stream state before every 16th of its batches


class StreamSnapshots:
    """Loader workers' stream states, `{key}-w{worker}-{batch}.json` in one directory (the run's
    output_dir/stream): the state from which a worker's stream yields batch `batch` next. `key`
    names everything the states depend on (data, seed, repeats, replicas, rank, workers, batch)."""

    def __init__(self, directory: str, key: str):
        self.directory, self.key = directory, key

    def save(self, worker: int, batch: int, state: dict) -> None:
        os.makedirs(self.directory, exist_ok=True)
        with atomic_outputs(os.path.join(self.directory, f"{self.key}-w{worker}-{batch}.json")) as (tmp,):
            with open(tmp, "w", encoding="utf-8") as file:
                json.dump(state, file)

    def newest(self, worker: int, at_most: int) -> tuple[int, dict] | None:
        """(batch, state) of this worker's newest state for a batch <= at_most, or None."""
        batches = [b for b in _snapshot_batches(self.directory, f"{self.key}-w{worker}") if b <= at_most]
        if not batches:
            return None
        with open(os.path.join(self.directory, f"{self.key}-w{worker}-{max(batches)}.json"), encoding="utf-8") as file:
            return max(batches), json.load(file)


def _snapshot_batches(directory: str, prefix: str) -> list[int]:
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return [int(n[len(prefix) + 1 : -5]) for n in names if n.startswith(prefix + "-") and n.endswith(".json")]


def prune_stream_snapshots(directory: str, batch: int) -> None:
    """After a checkpoint at stream batch `batch` is written: remove each worker's states older than
    its newest one <= batch (the one a resume from that checkpoint starts from)."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    for prefix in {n.rsplit("-", 1)[0] for n in names if n.endswith(".json")}:
        batches = _snapshot_batches(directory, prefix)
        keep = max((b for b in batches if b <= batch), default=None)
        for b in batches:
            if keep is not None and b < keep:
                with contextlib.suppress(FileNotFoundError):  # another writer's prune got there first
                    os.remove(os.path.join(directory, f"{prefix}-{b}.json"))


class _TrainBatches(IterableDataset):
    """Infinite fixed-size micro-batches; logical worker w makes batches w, w + W, w + 2W, ...

    With `snapshots`, each worker saves its stream state every SNAPSHOT_EVERY of its batches, and
    a stream started at `start_batch` begins at the newest state saved before it: it decodes (and
    counts through, without augmenting) at most SNAPSHOT_EVERY - 1 of its batches, not the whole
    stream since batch 0 (which it replays when no state is there)."""

    def __init__(self, items, cfg, rank: int, start_batch: int, batch_size: int, snapshots=None):
        self.items, self.cfg, self.rank, self.start_batch, self.batch_size = items, cfg, rank, start_batch, batch_size
        self.snapshots = snapshots

    def __iter__(self):
        physical, num_workers = _worker()
        worker = (physical + self.start_batch) % num_workers  # the DataLoader asks worker 0 first
        transform, seed = train_transform(self.cfg), self.cfg.data.shuffle_seed
        found = self.snapshots.newest(worker, self.start_batch) if self.snapshots is not None else None
        batch_index, state = found if found is not None else (worker, None)  # this worker's: every num_workers-th
        items = self.items(worker, num_workers, state)
        batch, skipped = [], 0
        for item in items:
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
            if self.snapshots is not None and (batch_index // num_workers) % SNAPSHOT_EVERY == 0:
                self.snapshots.save(worker, batch_index, items.state())


def _snapshot_key(cfg, source, world_size: int, rank: int, workers: int, batch_size: int) -> str:
    a = cfg.augment
    what = [cfg.data.format, source, cfg.data.shuffle_seed, a.augment_repeats, world_size, rank, workers, batch_size]
    return hashlib.sha1(json.dumps(what).encode()).hexdigest()[:16]


def create_train_loader(
    cfg,
    *,
    world_size: int,
    rank: int,
    start_batch: int = 0,
    local_replicas: int = 1,
    snapshot_dir: str | None = None,
):
    """Infinite iterable of (uint8 images (b, 3, S, S), float32 targets (b, labels), int64 num_skipped (1,))
    with b = train_batch_size // world_size // grad_accum, yielding batches start_batch, start_batch + 1, ...
    `local_replicas`: the processes on this host, which share data.train_loader_workers.
    `snapshot_dir`: where the loader workers keep their stream states (`StreamSnapshots`), so a
    later loader reaches its start_batch in a time independent of it."""
    batch_size = cfg.data.train_batch_size // world_size // cfg.optim.grad_accum
    if batch_size < 1 or cfg.augment.augment_repeats < 1 or not cfg.model.labels:
        raise ValueError(
            f"train loader needs data.train_batch_size >= world_size * optim.grad_accum "
            f"({cfg.data.train_batch_size} < {world_size} * {cfg.optim.grad_accum}?), "
            f"augment.augment_repeats >= 1 and model.labels set"
        )
    if cfg.data.format == "imagefolder":
        source = cfg.data.train_dataset_shards
        items = functools.partial(_FolderStream, ImageFolder(source), cfg, world_size, rank)  # picklable: spawn
    else:
        source = expand_urls(_source(cfg, "train"))
        items = functools.partial(_ShardStream, source, cfg, world_size, rank)  # picklable: spawn-started workers
    workers = loader_workers(cfg.data.train_loader_workers, local_replicas)
    snapshots = None
    if snapshot_dir is not None:
        snapshots = StreamSnapshots(snapshot_dir, _snapshot_key(cfg, source, world_size, rank, workers, batch_size))
    return _batch_loader(_TrainBatches(items, cfg, rank, start_batch, batch_size, snapshots), workers)


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
    return _batch_loader(dataset, workers), sum(sizes[u] for part in parts[rank] for u in part)


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
