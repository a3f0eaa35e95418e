"""Real multi-replica runs on the CPU: `CPU_NUM_DEVICES=N` makes xmp.spawn run N XLA replicas
(threads of one process) whose collectives are XLA's own, as between the chips of a TPU host.
Every test here checks its replica count, so none of them can pass with one replica."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch_xla

from kan_vit import checkpoint, train
from kan_vit.config import load, to_dict
from kan_vit.metrics_log import RunLogger, read_metrics
from cpu_processes import torchrun, without_torch_xla_env
from kill_and_resume import assert_resume_matches_uninterrupted
from test_train import DEMO, LAUNCH, tiny_overrides

JOBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "replica_jobs.py")
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
        labels[:2 * rank + 1] = torch.randint(0, CLASSES, (2 * rank + 1,), generator=generator)
        images = torch.randint(0, 256, (8, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
        parts.append({"images": images, "labels": labels})
    return parts


@pytest.mark.slow
@pytest.mark.parametrize("num_replicas", [2, 4])
def test_replicas_with_batch_shares_update_like_one_replica_with_the_whole_batch(tmp_path, num_replicas):
    """One update: parameters to 1e-6; the logged loss is the mean and data/skipped the sum over
    replicas; evaluation counts every image of an uneven split once. Then four updates with
    dropout and drop-path (different masks per replica) leave the replicas bit-identical."""
    generator = torch.Generator().manual_seed(num_replicas)
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    targets = torch.softmax(torch.randn(BATCH, CLASSES, generator=generator), -1)
    parts = _valid_parts(num_replicas, generator)
    torch.save({"images": images, "targets": targets, "valid_parts": parts}, tmp_path / "data.pt")
    common = tiny_overrides(tmp_path) + ["optim.grad_accum=1", "schedule.log_interval=1"]
    # warmup 0: the first update at the peak lr; adam_eps 1: an update proportional to the gradient
    # (the first Adam update is otherwise about lr * sign(g), which float32 rounding flips for g ~ 0)
    exact = load(DEMO, common + ["model.droppath=0.0", "schedule.warmup_steps=0", "optim.adam_eps=1.0",
                                 f"run.output_dir={tmp_path / 'replicas'}"])
    noisy = load(DEMO, common + ["model.droppath=0.1", "model.dropout=0.1", "model.layers=2"])
    (tmp_path / "replicas").mkdir()
    replicas = _run_job("updates", {"exact": exact, "noisy": noisy}, tmp_path / "data.pt", tmp_path, num_replicas)

    device = torch_xla.device()
    exact.run.output_dir = str(tmp_path / "single")
    os.makedirs(exact.run.output_dir)
    state = train.build_state(exact, device)
    logger = RunLogger(exact, master=True, start_step=0)
    train.train_step(state, [(images.to(device), targets.to(device), torch.tensor([0]).to(device))], exact, logger)
    logger.close()
    for key, value in state.model.state_dict().items():
        torch.testing.assert_close(replicas[0]["exact"][key], value.cpu(), rtol=0, atol=1e-6, msg=key)

    logged, single = (read_metrics(str(tmp_path / d / "metrics.jsonl"))[0] for d in ("replicas", "single"))
    assert logged["train/loss"] == pytest.approx(single["train/loss"], rel=1e-6)
    assert logged["data/skipped"] == sum(range(1, num_replicas + 1))  # each replica reported rank + 1

    real = [p["labels"] >= 0 for p in parts]
    whole = [(torch.cat([p["images"][m] for p, m in zip(parts, real)]).to(device),
              torch.cat([p["labels"][m] for p, m in zip(parts, real)]).to(device), torch.tensor([0]).to(device))]
    want = train.evaluate(state.model, whole, exact)
    assert replicas[0]["metrics"]["val/count"] == want["val/count"] == num_replicas ** 2
    for key in ("val/acc1", "val/acc5", "val/loss"):
        assert replicas[0]["metrics"][key] == pytest.approx(want[key], rel=1e-6), key

    for other in replicas[1:]:
        for key, value in replicas[0]["noisy"].items():
            assert torch.equal(other["noisy"][key], value), key


@pytest.mark.slow
def test_repeated_copies_of_an_image_go_to_different_replicas(tmp_path):
    """augment_repeats=2 on 2 replicas: the two copies of each image sit at the same batch position
    on the two replicas, so each replica sees every image once."""
    cfg = load(DEMO, tiny_overrides(tmp_path) + ["augment.augment_repeats=2", "augment.random_crop=none",
                                                 "augment.mixup=0.0", "augment.cutmix=0.0", "optim.grad_accum=1"])
    first, second = (r["seen"] for r in _run_job("batches", {"data": cfg}, "-", tmp_path, 2))
    assert first == second and len(first) == BATCH  # 2 batches of 16 / 2 replicas
    assert len({image for image, _ in first}) == BATCH


def _launch(overrides: list[str], num_replicas: int):
    command = [sys.executable, LAUNCH, "--config", DEMO] + [a for o in overrides for a in ("--set", o)]
    return command, _replica_env(num_replicas)


@pytest.mark.slow
def test_two_replicas_resume_after_kill_9_like_an_uninterrupted_run(tmp_path):
    def overrides(out):
        return tiny_overrides(out) + ["schedule.training_steps=24", "schedule.eval_interval=8",
                                      "schedule.log_interval=4", "model.dropout=0.1", "model.droppath=0.1"]

    assert_resume_matches_uninterrupted(lambda out: _launch(overrides(out), 2)[0], _replica_env(2), tmp_path, 24)
    assert len(checkpoint.load(str(tmp_path / "broken" / "last.pth"))["rng"]) == 2


@pytest.mark.slow
def test_resuming_with_another_replica_count_is_a_clear_error(tmp_path):
    cfg = load(DEMO, tiny_overrides(tmp_path) + ["schedule.training_steps=4", "schedule.log_interval=2"])
    train.train(cfg)  # one replica writes last.pth
    command, env = _launch(tiny_overrides(tmp_path) + ["schedule.training_steps=8"], 2)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("config error: ")
    assert "written by 1 replicas, this run has 2" in result.stderr and "run.resume=never" in result.stderr
