"""The model a config describes: with the ablation switches off it is the original's to the bit
(outputs written before the switches existed), and the trainer's drop-path schedule is constant."""

import hashlib
import os

import torch

from kan_vit.training.config import load
from kan_vit.training.model_factory import build_model

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


def test_trainer_builds_the_constant_drop_path_schedule():
    cfg = load(
        None,
        [
            "model.labels=5",
            "model.layers=3",
            "model.dim=32",
            "model.heads=2",
            "model.droppath=0.2",
            "model.image_size=32",
            "model.use_kan=true",
        ],
    )
    model = build_model(cfg)
    assert [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in model.blocks] == [(0.2, 0.2)] * 3


def test_variance_preserving_init_rescales_only_the_kan_coefficients():
    """model.kan_init draws the same normals as the original's init, scaled from
    1 / (D (K + 1)) to 1 / sqrt(D S_K) (demo: D = 96, K = 4); every other parameter is the bit-same."""
    original = build_model(load(DEMO, []))
    vp = build_model(load(DEMO, ["model.kan_init=variance_preserving"]))
    d, k = 96, 4
    s_k = 2.774256592309589  # sum_k E[T_k(tanh z)^2], z ~ N(0, 1), k = 0..4 (by 2M-sample Monte Carlo: 2.7746)
    scale = (d * (k + 1)) / (d * s_k) ** 0.5
    vp_params = dict(vp.named_parameters())
    coefficients = 0
    for name, param in original.named_parameters():
        if name.endswith(".kan.coefficients"):
            torch.testing.assert_close(vp_params[name], param * scale, rtol=1e-6, atol=0)
            coefficients += 1
        else:
            assert torch.equal(vp_params[name], param), name
    assert coefficients == 4
