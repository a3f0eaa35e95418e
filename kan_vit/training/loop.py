"""The trainer (docs/original.md, "Training"): one process per XLA device (TPU chip) via `xmp.spawn`, or
one process per GPU (or CPU process) via accelerate. The loop is written once; what differs
between the two runtimes is a `kan_vit.training.backend` method (`backend.current()`).

Reads like PyTorch/XLA's ImageNet reference script: `train` builds everything, then runs a linear
loop of `train_step` and, every eval_interval updates and at the end, `evaluate` + checkpoints;
also a checkpoint every run.checkpoint_interval updates / run.checkpoint_minutes, and a stop
with a checkpoint at SIGTERM / SIGINT (`kan_vit.training.preemption`).

XLA rules, all kept in `train_step` / `evaluate` / `normalize` (harmless under accelerate, where
`backend.sync` is a no-op and step closures run at once):
- uint8 images travel to the device (MpDeviceLoader) and are normalised there;
- every scalar that changes between updates (step, lr, interval sums, the first non-finite step)
  is a device tensor, so each update runs the same compiled graph;
- nothing inside a step reads a device value: log values are read in a step closure (`after_step`) after
  the step's graph ran, evaluation reads its sums once at its end, checkpoints at their boundary.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from kan_vit.flax.layout import timm_to_flax
from kan_vit.training import checkpoint, kan_health, preemption
from kan_vit.training.backend import XlaBackend, current
from kan_vit.training.config import Config, from_dict, to_dict
from kan_vit.training.config import save as save_config
from kan_vit.training.data import create_train_loader, create_valid_loader, prune_stream_snapshots
from kan_vit.training.metrics_log import RunLogger
from kan_vit.training.model_factory import build_model
from kan_vit.training.optim import create_optimizer, lr_at, set_lr
from kan_vit.training.state import TrainState

_logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
STREAM_DIR = "stream"  # the loader workers' stream states (kan_vit.training.data.StreamSnapshots)


class DivergenceError(RuntimeError):
    """The training loss became NaN/inf."""


def build_state(cfg: Config, device: torch.device) -> TrainState:
    model = build_model(cfg).to(device)
    optimizer = create_optimizer(model, cfg.optim)  # after .to(device): the optimizer holds device params
    model = current().prepare(model)  # accelerate: DDP (and torch.compile); the same parameters
    zero = lambda dtype: torch.zeros((), dtype=dtype, device=device)  # noqa: E731
    state = TrainState(
        model,
        optimizer,
        step=zero(torch.int64),
        loss_sum=zero(torch.float32),
        acc_sums=torch.zeros(2, device=device),
        skipped=zero(torch.int64),
        first_bad_step=zero(torch.int64) - 1,
        health=kan_health.KanHealth(model, device) if cfg.run.kan_health else None,
    )
    current().sync()  # the zero state becomes device data: the first update runs the steady graph
    return state


@functools.lru_cache
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean/std as (1, 3, 1, 1) device tensors, uploaded once instead of every step."""
    # shaped on the host: a view taken on the device would stay pending and join the first step's graph
    return (
        torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1).to(device),
        torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1).to(device),
    )


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 (x / 255 - mean) / std, on the device (the host only sends bytes)."""
    mean, std = _mean_std(images.device)
    return (images.float() / 255.0 - mean) / std


def _per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, criterion: str) -> torch.Tensor:
    """`ce`: softmax cross entropy vs soft targets; `bce`: sigmoid BCE vs (targets > 0), mean over classes."""
    logits = logits.float()
    if criterion == "bce":
        return F.binary_cross_entropy_with_logits(logits, (targets > 0).float(), reduction="none").mean(-1)
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)


def _train_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[acc1, acc5] batch means as the original: a prediction is right when its class has the
    (mixed, smoothed) target's maximum weight (ties all count)."""
    labels = targets == targets.max(-1, keepdim=True).values
    hits = labels.gather(1, logits.topk(min(5, logits.shape[-1]), dim=-1).indices)
    return torch.stack([hits[:, 0], hits.any(-1)]).float().mean(1)


def train_step(state: TrainState, micro_batches: list, cfg: Config, logger: RunLogger | None = None) -> None:
    """One optimizer update from optim.grad_accum micro-batches of (uint8 images, soft targets,
    num_skipped) already on the device; ends the step's graph (backend.sync)."""
    backend, model, optimizer, o = current(), state.model, state.optimizer, cfg.optim
    model.train()
    lr = lr_at(state.step, o.learning_rate, cfg.schedule.warmup_steps, cfg.schedule.training_steps)
    set_lr(optimizer, lr)  # a device tensor: no new graph constant per step
    loss, acc, skipped = 0.0, 0.0, 0
    for i, (images, targets, num_skipped) in enumerate(micro_batches):
        with backend.micro_batch(model, last=i == len(micro_batches) - 1):
            with backend.autocast(cfg.run.bf16):
                logits = model(normalize(images))
                micro_loss = _per_sample_loss(logits, targets, cfg.augment.criterion).mean()
            (micro_loss / o.grad_accum).backward()  # the update uses the mean of the micro-batch gradients
        loss, skipped = loss + micro_loss.detach() / o.grad_accum, skipped + num_skipped.sum()
        acc = acc + _train_accuracy(logits.detach(), targets) / o.grad_accum
    backend.reduce_gradients(optimizer)  # a mean over replicas
    if o.clip_grad > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)  # the norm before clipping
    elif state.health is not None:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if state.health is not None:
        state.health.observe_grad_norm(grad_norm)
    optimizer.step()
    # applied, the gradients are dead: dropped before the sync, they are not among the step graph's
    # outputs (XLA would write them to device memory and keep them until the next update)
    optimizer.zero_grad(set_to_none=True)

    # Interval metrics stay on the device; the sums restart after each logged update. The
    # restart is a torch.where on the step, so log and non-log updates share one graph.
    restart = state.step % cfg.schedule.log_interval == 0
    loss = backend.all_reduce_sum(loss) / backend.world_size
    acc = backend.all_reduce_sum(acc) / backend.world_size
    skipped = backend.all_reduce_sum(skipped)
    state.loss_sum = torch.where(restart, 0.0, state.loss_sum) + loss
    state.acc_sums = torch.where(restart, 0.0, state.acc_sums) + acc
    state.skipped = torch.where(restart, 0, state.skipped) + skipped
    state.first_bad_step = torch.where(
        (state.first_bad_step < 0) & ~torch.isfinite(loss), state.step + 1, state.first_bad_step
    )
    if state.health is not None:
        state.health.end_update(restart, lambda value: backend.all_reduce_sum(value) / backend.world_size)
    state.step = state.step + 1
    state.host_step += 1
    if state.host_step % cfg.schedule.log_interval == 0 or state.host_step == cfg.schedule.training_steps:
        interval = (state.host_step - 1) % cfg.schedule.log_interval + 1
        health = state.health.tensors() if state.health is not None else None
        backend.after_step(
            _log_train,
            (
                state,
                logger,
                state.host_step,
                interval,
                state.loss_sum,
                state.acc_sums,
                lr,
                state.skipped,
                state.first_bad_step,
                health,
            ),
        )
    backend.sync()


def _log_train(state, logger, step, interval, loss_sum, acc_sums, lr, skipped, first_bad_step, health) -> None:
    """Runs after the step's graph executed: reading the tensors is a copy, not a sync (.cpu()
    rather than .item(), which torch_xla runs as an aten fallback). On a GPU it waits for the step."""
    first_bad = int(first_bad_step.cpu())
    if first_bad >= 0:
        state.diverged_at = first_bad
    if logger is not None:
        acc1, acc5 = (acc_sums.cpu() / interval).tolist()
        metrics = {
            "train/loss": float(loss_sum.cpu()) / interval,
            "train/acc1": acc1,
            "train/acc5": acc5,
            "train/lr": float(lr.cpu()),
            "data/skipped": int(skipped.cpu()),
        }
        if health is not None:
            metrics.update(kan_health.metrics(*health, interval))
        logger.train(step, metrics)


EVAL_SUMS = 5  # eval_batch_sums: loss, correct1, correct5, count, skipped


def eval_batch_sums(model: torch.nn.Module, images, labels, num_skipped, cfg: Config) -> torch.Tensor:
    """One evaluation batch's [loss sum, top-1 hits, top-5 hits, valid count, skipped] (padding has
    label -1 and counts nowhere)."""
    with current().autocast(cfg.run.bf16):
        logits = model(normalize(images))
    valid = labels >= 0
    target = labels.clamp(min=0)
    one_hot = F.one_hot(target, cfg.model.labels).float()
    loss = _per_sample_loss(logits, one_hot, cfg.augment.criterion)
    top = logits.topk(min(5, cfg.model.labels), dim=-1).indices == target[:, None]
    return torch.stack(
        [
            torch.where(valid, loss, 0.0).sum(),
            (top[:, 0] & valid).sum().float(),
            (top.any(-1) & valid).sum().float(),
            valid.sum().float(),
            num_skipped.sum().float(),
        ]
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, cfg: Config) -> dict:
    """acc1 / acc5 / loss over the validation set, each image counted once across replicas
    (padding has label -1). Sums stay on the device until one read at the end."""
    backend = current()
    model.eval()
    sums = None
    for images, labels, num_skipped in loader:
        batch = eval_batch_sums(model, images, labels, num_skipped, cfg)
        sums = batch if sums is None else sums + batch
        backend.sync()
    sums = backend.all_reduce_sum(sums)
    backend.sync()  # read the reduced sums only after their graph ran
    loss_sum, correct1, correct5, count, skipped = sums.cpu().double().tolist()
    return {
        "val/loss": loss_sum / count,
        "val/acc1": correct1 / count,
        "val/acc5": correct5 / count,
        "val/count": int(count),
        "val/skipped": int(skipped),
    }


def seed_replica(cfg: Config, rank: int) -> None:
    """model.dropout_seed + replica index for dropout/droppath (the original's per-process seed):
    the device RNG, the only RNG the loop draws from (see `kan_vit.training.checkpoint`)."""
    current().seed_rng(cfg.model.dropout_seed + rank)


# --- The loop ----------------------------------------------------------------------------------


def train(cfg: Config) -> dict:
    """Train on this process's device; returns the last evaluation's metrics."""
    backend = current()
    device, world_size, rank = backend.device, backend.world_size, backend.rank
    master = rank == 0  # the global master: the only writer of files in output_dir
    if master:
        os.makedirs(cfg.run.output_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run.output_dir, CONFIG_FILE))

    state = build_state(cfg, device)
    path = checkpoint.resume_path(cfg)
    ckpt = checkpoint.load(path) if path is not None else None
    # A collective: before any RNG state is set.
    steps = [step for (step,) in backend.all_gather_ints([ckpt["step"] if ckpt is not None else 0])]
    if len(set(steps)) > 1:  # e.g. output_dir on each host's local disk: only host 0 sees last.pth
        raise RuntimeError(
            f"replicas would resume at different steps {sorted(set(steps))}: put "
            "run.output_dir on storage every host sees (or set run.resume=never)"
        )
    seed_replica(cfg, rank)
    if ckpt is not None:
        checkpoint.restore(state, ckpt, device)
    logger = RunLogger(cfg, master, start_step=state.host_step)
    if ckpt is not None:
        logger.info(f"resuming from {path} at step {state.host_step}")

    start_batch = ckpt["train_batch"] if ckpt is not None else 0  # the stream continues where it stopped
    local = backend.local_process_count  # the loader workers in the config are per host
    train_loader = backend.device_loader(
        create_train_loader(
            cfg,
            world_size=world_size,
            rank=rank,
            start_batch=start_batch,
            local_replicas=local,
            snapshot_dir=os.path.join(cfg.run.output_dir, STREAM_DIR),
        )
    )
    valid_data, _ = create_valid_loader(cfg, world_size=world_size, rank=rank, local_replicas=local)
    valid_loader = backend.device_loader(valid_data)
    batches = iter(train_loader)
    s = cfg.schedule
    metrics, compiles_at_last_eval = ckpt["metrics"] if ckpt is not None else {}, None
    writer, last_write = checkpoint.BackgroundWriter(), time.monotonic()
    while state.host_step < s.training_steps:
        try:
            micro_batches = [next(batches) for _ in range(cfg.optim.grad_accum)]
        except StopIteration:  # the stream is infinite: it ended only because its thread failed
            raise RuntimeError("the training data loader failed; its error is printed above") from None
        train_step(state, micro_batches, cfg, logger)
        if state.diverged_at >= 0:
            raise DivergenceError(_diverged_message(state.diverged_at, cfg))
        step = state.host_step
        at_end = step == s.training_steps
        evaluating = at_end or (s.eval_interval and step % s.eval_interval == 0)
        stop_signal, clock_due = _agree_on_stop(cfg, last_write) if step % AGREE_EVERY == 0 else (0, False)
        by_interval = cfg.run.checkpoint_interval and step % cfg.run.checkpoint_interval == 0
        if not (evaluating or stop_signal or clock_due or by_interval):
            continue
        first_bad = int(state.first_bad_step.cpu())  # a boundary sync: never checkpoint a diverged model
        if first_bad >= 0:
            raise DivergenceError(_diverged_message(first_bad, cfg))
        targets = [checkpoint.LAST]
        if evaluating:
            metrics = evaluate(state.model, valid_loader, cfg)
            compiles = backend.compile_count()  # logged at every evaluation: a recompiling step shows at once
            logger.eval(step, metrics if compiles is None else {**metrics, "perf/compiles": compiles})
            if compiles_at_last_eval is not None and compiles > compiles_at_last_eval:
                logger.info(
                    f"warning: {compiles - compiles_at_last_eval} graph compilations since the last evaluation: "
                    "a step's graph changed (PT_XLA_DEBUG_LEVEL=2 prints why on XLA)"
                )
            compiles_at_last_eval = compiles
            # Evaluate before writing `last` (the original writes it first): every checkpoint then
            # includes its evaluation, so a resumed run repeats exactly what an uninterrupted one does.
            if metrics["val/acc1"] > state.best_acc1:
                targets = [checkpoint.BEST, checkpoint.LAST]
            state.best_acc1 = max(state.best_acc1, metrics["val/acc1"])
        _write_checkpoint(state, cfg, metrics, targets, writer, logger)
        last_write = time.monotonic()
        if stop_signal and not at_end:
            writer.wait()  # last.pth is complete before the process exits
            logger.info(f"stopped by {preemption.signal_name(stop_signal)} at step {step}")
            logger.close()
            raise preemption.Preempted(stop_signal, step)
    writer.wait()
    logger.close()
    return metrics


# Every AGREE_EVERY updates the replicas gather their signal notes and checkpoint clocks: a read
# of the device, so not every update (the steady update never waits for the device), and a fixed
# count of updates, so every replica takes part in the same gather.
AGREE_EVERY = 10


def _agree_on_stop(cfg: Config, last_write: float) -> tuple[int, bool]:
    """(the signal to stop at or 0, whether run.checkpoint_minutes passed), the same on every
    replica: a signal to any one replica stops them all after this update."""
    minutes = cfg.run.checkpoint_minutes
    due = minutes > 0 and time.monotonic() - last_write >= 60 * minutes
    notes = current().all_gather_ints([preemption.requested(), int(due)])  # a collective
    return next((signum for signum, _ in notes if signum), 0), any(d for _, d in notes)


def _write_checkpoint(state: TrainState, cfg: Config, metrics: dict, targets: list[str], writer, logger) -> None:
    """Every replica calls it (the RNG gather is a collective); the master copies the state to the
    host, the only time training waits, and hands the file writes to the background `writer`."""
    backend = current()
    all_rng = backend.gather_rng_states()
    if backend.rank == 0:
        started = time.perf_counter()
        ckpt = checkpoint.from_state(state, cfg, metrics, all_rng)
        flax_params = timm_to_flax(ckpt["model"], cfg.model.heads) if cfg.run.export_flax else None
        # then the stream states older than the one a resume from this checkpoint starts at go
        stream_dir = os.path.join(cfg.run.output_dir, STREAM_DIR)
        prune = functools.partial(prune_stream_snapshots, stream_dir, ckpt["train_batch"])
        writer.write(ckpt, targets, cfg, flax_params, then=prune)
        logger.info(
            f"checkpoint at step {state.host_step}: {time.perf_counter() - started:.2f} s copying to the host, "
            f"writing {' and '.join(targets)} in the background"
        )
    backend.set_rng_state(all_rng[backend.rank])  # continue from exactly the state a resumed run restores


def _diverged_message(step: int, cfg: Config) -> str:
    return (
        f"the training loss is not finite at step {step}; stopping. The last checkpoint in "
        f"{cfg.run.output_dir} (if any) is from before it and untouched: lower optim.learning_rate "
        "or raise schedule.warmup_steps / set optim.clip_grad, then rerun to resume"
    )


def _mp_fn(index: int, cfg_dict: dict) -> None:
    cfg = from_dict(cfg_dict)
    if cfg.run.compile_cache_dir:
        XlaBackend.initialize_compile_cache(cfg.run.compile_cache_dir, index)
    train(cfg)


def launch(cfg: Config) -> None:
    """Train in every replica the backend runs on this host (XLA: one per device; accelerate: this
    process); the config travels as a plain dict."""
    current().spawn(_mp_fn, (to_dict(cfg),), stop_on_signal=True)
