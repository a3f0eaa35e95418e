"""Where the trainer runs, each backend against one replica or process.

XLA: real multi-replica runs on the CPU: `CPU_NUM_DEVICES=N` makes xmp.spawn run N XLA replicas
(threads of one process) whose collectives are XLA's own, as between the chips of a TPU host.
Every XLA test here checks its replica count, so none of them can pass with one replica.

accelerate: the trainer in real CPU processes (torchrun, gloo), in processes where torch_xla
cannot be imported: DDP's gradient average, the trainer's collectives, resume and the checkpoint
format shared with the XLA backend."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch_xla
from cpu_processes import torchrun, without_torch_xla_env
from kill_and_resume import assert_resume_matches_uninterrupted, kill_at_first_checkpoint, stop_with_sigterm
from test_train import DEMO, EVALUATE, LAUNCH, ROOT, tiny_overrides

from kan_vit.training import checkpoint, loop
from kan_vit.training.config import load, to_dict
from kan_vit.training.metrics_log import RunLogger, read_metrics

JOBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "replica_jobs.py")
TRAIN_GPU = os.path.join(ROOT, "launch", "train_gpu.py")
BATCH, CLASSES, SIZE = 16, 10, 32


def _replica_env(num_replicas: int) -> dict:
    return dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(num_replicas))


def _run_job(job: str, cfgs: dict, data_path, out, num_replicas: int, accelerate: bool = False) -> list[dict]:
    """JOB in `num_replicas` XLA replicas, or accelerate processes (torchrun, no torch_xla)."""
    args = [job, json.dumps({k: to_dict(c) for k, c in cfgs.items()}), str(data_path), str(out)]
    if accelerate:
        command, env = torchrun(num_replicas, JOBS, *args, "accelerate"), without_torch_xla_env(out)
    else:
        command, env = [sys.executable, JOBS, *args], _replica_env(num_replicas)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = [torch.load(out / f"{job}_{rank}.pt") for rank in range(num_replicas)]
    assert all(r["world_size"] == num_replicas for r in results)
    return results


def _valid_parts(num_replicas: int, generator) -> list[dict]:
    """Replica r holds 2r + 1 real images in a batch of 8 (label -1 pads): an uneven split."""
    parts = []
    for rank in range(num_replicas):
        labels = torch.full((8,), -1)
        labels[: 2 * rank + 1] = torch.randint(0, CLASSES, (2 * rank + 1,), generator=generator)
        images = torch.randint(0, 256, (8, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
        parts.append({"images": images, "labels": labels})
    return parts


def _args(overrides: list[str]) -> list[str]:
    return ["--config", DEMO] + [a for o in overrides for a in ("--set", o)]


def _check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# --- XLA replicas -------------------------------------------------------------------------------


@pytest.mark.slow
def test_replicas_with_batch_shares_update_like_one_replica_with_the_whole_batch(tmp_path):
    """Four replicas, one update: parameters to 1e-6; the logged loss is the mean and data/skipped
    the sum over replicas; evaluation counts every image of an uneven split once. Then four
    updates with dropout and drop-path (different masks per replica) leave the replicas
    bit-identical."""
    num_replicas = 4
    generator = torch.Generator().manual_seed(num_replicas)
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    targets = torch.softmax(torch.randn(BATCH, CLASSES, generator=generator), -1)
    parts = _valid_parts(num_replicas, generator)
    torch.save({"images": images, "targets": targets, "valid_parts": parts}, tmp_path / "data.pt")
    common = tiny_overrides(tmp_path) + ["optim.grad_accum=1", "schedule.log_interval=1"]
    # warmup 0: the first update at the peak lr; adam_eps 1: an update proportional to the gradient
    # (the first Adam update is otherwise about lr * sign(g), which float32 rounding flips for g ~ 0)
    exact = load(
        DEMO,
        common
        + [
            "model.droppath=0.0",
            "schedule.warmup_steps=0",
            "optim.adam_eps=1.0",
            f"run.output_dir={tmp_path / 'replicas'}",
        ],
    )
    noisy = load(DEMO, common + ["model.droppath=0.1", "model.dropout=0.1", "model.layers=2"])
    (tmp_path / "replicas").mkdir()
    replicas = _run_job("updates", {"exact": exact, "noisy": noisy}, tmp_path / "data.pt", tmp_path, num_replicas)

    device = torch_xla.device()
    exact.run.output_dir = str(tmp_path / "single")
    os.makedirs(exact.run.output_dir)
    state = loop.build_state(exact, device)
    logger = RunLogger(exact, master=True, start_step=0)
    loop.train_step(state, [(images.to(device), targets.to(device), torch.tensor([0]).to(device))], exact, logger)
    logger.close()
    for key, value in state.model.state_dict().items():
        torch.testing.assert_close(replicas[0]["exact"][key], value.cpu(), rtol=0, atol=1e-6, msg=key)

    logged, single = (read_metrics(str(tmp_path / d / "metrics.jsonl"))[0] for d in ("replicas", "single"))
    assert logged["train/loss"] == pytest.approx(single["train/loss"], rel=1e-6)
    assert logged["data/skipped"] == sum(range(1, num_replicas + 1))  # each replica reported rank + 1

    real = [p["labels"] >= 0 for p in parts]
    whole = [
        (
            torch.cat([p["images"][m] for p, m in zip(parts, real)]).to(device),
            torch.cat([p["labels"][m] for p, m in zip(parts, real)]).to(device),
            torch.tensor([0]).to(device),
        )
    ]
    want = loop.evaluate(state.model, whole, exact)
    assert replicas[0]["metrics"]["val/count"] == want["val/count"] == num_replicas**2
    for key in ("val/acc1", "val/acc5", "val/loss"):
        assert replicas[0]["metrics"][key] == pytest.approx(want[key], rel=1e-6), key

    for other in replicas[1:]:
        for key, value in replicas[0]["noisy"].items():
            assert torch.equal(other["noisy"][key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("accelerate", [False, True], ids=["xla_replicas", "accelerate_processes"])
def test_repeated_copies_of_an_image_go_to_different_replicas(tmp_path, accelerate):
    """augment_repeats=2 on 2 replicas (XLA) or processes (accelerate): the two copies of each image
    sit at the same batch position on the two, so each sees every image once."""
    cfg = load(
        DEMO,
        tiny_overrides(tmp_path)
        + [
            "augment.augment_repeats=2",
            "augment.random_crop=none",
            "augment.mixup=0.0",
            "augment.cutmix=0.0",
            "optim.grad_accum=1",
        ],
    )
    first, second = (r["seen"] for r in _run_job("batches", {"data": cfg}, "-", tmp_path, 2, accelerate=accelerate))
    assert first == second and len(first) == BATCH  # 2 batches of 16 / 2 replicas
    assert len({image for image, _ in first}) == BATCH


def _launch(overrides: list[str], num_replicas: int):
    command = [sys.executable, LAUNCH, "--config", DEMO] + [a for o in overrides for a in ("--set", o)]
    return command, _replica_env(num_replicas)


def _resume_overrides(out, *extra: str) -> list[str]:
    """24 updates, evaluated every 8, with dropout and drop-path on: the RNG states matter on resume."""
    return tiny_overrides(out) + [
        "schedule.training_steps=24",
        "schedule.eval_interval=8",
        "schedule.log_interval=4",
        "model.dropout=0.1",
        "model.droppath=0.1",
        *extra,
    ]


@pytest.mark.slow
def test_two_replicas_resume_after_kill_9_and_stop_together_at_sigterm_like_an_uninterrupted_run(tmp_path):
    """Killed at the first checkpoint (an evaluation) and resumed; then SIGTERM to the launcher:
    both replica threads stop after the same update (status 143, last.pth at the stop); resumed
    again to the end: the parameters, moments and records of an uninterrupted run."""
    assert_resume_matches_uninterrupted(
        lambda out: _launch(_resume_overrides(out), 2)[0],
        _replica_env(2),
        tmp_path,
        24,
        (kill_at_first_checkpoint, stop_with_sigterm),
    )
    # the gather of the signal notes (at 10 and 20) compiled once: no graph is added after it
    compiles = [r["perf/compiles"] for r in read_metrics(str(tmp_path / "whole" / "metrics.jsonl")) if "val/acc1" in r]
    assert len(compiles) == 3 and compiles[1] == compiles[2]
    assert len(checkpoint.load(str(tmp_path / "broken" / "last.pth"))["rng"]) == 2


@pytest.mark.slow
def test_resuming_with_another_replica_count_is_a_clear_error(tmp_path):
    cfg = load(DEMO, tiny_overrides(tmp_path) + ["schedule.training_steps=4", "schedule.log_interval=2"])
    loop.train(cfg)  # one replica writes last.pth
    command, env = _launch(tiny_overrides(tmp_path) + ["schedule.training_steps=8"], 2)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("config error: ")
    assert "written by 1 replicas, this run has 2" in result.stderr and "run.resume=never" in result.stderr


# --- accelerate processes ----------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_with_batch_halves_update_like_one_process_with_the_whole_batch(tmp_path):
    """One update: parameters to 1e-6 (DDP's gradient mean); the logged loss is the mean and
    data/skipped the sum over processes; evaluation counts every image of an uneven split once.
    Then four updates with dropout and drop-path (different masks per process) leave the two
    processes bit-identical."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    targets = torch.softmax(torch.randn(BATCH, CLASSES, generator=generator), -1)
    parts = _valid_parts(2, generator)  # 1 + 3 real images
    real = [p["labels"] >= 0 for p in parts]
    whole = {
        "images": torch.cat([p["images"][m] for p, m in zip(parts, real)]),
        "labels": torch.cat([p["labels"][m] for p, m in zip(parts, real)]),
    }
    common = tiny_overrides(tmp_path) + ["optim.grad_accum=1", "schedule.log_interval=1"]
    # warmup 0 and adam_eps 1: see the same test for XLA replicas above
    exact = common + ["model.droppath=0.0", "schedule.warmup_steps=0", "optim.adam_eps=1.0"]
    noisy = load(DEMO, common + ["model.droppath=0.1", "model.dropout=0.1", "model.layers=2"])
    results = {}
    for processes, valid_parts in ((1, [whole]), (2, parts)):
        out = tmp_path / str(processes)
        out.mkdir()
        torch.save({"images": images, "targets": targets, "valid_parts": valid_parts}, out / "data.pt")
        cfgs = {"exact": load(DEMO, exact + [f"run.output_dir={out}"]), "noisy": noisy}
        results[processes] = _run_job("updates", cfgs, out / "data.pt", out, processes, accelerate=True)
    (one,), (first, second) = results[1], results[2]
    for key, value in one["exact"].items():
        torch.testing.assert_close(first["exact"][key], value, rtol=0, atol=1e-6, msg=key)
    logged_one, logged_two = (read_metrics(str(tmp_path / d / "metrics.jsonl"))[0] for d in ("1", "2"))
    assert logged_two["train/loss"] == pytest.approx(logged_one["train/loss"], rel=1e-6)
    assert (logged_one["data/skipped"], logged_two["data/skipped"]) == (1, 1 + 2)  # each reported rank + 1
    assert first["metrics"]["val/count"] == one["metrics"]["val/count"] == 4
    for key in ("val/acc1", "val/acc5", "val/loss"):
        assert first["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-6), key
    for key, value in first["noisy"].items():
        assert torch.equal(second["noisy"][key], value), key


@pytest.mark.slow
def test_two_process_demo_learns_and_both_backends_evaluate_its_checkpoint(tmp_path):
    """The full demo on 2 CPU processes; launch/evaluate.py reproduces its evaluation through
    accelerate (2 processes) and through XLA (the checkpoint format is shared)."""
    out = tmp_path / "run"
    env = without_torch_xla_env(tmp_path)
    _check(
        subprocess.run(
            torchrun(2, TRAIN_GPU, *_args([f"run.output_dir={out}"])),
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    evals = [r for r in read_metrics(str(out / "metrics.jsonl")) if "val/acc1" in r]
    assert [r["step"] for r in evals] == [200, 400, 600]
    assert evals[-1]["val/acc1"] >= 0.90 and evals[-1]["val/count"] == 360
    best = checkpoint.load(str(out / "best.pth"))
    assert len(best["rng"]) == 2 and set(best["rng"][0]) == {"torch"}
    assert not any(key.startswith("module.") for key in best["model"])

    args = [EVALUATE, "--config", str(out / "config.yaml"), "--checkpoint", str(out / "best.pth")]
    runs = {
        "accelerate": (torchrun(2, *args), env),
        "xla": ([sys.executable, *args, "--backend", "xla"], dict(os.environ, PJRT_DEVICE="CPU")),
    }
    for name, (command, run_env) in runs.items():
        got = json.loads(
            _check(subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=300))
            .stdout.strip()
            .splitlines()[-1]
        )
        assert got["val/count"] == 360, name
        for key in ("val/acc1", "val/acc5", "val/loss"):
            assert got[key] == pytest.approx(best["metrics"][key], abs=1e-5), (name, key)


@pytest.mark.slow
def test_two_processes_stop_together_at_sigterm_to_one_and_resume_like_an_uninterrupted_run(tmp_path):
    """SIGTERM to the rank-1 process only: both stop after the same update, each with status 143
    (torchrun reports the workers' failure as its status 1). Dropout and drop-path: the
    per-process RNG states matter; one loader worker per process."""
    assert_resume_matches_uninterrupted(
        lambda out: torchrun(2, TRAIN_GPU, *_args(_resume_overrides(out, "data.train_loader_workers=2"))),
        without_torch_xla_env(tmp_path),
        tmp_path,
        24,
        (functools.partial(stop_with_sigterm, rank=1, status=1),),
    )
    assert len(checkpoint.load(str(tmp_path / "broken" / "last.pth"))["rng"]) == 2


@pytest.mark.slow
def test_bf16_on_cpu_processes_trains_with_finite_losses(tmp_path):
    """run.bf16 on CPU processes: accelerate's CPU autocast (bfloat16)."""
    overrides = tiny_overrides(tmp_path) + ["run.bf16=true", "schedule.training_steps=6", "schedule.log_interval=2"]
    _check(
        subprocess.run(
            [sys.executable, TRAIN_GPU, *_args(overrides)],
            env=without_torch_xla_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
    )
    losses = [r["train/loss"] for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "train/loss" in r]
    assert len(losses) == 3 and np.isfinite(losses).all()
    last = checkpoint.load(str(tmp_path / "last.pth"))
    assert all(v.dtype == torch.float32 for v in last["model"].values())  # autocast computes in bf16, stores f32


@pytest.mark.slow
def test_an_xla_checkpoint_does_not_resume_on_accelerate(tmp_path):
    """Device RNG states do not carry over between backends: a clear error that names the way out."""
    loop.train(load(DEMO, tiny_overrides(tmp_path) + ["schedule.training_steps=2", "schedule.warmup_steps=1"]))
    result = subprocess.run(
        [sys.executable, TRAIN_GPU, *_args(tiny_overrides(tmp_path))],
        env=without_torch_xla_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("config error: ") and "written on xla, this run is on accelerate" in result.stderr
    assert "model.pretrained_ckpt=PATH and run.resume=never" in result.stderr


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tmp_path):
    """run.compile: torch.compile (inductor, on the CPU here) gives the eager run's parameters and
    evaluation; its checkpoint holds the plain model's keys."""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        overrides = tiny_overrides(out) + [
            f"run.compile={str(compiled).lower()}",
            "schedule.training_steps=4",
            "model.droppath=0.0",
            "schedule.log_interval=1",
        ]
        _check(
            subprocess.run(
                [sys.executable, TRAIN_GPU, *_args(overrides)],
                env=without_torch_xla_env(tmp_path),
                capture_output=True,
                text=True,
                timeout=600,
            )
        )
        runs[compiled] = checkpoint.load(str(out / "last.pth"))
        evals = [r for r in read_metrics(str(out / "metrics.jsonl")) if "val/acc1" in r]
        # the compile count is logged for a compiled model only: at least its train and eval graphs
        assert evals[-1]["perf/compiles"] >= 2 if compiled else "perf/compiles" not in evals[-1]
    eager, compiled = runs[False], runs[True]
    assert compiled["model"].keys() == eager["model"].keys()
    for key, value in eager["model"].items():
        torch.testing.assert_close(compiled["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    for key in ("val/acc1", "val/loss"):
        assert compiled["metrics"][key] == pytest.approx(eager["metrics"][key], abs=1e-4), key
