"""kan-vit-inspect: the drawn functions against NumPy's cos(k arccos t), real checkpoint files in
every format the project reads, the validation statistics, and one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kan_vit.analysis.inspect_kan import SATURATION, InputStatistics, kan_layers, main, plot_layer
from kan_vit.flax.layout import timm_to_flax
from kan_vit.flax.msgpack import save as save_flax
from kan_vit.training.config import load
from kan_vit.training.model_factory import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_digits.yaml")
SMALL = ["model.layers=2", "model.dim=32", "model.heads=2", "model.polynomial_degree=5"]


def _model(*extra):
    model = build_model(load(DEMO, SMALL + list(extra)))
    with torch.no_grad():  # trained-looking: scales away from 1, a non-zero base branch
        for name, param in model.named_parameters():
            if name.endswith("input_scale"):
                param.uniform_(0.5, 2.0)
    return model


def _numpy_phi(c, scale, base, i, j, x):
    t = np.tanh(scale[i] * x) if scale is not None else np.tanh(x)
    k = np.arange(c.shape[-1])
    phi = np.cos(k * np.arccos(t)[:, None]) @ c[i, j]  # T_k(t) = cos(k arccos t)
    return phi + (base[j, i] * x / (1 + np.exp(-x)) if base is not None else 0.0)


@pytest.mark.parametrize("switches", [[], ["model.kan_input_scale=true", "model.kan_base_branch=true"]])
def test_drawn_functions_equal_numpy_chebyshev_cosines(switches):
    state = {k: v.detach() for k, v in _model(*switches).state_dict().items()}
    layers = kan_layers(state)
    assert [layer.block for layer in layers] == [0, 1]
    x = torch.linspace(-3.7, 4.2, 301, dtype=torch.float64)
    for block, layer in enumerate(layers):
        c = state[f"blocks.{block}.mlp.kan.coefficients"].double().numpy()
        scale = state.get(f"blocks.{block}.mlp.kan.input_scale")
        base = state.get(f"blocks.{block}.mlp.base.weight")
        scale = None if scale is None else scale.double().numpy()
        base = None if base is None else base.double().numpy()
        fig = plot_layer(layer, x, 6, None, "")
        drawn = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
        assert len(drawn) == 6
        norms = np.linalg.norm(c[:, :, 1:], axis=-1)
        assert sorted(norms.ravel())[-6:] == sorted(
            norms[tuple(map(int, ax.get_title().split(" -> ")))] for ax in drawn
        )
        for ax in drawn:
            i, j = map(int, ax.get_title().split(" -> "))
            line_x, line_y = ax.lines[0].get_data()
            np.testing.assert_array_equal(line_x, x.numpy())
            np.testing.assert_allclose(line_y, _numpy_phi(c, scale, base, i, j, line_x), rtol=1e-9, atol=1e-12)
        slope, i, j = layer.max_slope(x)
        grid_slopes = [
            np.abs(np.diff(_numpy_phi(c, scale, base, a, b, x.numpy())) / np.diff(x.numpy())).max()
            for a in range(32)
            for b in range(32)
        ]
        assert slope == pytest.approx(max(grid_slopes), rel=1e-9)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "msgpack", "trainer"])
def test_every_checkpoint_format_without_config_uses_the_stated_default_range(tmp_path, fmt):
    model = _model()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"ckpt.{'pth' if fmt == 'trainer' else fmt}"
    if fmt == "pth":
        torch.save(state, path)
    elif fmt == "trainer":
        torch.save({"model": state, "step": 3}, path)
    elif fmt == "safetensors":
        save_file(state, str(path))
    else:
        save_flax(timm_to_flax(state, num_heads=2), path)
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--edges", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(os.listdir(out)) == ["layer_00.png", "layer_01.png", "report.md", "summary.json"]
    assert summary["range_source"] == "default [-4.0, 4.0] (no --config)"
    c = state["blocks.1.mlp.kan.coefficients"].double()
    energy = (c**2).sum((0, 1))
    np.testing.assert_allclose(summary["layers"][1]["energy_share_by_degree"], energy / energy.sum(), rtol=1e-6)
    assert "No --config" in (out / "report.md").read_text()


def test_input_statistics_equal_numpy_on_the_hooked_inputs():
    model = _model("model.kan_input_scale=true").eval()
    stats = InputStatistics(model)
    seen = []
    model.blocks[1].mlp.kan.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().numpy()))
    with torch.no_grad():
        for seed in range(2):
            model(3 * torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    x = np.concatenate([a.reshape(-1, 32) for a in seen])
    s = model.blocks[1].mlp.kan.input_scale.detach().numpy()
    got = stats.layer(1)
    assert (
        got["inputs"] == x.size
        and got["input_min"] == pytest.approx(x.min())
        and got["input_max"] == pytest.approx(x.max())
    )
    assert got["frac_abs_gt_2"] == pytest.approx(np.mean(np.abs(x * s) > 2))
    assert got["frac_abs_gt_3.47"] == pytest.approx(np.mean(np.abs(x * s) > SATURATION))


@pytest.mark.slow
def test_launcher_with_the_demo_validation_data(tmp_path):
    path = tmp_path / "demo.pth"
    torch.save(_model().state_dict(), path)
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "launch", "inspect_kan.py"),
            str(path),
            "--config",
            DEMO,
            *[a for s in SMALL for a in ("--set", s)],
            "--out",
            str(out),
            "--max-batches",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    layer = json.loads((out / "summary.json").read_text())["layers"][0]
    assert layer["inputs"] == 120 * 16 * 32  # one batch of 120 images, 16 patches (gap pooling: no class token), dim 32
    assert 0 <= layer["frac_abs_gt_3.47"] <= layer["frac_abs_gt_2"] <= 1 and layer["input_min"] < 0 < layer["input_max"]
    assert "## Validation inputs" in (out / "report.md").read_text()


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(tmp_path / "missing.pth"), "--out", str(out)]) == 2
    mlp = tmp_path / "mlp.pth"
    torch.save(build_model(load(DEMO, SMALL + ["model.use_kan=false"])).state_dict(), mlp)
    assert main([str(mlp), "--out", str(out)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "does not exist" in errors[0] and "no KAN layers" in errors[1]
    assert not out.exists()
