"""Checkpoint files: what a trainer checkpoint holds, writing and reading it, and resuming from it.

A checkpoint is a dict of tensors, dicts, lists and Python scalars only, so
`torch.load(path, weights_only=True)` reads it (timm's loader does, and uses its "model" key).
Only the global master calls `save` (one writer per file on pods; output_dir on shared storage).

The device RNG (dropout, drop-path) is the only RNG the training loop draws from: host-side
randomness (augmentation, mixup) is seeded from the data position, so the per-replica device RNG
states a checkpoint holds make resume exact.
"""

from __future__ import annotations

import os
import threading

import torch

from kan_vit.flax import msgpack as flax_msgpack
from kan_vit.training.backend import current, rng_backend
from kan_vit.training.config import Config, to_dict
from kan_vit.training.state import TrainState
from kan_vit.utils.atomic_files import atomic_outputs

LAST, BEST = "last.pth", "best.pth"  # in run.output_dir


def to_cpu(tree):
    """A copy of nested dicts/lists/tuples with every tensor copied to the host (a copy also of a
    tensor already there: a background writer must not see the next update change it)."""
    if torch.is_tensor(tree):
        tensor = tree.detach()
        return tensor.clone() if tensor.device.type == "cpu" else tensor.cpu()
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


def export_flax(flax_params: dict, cfg: Config, target: str) -> None:
    """A checkpoint's weights in the original's format: {run.name}-best/last.msgpack (run.export_flax)."""
    kind = os.path.splitext(target)[0]
    flax_msgpack.save(flax_params, os.path.join(cfg.run.output_dir, f"{cfg.run.name or 'kan_vit'}-{kind}.msgpack"))


class BackgroundWriter:
    """Writes checkpoints in a thread, one at a time, so training waits only for the copy to the
    host. A failed write is raised by the next `write` or `wait`."""

    def __init__(self):
        self._thread, self._error = None, None

    def write(self, ckpt: dict, targets: list[str], cfg: Config, flax_params: dict | None, then=None) -> None:
        """Each of `targets` (LAST, BEST) in run.output_dir, after the previous write finished;
        then `then()` when given."""
        self.wait()
        args = (ckpt, targets, cfg, flax_params, then)
        self._thread = threading.Thread(target=self._write, args=args, daemon=True)
        self._thread.start()

    def _write(self, ckpt, targets, cfg, flax_params, then) -> None:
        try:
            for target in targets:
                save(ckpt, os.path.join(cfg.run.output_dir, target))
                if flax_params is not None:
                    export_flax(flax_params, cfg, target)
            if then is not None:
                then()
        except BaseException as error:  # noqa: BLE001 - handed to the training thread
            self._error = error

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


# --- The trainer's checkpoints ------------------------------------------------------------------


def from_state(state: TrainState, cfg: Config, metrics: dict, rng: list) -> dict:
    """A weights_only-loadable checkpoint, the same on every backend; `rng` holds every replica's
    device RNG state ({"xla": seed} or {"torch": state[, "cuda": state]})."""
    return {
        "model": to_cpu(current().unwrap(state.model).state_dict()),  # no DDP "module." prefix
        "optimizer": to_cpu(state.optimizer.state_dict()),
        "step": state.host_step,
        "train_batch": state.host_step * cfg.optim.grad_accum,  # the data stream position per replica
        "meters": to_cpu({"loss_sum": state.loss_sum, "acc_sums": state.acc_sums, "skipped": state.skipped}),
        "rng": rng,
        "best_acc1": state.best_acc1,
        "metrics": metrics,
        "config": to_dict(cfg),
    }


def restore(state: TrainState, ckpt: dict, device: torch.device) -> None:
    """Continue `state` from `ckpt` on this replica: weights, optimizer, step, meters, device RNG."""
    backend = current()
    _check_resumable(ckpt["rng"], backend.world_size, backend.name)
    backend.unwrap(state.model).load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.host_step, state.best_acc1 = ckpt["step"], ckpt["best_acc1"]
    state.step = torch.tensor(ckpt["step"], dtype=torch.int64, device=device)
    state.loss_sum = ckpt["meters"]["loss_sum"].to(device)
    state.acc_sums = ckpt["meters"]["acc_sums"].to(device)
    state.skipped = ckpt["meters"]["skipped"].to(device)
    backend.set_rng_state(ckpt["rng"][backend.rank])


def _check_resumable(rng: list[dict], replicas: int, backend_name: str) -> None:
    """A checkpoint resumes on the backend and replica count that wrote it (its RNG states are theirs)."""
    written_on = rng_backend(rng[0])
    if written_on != backend_name:
        raise ValueError(
            f"the checkpoint was written on {written_on}, this run is on {backend_name}: its device "
            "RNG states do not carry over. Fine-tune from it instead: set "
            "model.pretrained_ckpt=PATH and run.resume=never"
        )
    if len(rng) != replicas:
        raise ValueError(
            f"the checkpoint was written by {len(rng)} replicas, this run has {replicas}: resume "
            "with the same number of devices, or set run.resume=never"
        )


def resume_path(cfg: Config) -> str | None:
    """run.resume: auto -> output_dir/last.pth when it exists; never -> None; else the given file."""
    if cfg.run.resume == "never":
        return None
    if cfg.run.resume == "auto":
        path = os.path.join(cfg.run.output_dir, LAST)
        return path if os.path.exists(path) else None
    return cfg.run.resume


def check_resume(cfg: Config, world_size: int) -> None:
    """Before spawning: the checkpoint to resume from (if any) was written by `world_size` replicas
    of the current backend.
    Reads only the checkpoint's small entries (memory-mapped); raises ValueError otherwise."""
    path = resume_path(cfg)
    if path is None:
        return
    try:
        rng = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["rng"]
    except (OSError, RuntimeError, KeyError, EOFError) as error:
        raise ValueError(
            f"{path} is not a readable trainer checkpoint ({error}): point run.resume at "
            "one, or set run.resume=never to start over"
        ) from None
    try:
        _check_resumable(rng, world_size, current().name)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
