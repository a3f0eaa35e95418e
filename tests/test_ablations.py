"""Ablation switches: off, the model is the original's to the bit; on, each does what it says."""
import hashlib
import os

import numpy as np
import pytest
import torch

from kan_vit.config import ConfigError, load, validate
from kan_vit.optim import param_groups
from kan_vit.model_factory import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_digits.yaml")
# Written by `default_outputs()` below, run on the code before the switches existed.
BEFORE_SWITCHES = os.path.join(ROOT, "tests", "data", "default_forward.pt")


def _machine() -> str:
    """The processor and torch build: float32 GEMM rounding (hence the logits' last bits) depends on them."""
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown")
    return f"{cpu} / torch {torch.__version__}"


def default_outputs() -> dict:
    """Logits, state-dict keys and a hash of every parameter's bits of the demo models (KAN, MLP)."""
    out = {"machine": _machine()}
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for use_kan in ("true", "false"):
        model = build_model(load(DEMO, [f"model.use_kan={use_kan}"])).eval()
        with torch.no_grad():
            out[f"kan={use_kan}/logits"] = model(x)
        out[f"kan={use_kan}/keys"] = list(model.state_dict())
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        out[f"kan={use_kan}/params_sha256"] = hashlib.sha256(params.numpy().tobytes()).hexdigest()
    return out


def test_switches_off_leave_parameters_keys_and_outputs_bit_identical():
    """Parameters and keys to the bit anywhere; logits to the bit on the machine that wrote the
    fixture, and to float32 GEMM rounding on another processor or torch build."""
    before, now = torch.load(BEFORE_SWITCHES), default_outputs()
    assert before.keys() == now.keys()
    same_machine = before.pop("machine") == now.pop("machine")
    for key, value in before.items():
        if not torch.is_tensor(value):
            assert value == now[key], key
        elif same_machine:
            assert torch.equal(value, now[key]), key
        else:
            torch.testing.assert_close(now[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _model(*overrides):
    return build_model(load(DEMO, list(overrides) + ["model.layers=2"]))


def test_input_scale_is_a_new_parameter_applied_before_tanh():
    model = _model("model.kan_input_scale=true", "model.polynomial_degree=3")
    kan = model.blocks[0].mlp.kan
    assert [n for n, _ in model.named_parameters() if n.endswith("input_scale")] == [
        "blocks.0.mlp.kan.input_scale", "blocks.1.mlp.kan.input_scale"]
    scale = torch.linspace(0.5, 2.0, 96)
    with torch.no_grad():
        kan.input_scale.copy_(scale)
    x = torch.randn(5, 96, dtype=torch.float64)
    t = np.tanh(x.numpy() * scale.numpy())
    coef = kan.coefficients.detach().double().numpy()
    basis = np.cos(np.arange(4) * np.arccos(t)[..., None])  # T_k(t) = cos(k arccos t)
    expected = np.einsum("nik,iok->no", basis, coef)
    np.testing.assert_allclose(kan.double()(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_base_branch_adds_a_bias_free_linear_of_silu():
    model = _model("model.kan_base_branch=true")
    ff = model.blocks[0].mlp
    assert ff.base.bias is None and "blocks.0.mlp.base.weight" in model.state_dict()
    x = torch.randn(3, 96)
    silu = x.numpy() / (1 + np.exp(-x.numpy()))
    expected = ff.kan(x).detach().numpy() + silu @ ff.base.weight.detach().numpy().T
    np.testing.assert_allclose(ff(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_per_block_degrees():
    model = _model("model.kan_degrees=[2, 7]")
    assert [block.mlp.kan.coefficients.shape[-1] - 1 for block in model.blocks] == [2, 7]


def test_kan_weight_decay_adds_exactly_the_coefficients_to_the_decayed_params():
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}

    def decayed(**kwargs):
        return {names[id(p)] for g in param_groups(model, 0.05, 1.0, **kwargs) if g["weight_decay"] > 0
                for p in g["params"]}

    assert decayed(kan_weight_decay=True) - decayed() == {"blocks.0.mlp.kan.coefficients", "blocks.1.mlp.kan.coefficients"}


@pytest.mark.parametrize("overrides,message", [
    (["model.kan_degrees=[2, 3]"], "model.kan_degrees must list 4 integers"),
    (["model.kan_degrees=[2, 3, 0, 1]"], "model.kan_degrees must list 4 integers"),
    (["model.use_kan=false", "model.kan_base_branch=true"], "model.kan_base_branch applies to KAN models only"),
    (["model.use_kan=false", "optim.kan_weight_decay=true"], "optim.kan_weight_decay applies to KAN models only"),
    (["model.mlp_ratio=0"], "model.mlp_ratio must be > 0"),
    (["model.kan_input_scale=true", "run.export_flax=true"], "run.export_flax writes the original's format"),
])
def test_bad_switch_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(load(DEMO, overrides), world_size=1)
