"""The trainer on CPU PJRT (the same torch_xla code as on TPU): graph stability, gradient
accumulation, data-parallel equivalence under SPMD, and a short real run of the demo."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met
import torch_xla.distributed.parallel_loader as pl

from kan_vit.training import checkpoint, loop
from kan_vit.training.config import load, to_dict
from kan_vit.training.data import create_train_loader, create_valid_loader
from kan_vit.training.metrics_log import RunLogger, read_metrics
from kan_vit.training.model_factory import build_model
from kan_vit.training.optim import lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_digits.yaml")
LAUNCH = os.path.join(ROOT, "launch", "train_tpu.py")
EVALUATE = os.path.join(ROOT, "launch", "evaluate.py")


def tiny_overrides(output_dir) -> list[str]:
    """The demo data with a one-layer KAN-ViT, mixup and cutmix both on, 2 micro-batches per update."""
    return [
        "data.train_batch_size=16",
        "data.valid_batch_size=120",
        "data.train_loader_workers=0",
        "data.valid_loader_workers=0",
        "augment.random_crop=rrc",
        "augment.mixup=0.8",
        "augment.cutmix=1.0",
        "model.layers=1",
        "model.dim=32",
        "model.heads=2",
        "model.polynomial_degree=3",
        "model.droppath=0.1",
        "optim.grad_accum=2",
        "optim.clip_grad=1.0",
        "schedule.warmup_steps=3",
        "schedule.training_steps=20",
        "schedule.log_interval=3",
        "schedule.eval_interval=0",
        f"run.output_dir={output_dir}",
    ]


@pytest.mark.slow
def test_no_recompilation_or_cpu_fallback_after_the_first_steps(tmp_path):
    cfg = load(DEMO, tiny_overrides(tmp_path))
    device = torch_xla.device()
    state = loop.build_state(cfg, device)
    logger = RunLogger(cfg, master=True, start_step=0)
    batches = iter(pl.MpDeviceLoader(create_train_loader(cfg, world_size=1, rank=0), device))
    valid = pl.MpDeviceLoader(create_valid_loader(cfg, world_size=1, rank=0)[0], device)

    def update():
        loop.train_step(state, [next(batches) for _ in range(cfg.optim.grad_accum)], cfg, logger)

    update(), update()
    loop.evaluate(state.model, valid, cfg)
    met.clear_all()
    for _ in range(10):  # lr changes every update; log steps 3, 6, 9, 12; mixup/cutmix drawn per batch
        update()
    second = loop.evaluate(state.model, valid, cfg)
    compiles = met.metric_data("CompileTime")
    assert compiles is None or compiles[0] == 0, "an update or evaluation compiled a new graph"
    assert [name for name in met.counter_names() if name.startswith("aten::")] == []
    assert 0.0 <= second["val/acc1"] <= 1.0 and np.isfinite(second["val/loss"])

    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    for record in records:  # the lr of the logged update, from the schedule's closed form
        assert record["train/lr"] == pytest.approx(lr_at(record["step"] - 1, 1e-3 * 3, 3, 20), rel=1e-5)
        assert np.isfinite(record["train/loss"]) and record["data/skipped"] == 0
        assert 0.0 <= record["train/acc1"] <= record["train/acc5"] <= 1.0


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_the_first_update_compiles_the_only_update_graph(tmp_path, optimizer):
    """The optimizer state exists before the first update, so it traces the steady update's graph."""
    cfg = load(
        DEMO, tiny_overrides(tmp_path) + ["optim.grad_accum=1", "model.droppath=0.0", f"optim.optimizer={optimizer}"]
    )
    device = torch_xla.device()
    state = loop.build_state(cfg, device)
    images, targets, _ = _fixed_batch(cfg.data.train_batch_size, cfg.model.labels, cfg.model.image_size)
    micro_batch = (images.to(device), targets.to(device), torch.zeros(1, dtype=torch.int64, device=device))
    torch_xla.sync()  # device data, as the loader's batches
    met.clear_all()
    counts = []
    for _ in range(3):
        loop.train_step(state, [micro_batch], cfg)
        counts.append(met.metric_data("CompileTime")[0])
    assert counts == [1, 1, 1]


def _fixed_batch(n, labels, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    hard = torch.randint(0, labels, (n,), generator=gen)
    targets = torch.nn.functional.one_hot(hard, labels).float() * 0.9 + 0.01
    return images, targets, hard


def _deterministic_cfg(tmp_path, accum):
    return load(
        DEMO, tiny_overrides(tmp_path) + [f"optim.grad_accum={accum}", "model.droppath=0.0", "data.train_batch_size=16"]
    )


@pytest.mark.slow
def test_train_accuracy_is_the_original_top_k_within_the_target_maximum(tmp_path):
    """Targets built from the model's own ranking before each update: a row hits top-1 when its
    target's maximum (ties included) is the predicted class, top-5 when it is among the five best."""
    cfg = load(DEMO, tiny_overrides(tmp_path) + ["model.droppath=0.0", "schedule.log_interval=2"])
    device = torch_xla.device()
    state = loop.build_state(cfg, device)
    logger = RunLogger(cfg, master=True, start_step=0)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    gen = torch.Generator().manual_seed(0)
    # per row: the target's maximum at these ranks of the prediction (two ranks: a tie)
    patterns = [[(0,), (3,), (7, 0), (8,)] * 4, [(3,)] * 8 + [(9, 5)] * 8]
    expected = [(0.5, 0.75), (0.0, 0.5)]  # (acc1, acc5) of the two updates, 2 micro-batches of 8 each
    for ranks_per_row in patterns:
        images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)
        with torch.no_grad():
            order = state.model(loop.normalize(images)).cpu().argsort(-1, descending=True)
        targets = torch.full((16, 10), 0.01)
        for row, ranks in enumerate(ranks_per_row):
            targets[row, order[row, list(ranks)]] += 0.9 / len(ranks)
        micro = [(i, t.to(device), zero) for i, t in zip(images.chunk(2), targets.chunk(2))]
        loop.train_step(state, micro, cfg, logger)
    record = read_metrics(str(tmp_path / "metrics.jsonl"))[-1]
    assert record["step"] == 2
    assert record["train/acc1"] == pytest.approx(np.mean([e[0] for e in expected]), abs=1e-6)
    assert record["train/acc5"] == pytest.approx(np.mean([e[1] for e in expected]), abs=1e-6)


@pytest.mark.slow
def test_grad_accumulation_averages_micro_batches_into_one_update(tmp_path):
    """Two micro-batches of 8 give the gradient of one batch of 16 (mean loss) and one optimizer
    update. The gradient is compared, not the updated parameters: AdamW's first steps divide each
    gradient by its own magnitude, so an element near zero turns a last-bit difference in the sum's
    order (which differs between processors) into a visible parameter difference; the update rule
    itself is checked against the original's in tests/test_optim.py."""
    device = torch_xla.device()
    images, targets, _ = _fixed_batch(16, 10, 32)
    zero = torch.zeros((), dtype=torch.int64)
    grads, steps = [], []
    for accum in (1, 2):
        cfg = _deterministic_cfg(tmp_path, accum)
        state = loop.build_state(cfg, device)
        chunks = zip(images.chunk(accum), targets.chunk(accum))
        micro = [(i.to(device), t.to(device), zero.to(device)) for i, t in chunks]
        params = dict(state.model.named_parameters())

        def keep_gradients(optimizer, args, kwargs, params=params):  # as the optimizer receives them
            grads.append({name: p.grad for name, p in params.items()})

        state.optimizer.register_step_pre_hook(keep_gradients)
        loop.train_step(state, micro, cfg)
        assert all(p.grad is None for p in params.values())  # dropped once applied
        steps.append({int(group["step"].item()) for group in state.optimizer.param_groups})
    assert steps == [{1}, {1}]
    assert len(grads) == 2
    for name, full in grads[0].items():
        full, accumulated = full.cpu(), grads[1][name].cpu()
        # fp32 sums regrouped into two halves: the error scales with the largest term, not each element
        torch.testing.assert_close(accumulated, full, rtol=1e-5, atol=1e-6 * full.abs().max().item(), msg=name)


SPMD_SCRIPT = r"""
import json, sys
import numpy as np, torch
import torch_xla, torch_xla.runtime as xr, torch_xla.distributed.spmd as xs
xr.use_spmd()
from kan_vit.training import loop
from kan_vit.training.config import from_dict
cfg = from_dict(json.loads(sys.argv[1]))
data = torch.load(sys.argv[2])
device = torch_xla.device()
mesh = xs.Mesh(np.arange(xr.global_runtime_device_count()), (xr.global_runtime_device_count(),), ("batch",))
def shard(t):
    t = t.to(device)
    xs.mark_sharding(t, mesh, ("batch",) + (None,) * (t.ndim - 1))
    return t
state = loop.build_state(cfg, device)
zero = torch.zeros((), dtype=torch.int64, device=device)
for _ in range(2):
    loop.train_step(state, [(shard(data["images"]), shard(data["targets"]), zero)], cfg)
metrics = loop.evaluate(state.model, [(shard(data["images"]), shard(data["labels"]), zero)], cfg)
torch.save({"params": {k: v.cpu() for k, v in state.model.state_dict().items()}, "metrics": metrics,
            "devices": xr.global_runtime_device_count(), "loss": state.loss_sum.cpu()}, sys.argv[3])
"""


@pytest.mark.slow
def test_data_parallel_over_4_devices_matches_one_device(tmp_path):
    """The same train_step/evaluate with the batch split over 4 (virtual CPU) devices under SPMD
    gives the full-batch result: the step's gradients and metrics are means/sums over the whole
    global batch, so data parallelism changes nothing. (Under SPMD XLA inserts the cross-device
    reductions; the xmp.spawn path's own collectives run in tests/test_backend.py.)"""
    cfg = _deterministic_cfg(tmp_path, 1)
    images, targets, labels = _fixed_batch(16, 10, 32, seed=1)
    labels[-3:] = -1  # evaluation padding must be excluded on every shard
    torch.save({"images": images, "targets": targets, "labels": labels}, tmp_path / "batch.pt")
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4")
    subprocess.run(
        [
            sys.executable,
            "-c",
            SPMD_SCRIPT,
            json.dumps(to_dict(cfg)),
            str(tmp_path / "batch.pt"),
            str(tmp_path / "spmd.pt"),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    spmd = torch.load(tmp_path / "spmd.pt")
    assert spmd["devices"] == 4

    device = torch_xla.device()
    state = loop.build_state(cfg, device)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(2):
        loop.train_step(state, [(images.to(device), targets.to(device), zero)], cfg)
    metrics = loop.evaluate(state.model, [(images.to(device), labels.to(device), zero)], cfg)
    for key, value in state.model.state_dict().items():
        torch.testing.assert_close(spmd["params"][key], value.cpu(), rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(spmd["loss"], state.loss_sum.cpu(), rtol=1e-5, atol=1e-6)
    for key in ("val/acc1", "val/acc5", "val/loss"):
        assert spmd["metrics"][key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key
    # 13 valid images: the accuracy is a count over exactly them
    assert round(metrics["val/acc1"] * 13) == pytest.approx(metrics["val/acc1"] * 13, abs=1e-6)


DEMO_SHORT = [
    "schedule.training_steps=60",
    "schedule.eval_interval=30",
    "schedule.log_interval=10",
    "data.train_loader_workers=1",
    "data.valid_loader_workers=0",
    "run.export_flax=true",
]


@pytest.mark.slow
def test_demo_short_run_learns_and_writes_its_files(tmp_path):
    """The launcher end to end (one spawned loader worker), then launch/evaluate.py on what it wrote."""
    out = tmp_path / "run"
    overrides = [f"run.output_dir={out}"] + DEMO_SHORT
    env = dict(os.environ, PJRT_DEVICE="CPU")
    result = subprocess.run(
        [sys.executable, LAUNCH, "--config", DEMO] + [a for o in overrides for a in ("--set", o)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(str(out / "metrics.jsonl"))
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1
    evals = [r for r in records if "val/acc1" in r]
    assert [r["step"] for r in evals] == [30, 60]
    assert evals[-1]["val/acc1"] > 0.2 and evals[-1]["val/count"] == 360  # chance is 0.1; every image once
    # the compile count logged at each evaluation: graphs exist after the first, none is added later
    assert evals[0]["perf/compiles"] > 0 and evals[1]["perf/compiles"] == evals[0]["perf/compiles"]
    assert load(str(out / "config.yaml")) == load(DEMO, overrides)
    last = torch.load(out / "last.pth", weights_only=True)  # what timm's loader does
    assert last["step"] == 60 and last["metrics"]["val/acc1"] == evals[-1]["val/acc1"]
    model = build_model(load(str(out / "config.yaml")))
    model.load_state_dict(last["model"])
    best = checkpoint.load(str(out / "best.pth"))
    assert best["best_acc1"] == max(r["val/acc1"] for r in evals)

    # run.export_flax: the original's format, read by Flax and computing the same function
    from flax.serialization import msgpack_restore
    from numpy_reference import forward as reference_forward

    params = msgpack_restore((out / "demo_digits-last.msgpack").read_bytes())
    assert (out / "demo_digits-best.msgpack").exists()
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 32))
    model = model.double().eval()
    np.testing.assert_allclose(
        model(torch.from_numpy(images)).detach().numpy(), reference_forward(params, images), atol=1e-6
    )

    # launch/evaluate.py reproduces the run's own evaluation from best.pth and from the .msgpack
    for ckpt, want in ((out / "best.pth", best["metrics"]), (out / "demo_digits-last.msgpack", last["metrics"])):
        result = subprocess.run(
            [sys.executable, EVALUATE, "--config", str(out / "config.yaml"), "--checkpoint", str(ckpt)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        got = json.loads(result.stdout.strip().splitlines()[-1])
        assert got["val/count"] == 360
        for key in ("val/acc1", "val/acc5", "val/loss"):
            assert got[key] == pytest.approx(want[key], abs=1e-5), key


@pytest.mark.slow
def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """From update 10 (0-based index 9) the lr is inf: update 10's loss is still finite, the
    parameters it writes are not, so update 11 is the first with a non-finite loss."""
    cfg = load(
        DEMO,
        tiny_overrides(tmp_path)
        + ["schedule.training_steps=40", "schedule.eval_interval=8", "schedule.log_interval=4"],
    )
    schedule = loop.lr_at
    monkeypatch.setattr(loop, "lr_at", lambda step, *a: torch.where(step >= 9, float("inf"), schedule(step, *a)))
    with pytest.raises(loop.DivergenceError, match=r"not finite at step 11; stopping"):
        loop.train(cfg)
    last = checkpoint.load(str(tmp_path / "last.pth"))
    assert last["step"] == 8
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "val/acc1" in r] == [8]


@pytest.mark.slow
def test_bf16_autocast_updates_stay_finite(tmp_path):
    cfg = load(DEMO, tiny_overrides(tmp_path) + ["run.bf16=true", "optim.grad_accum=1"])
    device = torch_xla.device()
    state = loop.build_state(cfg, device)
    before = {k: v.cpu().clone() for k, v in state.model.state_dict().items()}
    images, targets, _ = _fixed_batch(16, 10, 32)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(2):
        loop.train_step(state, [(images.to(device), targets.to(device), zero)], cfg)
    after = state.model.state_dict()
    assert all(after[k].dtype == torch.float32 for k in before)  # autocast computes in bf16, stores f32
    assert torch.isfinite(state.loss_sum.cpu()) and not torch.equal(after["head.weight"].cpu(), before["head.weight"])


def test_normalisation_constants_are_uploaded_once():
    """The mean/std live on the device after the first step: a step uploads only its batch."""
    device = torch_xla.device()
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device=device)
    loop.normalize(images)
    torch_xla.sync()
    met.clear_all()
    out = loop.normalize(images)
    torch_xla.sync()
    assert met.metric_data("TransferToDeviceTime") is None
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(out.cpu(), (0 - mean).expand(2, 3, 4, 4) / std)


@pytest.mark.slow
def test_checkpoints_by_interval_and_by_the_clock_besides_evaluations(tmp_path, capsys):
    """run.checkpoint_interval=4 writes at 4, 8 and 12; a clock of 1e-6 minutes is due at every
    agreement boundary (10); the end writes at 14. Each write logs its copy-to-host stall."""
    cfg = load(
        DEMO,
        tiny_overrides(tmp_path)
        + ["schedule.training_steps=14", "run.checkpoint_interval=4", "run.checkpoint_minutes=1e-6"],
    )
    loop.train(cfg)
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("checkpoint at step ")]
    assert [int(line.split()[3].rstrip(":")) for line in logged] == [4, 8, 10, 12, 14]
    assert all(float(line.split()[4]) >= 0 and "in the background" in line for line in logged)
    assert checkpoint.load(str(tmp_path / "last.pth"))["step"] == 14
