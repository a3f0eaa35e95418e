"""run.kan_health: the logged saturation fractions, coefficient norms and gradient norm against
NumPy recomputations from the hooked KAN inputs and the parameters, and no recompilation."""

import numpy as np
import pytest
import torch
import torch_xla
import torch_xla.debug.metrics as met
import torch_xla.distributed.parallel_loader as pl
from test_train import DEMO, tiny_overrides

from kan_vit.models.chebykan import ChebyKAN
from kan_vit.training import loop
from kan_vit.training.config import load
from kan_vit.training.data import create_train_loader
from kan_vit.training.metrics_log import RunLogger, read_metrics

BF16_ONE_BELOW = 1 - 2**-8  # the largest bfloat16 below 1


def _health_run(tmp_path, extra=()):
    cfg = load(DEMO, tiny_overrides(tmp_path) + ["run.kan_health=true", "model.layers=2"] + list(extra))
    device = torch_xla.device()
    state = loop.build_state(cfg, device)
    logger = RunLogger(cfg, master=True, start_step=0)
    batches = iter(pl.MpDeviceLoader(create_train_loader(cfg, world_size=1, rank=0), device))

    def update():
        loop.train_step(state, [next(batches) for _ in range(cfg.optim.grad_accum)], cfg, logger)

    return cfg, state, update


def test_the_threshold_is_where_bfloat16_tanh_becomes_one():
    from kan_vit.training.kan_health import SATURATION

    x = np.linspace(3.3, 3.6, 30001)
    ones = torch.tanh(torch.tensor(x, dtype=torch.float32)).to(torch.bfloat16) == 1.0
    first_one = x[ones.numpy()].min()
    assert abs(first_one - SATURATION) < 1e-4 and round(SATURATION, 2) == 3.47
    assert np.tanh(SATURATION - 1e-3) < 1 - 2**-9 < np.tanh(SATURATION + 1e-3)  # halfway to BF16_ONE_BELOW
    assert float(torch.tensor(BF16_ONE_BELOW, dtype=torch.bfloat16)) == BF16_ONE_BELOW


def test_logged_health_equals_a_numpy_recomputation_from_hooked_inputs(tmp_path):
    from kan_vit.training.kan_health import SATURATION

    cfg, state, update = _health_run(tmp_path, ["optim.clip_grad=0.0"])
    layers = [m for m in state.model.modules() if isinstance(m, ChebyKAN)]
    seen = [[] for _ in layers]
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: seen[i].append(args[0].detach()))
    applied = []  # each update's gradients as the optimizer receives them (the step drops them after)
    state.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: applied.append([p.grad for p in state.model.parameters() if p.grad is not None])
    )
    per_update, grad_norms = [], []
    for _ in range(6):
        update()
        # fraction per micro-batch forward, their mean per update (the metric's definition)
        per_update.append([np.mean([np.mean(np.abs(x.cpu().numpy()) > SATURATION) for x in xs]) for xs in seen])
        grads = [g.cpu().numpy().astype(np.float64) for g in applied.pop()]
        grad_norms.append(np.sqrt(sum((g**2).sum() for g in grads)))
        for xs in seen:
            assert len(xs) == cfg.optim.grad_accum
            xs.clear()

    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [3, 6]
    for record, interval in zip(records, (slice(0, 3), slice(3, 6))):
        expected = np.mean(per_update[interval], axis=0)
        logged = [record[f"kan/saturated_frac/layer_{i}"] for i in range(len(layers))]
        np.testing.assert_allclose(logged, expected, rtol=1e-6, atol=1e-7)
        assert record["train/grad_norm"] == pytest.approx(np.mean(grad_norms[interval]), rel=1e-4)
    assert any(f > 0 for r in records for k, f in r.items() if k.startswith("kan/saturated_frac")), (
        "no saturated input at all: the comparison would not test the threshold"
    )
    coefficients = [layer.coefficients.detach().cpu().numpy().astype(np.float64) for layer in layers]
    expected_norms = np.sqrt(sum((c**2).sum((0, 1)) for c in coefficients))  # after the last update
    logged_norms = [records[-1][f"kan/coef_norm_by_degree/{k}"] for k in range(len(expected_norms))]
    np.testing.assert_allclose(logged_norms, expected_norms, rtol=1e-5)


def test_health_metrics_add_no_recompilation_nor_cpu_fallback(tmp_path):
    _, _, update = _health_run(tmp_path)
    update(), update()
    met.clear_all()
    for _ in range(7):  # log steps 3, 6, 9
        update()
    compiles = met.metric_data("CompileTime")
    assert compiles is None or compiles[0] == 0, "an update with health metrics compiled a new graph"
    assert [name for name in met.counter_names() if name.startswith("aten::")] == []
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [3, 6, 9]
