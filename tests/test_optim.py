"""Optimization (original-semantics §3) against closed forms written out here in NumPy / math,
and the XLA step: no recompiles or CPU fallbacks when the lr changes."""
import math

import numpy as np
import pytest
import timm
import torch
from torch import nn

import kan_vit  # noqa: F401  (registers the models)
from kan_vit.config import OptimConfig
from kan_vit.optim import create_optimizer, lr_at, param_groups, set_lr

B1, B2, EPS = 0.9, 0.999, 1e-8


def toy_vit(**kwargs):
    return timm.create_model(
        "kan_vit_tiny_patch16_224", depth=3, img_size=32, embed_dim=32, num_heads=2, num_classes=5, **kwargs
    )


def group_of(groups):
    return {id(p): g for g in groups for p in g["params"]}


@pytest.mark.parametrize("name,ff_kernels", [
    ("kan_vit_tiny_patch16_224", ()),
    ("deit_jax_tiny_patch16_224", ("mlp.fc1.weight", "mlp.fc2.weight")),
])
def test_decay_mask_is_linear_and_conv_weights_only(name, ff_kernels):
    model = timm.create_model(name, depth=3, img_size=32, embed_dim=32, num_heads=2, num_classes=5,
                              layerscale=True)
    expected = {"patch_embed.proj.weight", "head.weight"} | {
        f"blocks.{k}.{n}" for k in range(3) for n in ("attn.qkv.weight", "attn.proj.weight", *ff_kernels)
    }
    by_id = group_of(param_groups(model, weight_decay=0.05, lr_decay=1.0))
    decayed = {n for n, p in model.named_parameters() if by_id[id(p)]["weight_decay"] == 0.05}
    undecayed = {n for n, p in model.named_parameters() if by_id[id(p)]["weight_decay"] == 0.0}
    assert decayed == expected
    assert len(decayed) + len(undecayed) == len(list(model.parameters()))
    assert {"cls_token", "pos_embed", "blocks.0.ls1.gamma", "norm.weight", "head.bias"} <= undecayed
    if name.startswith("kan"):
        assert "blocks.0.mlp.kan.coefficients" in undecayed  # 3-D, yet not a kernel


def test_layer_decay_factors_toy_vit():
    model = toy_vit()
    by_id = group_of(param_groups(model, weight_decay=0.05, lr_decay=0.5))
    # L = 3: embedding 0.5**3, blocks.k 0.5**(3 - (k + 1)), final norm and head 0.5**0
    expected = {"cls_token": 0.125, "pos_embed": 0.125, "patch_embed.proj.weight": 0.125,
                "patch_embed.proj.bias": 0.125, "blocks.0.attn.qkv.weight": 0.25,
                "blocks.0.mlp.kan.coefficients": 0.25, "blocks.1.norm1.bias": 0.5,
                "blocks.2.attn.proj.weight": 1.0, "norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    scales = {n: by_id[id(p)]["lr_scale"] for n, p in model.named_parameters()}
    assert {n: scales[n] for n in expected} == expected
    assert {s for n, s in scales.items() if n.startswith("blocks.1.")} == {0.5}


@pytest.mark.parametrize("name,layerscale", [("kan_vit_tiny_patch16_224", False), ("deit_jax_tiny_patch16_224", True)])
def test_timm_create_optimizer_v2_gives_the_trainers_groups(name, layerscale):
    """timm's own factory, through no_weight_decay() and group_matcher(), builds the same
    (lr_scale, weight_decay) partition of the parameters as the trainer."""
    model = timm.create_model(name, depth=3, img_size=32, embed_dim=32, num_heads=2, num_classes=5,
                              layerscale=layerscale)

    def merged(groups):  # {(lr_scale, weight_decay): param ids}; timm may split a pair over groups
        out = {}
        for g in groups:
            out.setdefault((round(g["lr_scale"], 12), g["weight_decay"]), set()).update(map(id, g["params"]))
        return out

    timm_opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    ours = merged(param_groups(model, weight_decay=0.05, lr_decay=0.5))
    assert merged(timm_opt.param_groups) == ours
    assert len(ours) == 8  # layer ids 0..3 (embedding, blocks 0 and 1, block 2 + norm + head) x decayed or not

    model = toy_vit()
    with pytest.raises(ValueError, match="lr_decay"):
        param_groups(model, 0.05, 0.0)
    with pytest.raises(ValueError, match="optim.optimizer"):
        create_optimizer(model, OptimConfig(optimizer="sgd"))
    with pytest.raises(ValueError, match="blocks"):
        param_groups(nn.Linear(2, 2), 0.05, 1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(0, 1e-3, 10, 10)


class Toy(nn.Module):
    """ViT-shaped toy: an embedding param, one block (Linear + 3-D coefficients), a head."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 3))
        self.blocks = nn.Sequential(nn.Module())
        self.blocks[0].fc = nn.Linear(3, 4)
        self.blocks[0].coefficients = nn.Parameter(torch.zeros(2, 2, 2))
        self.head = nn.Linear(4, 2)


def toy_with_grads(seed, zero_head_weight=False):
    model = Toy().double()
    rng = np.random.default_rng(seed)
    init = {n: rng.normal(size=p.shape) for n, p in model.named_parameters()}
    if zero_head_weight:
        init["head.weight"][:] = 0.0
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.from_numpy(init[n]))
    return model, init, rng


def set_grads(model, rng, scale):
    grads = {n: scale * rng.normal(size=p.shape) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = torch.from_numpy(grads[n].copy())
    return grads


DECAYED = {"blocks.0.fc.weight", "head.weight"}
# lr_decay 0.5, L = 1: embedding 0.5, block 0 and head 1.
SCALE = {"cls_token": 0.5, "blocks.0.fc.weight": 1.0, "blocks.0.fc.bias": 1.0,
         "blocks.0.coefficients": 1.0, "head.weight": 1.0, "head.bias": 1.0}


def adam_direction(m, v, g, t):
    m = B1 * m + (1 - B1) * g
    v = B2 * v + (1 - B2) * g * g
    return m, v, (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS)


def test_adamw_two_steps_closed_form():
    wd, lrs = 0.1, (1e-2, 3e-3)
    model, p, rng = toy_with_grads(0)
    opt = create_optimizer(model, OptimConfig(optimizer="adamw", weight_decay=wd, lr_decay=0.5))
    m = {n: 0.0 for n in p}
    v = {n: 0.0 for n in p}
    for t, lr in enumerate(lrs, start=1):
        g = set_grads(model, rng, 1.0)
        set_lr(opt, lr)
        opt.step()
        for n in p:
            m[n], v[n], d = adam_direction(m[n], v[n], g[n], t)
            p[n] = p[n] - lr * SCALE[n] * (d + (wd * p[n] if n in DECAYED else 0.0))
    for n, param in model.named_parameters():
        np.testing.assert_allclose(param.detach().numpy(), p[n], rtol=1e-10, atol=1e-13, err_msg=n)


@pytest.mark.parametrize("wd", [0.1, 0.0])
def test_lamb_trust_ratio_closed_form(wd):
    # Two steps with gradient norms ~1e3 and ~1: a built-in global-norm clip would change step 2.
    lrs = (1e-2, 3e-3)
    model, p, rng = toy_with_grads(1, zero_head_weight=True)
    opt = create_optimizer(model, OptimConfig(optimizer="lamb", weight_decay=wd, lr_decay=0.5))
    m = {n: 0.0 for n in p}
    v = {n: 0.0 for n in p}
    for t, (lr, gscale) in enumerate(zip(lrs, (1e3, 1.0)), start=1):
        g = set_grads(model, rng, gscale)
        set_lr(opt, lr)
        opt.step()
        for n in p:
            m[n], v[n], u = adam_direction(m[n], v[n], g[n], t)
            ratio = 1.0
            if n in DECAYED:
                u = u + wd * p[n]
                w_norm, u_norm = np.linalg.norm(p[n]), np.linalg.norm(u)
                ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            if t == 1 and n == "head.weight":
                assert ratio == 1.0  # zero weight norm
            p[n] = p[n] - lr * SCALE[n] * ratio * u
    for n, param in model.named_parameters():
        np.testing.assert_allclose(param.detach().numpy(), p[n], rtol=1e-10, atol=1e-13, err_msg=n)


PEAK, WARMUP, TOTAL = 1e-3, 10, 110


@pytest.mark.parametrize("step,expected", [
    (0, 1e-6),
    (5, 1e-6 + (PEAK - 1e-6) * 0.5),
    (10, PEAK),
    (60, 1e-5 + (PEAK - 1e-5) * 0.5),  # cos(pi / 2) = 0
    (85, 1e-5 + (PEAK - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.75))),
    (110, 1e-5),
    (500, 1e-5),
])
def test_schedule_values(step, expected):
    assert lr_at(step, PEAK, WARMUP, TOTAL) == pytest.approx(expected, rel=1e-12)
    as_tensor = lr_at(torch.tensor(step), PEAK, WARMUP, TOTAL)
    assert as_tensor.dtype == torch.float32 and as_tensor.dim() == 0
    assert as_tensor.item() == pytest.approx(expected, rel=1e-6)


def test_schedule_without_warmup_starts_at_peak():
    assert lr_at(0, PEAK, 0, TOTAL) == pytest.approx(PEAK, rel=1e-12)
    assert lr_at(torch.tensor(0), PEAK, 0, TOTAL).item() == pytest.approx(PEAK, rel=1e-6)


def _train(device, name, steps, on_step=None):
    torch.manual_seed(0)
    model = timm.create_model("kan_vit_tiny_patch16_224", depth=1, img_size=16, patch_size=8, embed_dim=16,
                              num_heads=2, num_classes=3, polynomial_degree=2).to(device)
    opt = create_optimizer(model, OptimConfig(optimizer=name, lr_decay=0.7))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=gen).to(device)
    y = torch.tensor([0, 2]).to(device)
    step = torch.zeros((), dtype=torch.int64, device=device)
    for i in range(steps):
        # warmup 3, end 5: the steps cross warmup, cosine and the constant tail
        set_lr(opt, lr_at(step, 1e-2, 3, 5))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        step.add_(1)
        if on_step:
            on_step(i)
    return model


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_xla_lr_changes_add_no_compilation_or_fallback(name):
    torch_xla = pytest.importorskip("torch_xla")
    import torch_xla.debug.metrics as met

    def on_step(i):
        torch_xla.sync()
        if i == 1:  # after 2 steps: every graph of the loop exists
            met.clear_all()

    model = _train(torch_xla.device(), name, 7, on_step)
    compile_time = met.metric_data("CompileTime")
    assert compile_time is None or compile_time[0] == 0
    assert [c for c in met.counter_names() if c.startswith("aten::")] == []
    if name == "adamw":  # step count and lr on the device: nothing uploaded per step
        assert met.metric_data("TransferToDeviceTime") is None
    # the same updates as on the CPU, except the key bias: its gradient is exactly 0 in theory
    # (softmax ignores it), so Adam turns float noise, which differs by backend, into steps.
    reference = dict(_train("cpu", name, 7).named_parameters())
    for n, p in model.named_parameters():
        got, want = p.detach().cpu(), reference[n].detach()
        if n.endswith("attn.qkv.bias"):
            dim = got.shape[0] // 3
            got, want = torch.cat([got[:dim], got[2 * dim:]]), torch.cat([want[:dim], want[2 * dim:]])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=n)
