"""Optimization (docs/original.md, "Training") against closed forms written out here in NumPy / math,
and the XLA step: no recompiles or CPU fallbacks when the lr changes."""

import math
import os

import numpy as np
import pytest
import timm
import torch
from torch import nn

import kan_vit  # noqa: F401  (registers the models)
from kan_vit.training.config import OptimConfig, load
from kan_vit.training.model_factory import build_model
from kan_vit.training.optim import GroupStepAdamW, create_optimizer, lr_at, param_groups, set_lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_digits.yaml")


def toy_vit(**kwargs):
    return timm.create_model(
        "kan_vit_tiny_patch16_224", depth=3, img_size=32, embed_dim=32, num_heads=2, num_classes=5, **kwargs
    )


def group_of(groups):
    return {id(p): g for g in groups for p in g["params"]}


@pytest.mark.parametrize(
    "name,ff_kernels",
    [
        ("kan_vit_tiny_patch16_224", ()),
        ("deit_jax_tiny_patch16_224", ("mlp.fc1.weight", "mlp.fc2.weight")),
    ],
)
def test_decay_mask_is_linear_and_conv_weights_only(name, ff_kernels):
    model = timm.create_model(name, depth=3, img_size=32, embed_dim=32, num_heads=2, num_classes=5, layerscale=True)
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
    expected = {
        "cls_token": 0.125,
        "pos_embed": 0.125,
        "patch_embed.proj.weight": 0.125,
        "patch_embed.proj.bias": 0.125,
        "blocks.0.attn.qkv.weight": 0.25,
        "blocks.0.mlp.kan.coefficients": 0.25,
        "blocks.1.norm1.bias": 0.5,
        "blocks.2.attn.proj.weight": 1.0,
        "norm.weight": 1.0,
        "head.weight": 1.0,
        "head.bias": 1.0,
    }
    scales = {n: by_id[id(p)]["lr_scale"] for n, p in model.named_parameters()}
    assert {n: scales[n] for n in expected} == expected
    assert {s for n, s in scales.items() if n.startswith("blocks.1.")} == {0.5}


@pytest.mark.parametrize("name,layerscale", [("kan_vit_tiny_patch16_224", False), ("deit_jax_tiny_patch16_224", True)])
def test_timm_create_optimizer_v2_gives_the_trainers_groups(name, layerscale):
    """timm's own factory, through no_weight_decay() and group_matcher(), builds the same
    (lr_scale, weight_decay) partition of the parameters as the trainer."""
    model = timm.create_model(
        name, depth=3, img_size=32, embed_dim=32, num_heads=2, num_classes=5, layerscale=layerscale
    )

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


# --- Parity with the original's optax chain, in float64 ---------------------------------------
# The original: clip_by_global_norm(clip) -> adamw | modified_lamb (scale_by_adam, decayed weights
# and trust ratio on `kernel` leaves only) -> lr from warmup_cosine_decay_schedule (float32) ->
# multi_transform layer scales lr_decay ** (L - layer). Re-computed here in NumPy on the original's
# leaves: the fused qkv weight and bias are its separate wq / wk / wv leaves.

# timm name (after "blocks.k.") -> the original's leaf names under model/layer_k (or model/)
ORIGINAL_LEAVES = {
    "patch_embed.proj.weight": ["embed/wte/kernel"],
    "patch_embed.proj.bias": ["embed/wte/bias"],
    "pos_embed": ["embed/wpe"],
    "cls_token": ["embed/cls_token"],
    "norm1.weight": ["norm1/scale"],
    "norm1.bias": ["norm1/bias"],
    "attn.qkv.weight": ["attn/wq/kernel", "attn/wk/kernel", "attn/wv/kernel"],
    "attn.qkv.bias": ["attn/wq/bias", "attn/wk/bias", "attn/wv/bias"],
    "attn.proj.weight": ["attn/wo/kernel"],
    "attn.proj.bias": ["attn/wo/bias"],
    "ls1.gamma": ["scale1"],
    "ls2.gamma": ["scale2"],
    "norm2.weight": ["norm2/scale"],
    "norm2.bias": ["norm2/bias"],
    "mlp.kan.coefficients": ["ff/ChebyKAN_0/coefficients"],
    "mlp.fc1.weight": ["ff/w1/kernel"],
    "mlp.fc1.bias": ["ff/w1/bias"],
    "mlp.fc2.weight": ["ff/w2/kernel"],
    "mlp.fc2.bias": ["ff/w2/bias"],
    "norm.weight": ["norm/scale"],
    "norm.bias": ["norm/bias"],
    "head.weight": ["head/kernel"],
    "head.bias": ["head/bias"],
}


def original_leaves(name):
    """[(the original's path, (i, n): the i-th of n row blocks of the timm tensor)] for one parameter."""
    prefix, rest = "model/", name
    if name.startswith("blocks."):
        _, k, rest = name.split(".", 2)
        prefix = f"model/layer_{k}/"
    leaves = ORIGINAL_LEAVES[rest]
    return [(prefix + leaf, (i, len(leaves))) for i, leaf in enumerate(leaves)]


def _rows(array, part):
    i, n = part
    size = array.shape[0] // n
    return array[i * size : (i + 1) * size]


def original_lr(count, peak, warmup, total):
    """optax.warmup_cosine_decay_schedule(1e-6, peak, warmup, total, end_value=1e-5), in float32."""
    if count < warmup:
        return np.float32(1e-6 + (peak - 1e-6) * count / warmup)
    alpha = 1e-5 / peak
    cosine = 0.5 * (1 + math.cos(math.pi * min(count - warmup, total - warmup) / (total - warmup)))
    return np.float32(peak * ((1 - alpha) * cosine + alpha))


class OriginalOptimizer:
    """The original's update rule on a dict {path: float64 array}."""

    def __init__(self, params, cfg, num_layers, schedule):
        self.p, self.cfg, self.num_layers, self.schedule = params, cfg, num_layers, schedule
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.count = 0

    def layer(self, path):
        part = path.split("/")[1]
        if part.startswith("layer_"):
            return int(part[len("layer_") :]) + 1
        return 0 if part == "embed" else self.num_layers

    def update(self, grads):
        c, t = self.cfg, self.count + 1
        if c.clip_grad > 0:  # optax.clip_by_global_norm
            norm = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
            if norm >= c.clip_grad:
                grads = {k: g / norm * c.clip_grad for k, g in grads.items()}
        lr = float(original_lr(self.count, *self.schedule))
        for k, g in grads.items():
            self.m[k] = c.adam_b1 * self.m[k] + (1 - c.adam_b1) * g
            self.v[k] = c.adam_b2 * self.v[k] + (1 - c.adam_b2) * g * g
            u = (self.m[k] / (1 - c.adam_b1**t)) / (np.sqrt(self.v[k] / (1 - c.adam_b2**t)) + c.adam_eps)
            kernel = k.endswith("/kernel")
            if kernel:
                u = u + c.weight_decay * self.p[k]
            if kernel and c.optimizer == "lamb":  # optax.scale_by_trust_ratio, per leaf
                p_norm, u_norm = np.linalg.norm(self.p[k]), np.linalg.norm(u)
                u = u * (p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0)
            self.p[k] = self.p[k] - lr * c.lr_decay ** (self.num_layers - self.layer(k)) * u
        self.count += 1


@pytest.mark.parametrize(
    "name,optim",
    [
        ("kan_vit_tiny_patch16_224", dict(optimizer="adamw", lr_decay=0.75, clip_grad=1.0)),
        ("kan_vit_tiny_patch16_224", dict(optimizer="lamb", lr_decay=0.75, clip_grad=1.0)),
        ("kan_vit_tiny_patch16_224", dict(optimizer="lamb", weight_decay=0.0)),  # trust ratio still on kernels
        ("deit_jax_tiny_patch16_224", dict(optimizer="adamw", lr_decay=0.5)),
        ("deit_jax_tiny_patch16_224", dict(optimizer="lamb", lr_decay=0.5)),
        ("kan_vit_tiny_patch16_224", dict(optimizer="adamw", lr_decay=0.75, clip_grad=1.0, xla_adamw=True)),
    ],
)
def test_ten_updates_match_the_original_optax_chain_float64(name, optim):
    """`xla_adamw`: the AdamW that create_optimizer picks for XLA devices, run on the CPU."""
    optim = dict(optim)
    xla_adamw = optim.pop("xla_adamw", False)
    steps, schedule = 10, (1e-2, 3, 8)  # warmup 3 of 8 updates: warmup, cosine and the 1e-5 tail
    cfg = OptimConfig(**{"weight_decay": 0.1, **optim})
    model = timm.create_model(
        name,
        depth=2,
        img_size=16,
        patch_size=8,
        embed_dim=16,
        num_heads=2,
        num_classes=5,
        polynomial_degree=2,
        layerscale=name.startswith("deit"),
    ).double()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(rng.normal(0.0, 0.3, p.shape)))
        model.head.weight.zero_()  # LAMB: a zero weight norm keeps the ratio at 1
    leaves = {n: original_leaves(n) for n, _ in model.named_parameters()}
    reference = OriginalOptimizer(
        {path: _rows(p.detach().numpy(), part).copy() for n, p in model.named_parameters() for path, part in leaves[n]},
        cfg,
        num_layers=2,
        schedule=schedule,
    )
    opt = create_optimizer(model, cfg)
    if xla_adamw:
        opt = GroupStepAdamW(opt.param_groups)
    for step in range(steps):
        # gradient norms ~0.05 (no clipping) and ~1e3 (clipped; LAMB must not clip on its own)
        scale = 1e-3 if step % 2 else 20.0
        grads = {n: scale * rng.standard_normal(p.shape) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = torch.from_numpy(grads[n].copy())
        set_lr(opt, lr_at(step, *schedule))  # the trainer's sequence
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        reference.update({path: _rows(grads[n], part) for n in grads for path, part in leaves[n]})
    for n, p in model.named_parameters():
        for path, part in leaves[n]:
            np.testing.assert_allclose(
                _rows(p.detach().numpy(), part), reference.p[path], rtol=0, atol=1e-6, err_msg=path
            )


PEAK, WARMUP, TOTAL = 1e-3, 10, 110


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 1e-6),
        (5, 1e-6 + (PEAK - 1e-6) * 0.5),
        (10, PEAK),
        (60, 1e-5 + (PEAK - 1e-5) * 0.5),  # cos(pi / 2) = 0
        (85, 1e-5 + (PEAK - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.75))),
        (110, 1e-5),
        (500, 1e-5),
    ],
)
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
    model = timm.create_model(
        "kan_vit_tiny_patch16_224",
        depth=1,
        img_size=16,
        patch_size=8,
        embed_dim=16,
        num_heads=2,
        num_classes=3,
        polynomial_degree=2,
    ).to(device)
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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_xla_lr_changes_add_no_compilation_or_fallback(name):
    import torch_xla
    import torch_xla.debug.metrics as met

    def on_step(i):
        torch_xla.sync()
        if i == 1:  # after 2 steps: every graph of the loop exists
            met.clear_all()

    model = _train(torch_xla.device(), name, 7, on_step)
    compile_time = met.metric_data("CompileTime")
    assert compile_time is None or compile_time[0] == 0
    assert [c for c in met.counter_names() if c.startswith("aten::")] == []
    assert met.metric_data("TransferToDeviceTime") is None  # step counts and lr on the device: no uploads
    # the same updates as on the CPU, except the key bias: its gradient is exactly 0 in theory
    # (softmax ignores it), so Adam turns float noise, which differs by backend, into steps.
    reference = dict(_train("cpu", name, 7).named_parameters())
    for n, p in model.named_parameters():
        got, want = p.detach().cpu(), reference[n].detach()
        if n.endswith("attn.qkv.bias"):
            dim = got.shape[0] // 3
            got, want = torch.cat([got[:dim], got[2 * dim :]]), torch.cat([want[:dim], want[2 * dim :]])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow
def test_xla_lamb_compiles_no_more_than_adamw_when_bias_corrections_saturate():
    """With betas 0.5, float32(1 - 0.5 ** t) reaches 1.0 at t = 25: a bias correction that were a
    host scalar would become XLA's special constant 1 there and compile a new graph."""
    import torch_xla
    import torch_xla.debug.metrics as met

    compiles, uploads = {}, {}
    for name in ("adamw", "lamb"):
        torch.manual_seed(0)
        device = torch_xla.device()
        model = timm.create_model(
            "deit_jax_tiny_patch16_224", depth=1, img_size=8, patch_size=4, embed_dim=8, num_heads=2, num_classes=3
        ).to(device)
        opt = create_optimizer(model, OptimConfig(optimizer=name, adam_b1=0.5, adam_b2=0.5))
        set_lr(opt, torch.tensor(1e-3, device=device))
        x, y = torch.randn(2, 3, 8, 8).to(device), torch.tensor([0, 2]).to(device)
        for step in range(30):
            if step == 2:  # the first update creates the optimizer state: its graph differs
                met.clear_all()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            torch_xla.sync()
        compiles[name] = (met.metric_data("CompileTime") or [0])[0]
        uploads[name] = (met.metric_data("TransferToDeviceTime") or [0])[0]
    assert compiles == {"adamw": 0, "lamb": 0}
    assert uploads == {"adamw": 0, "lamb": 0}


def test_xla_adamw_continues_a_torch_adamw_state_and_matches_its_updates():
    """GroupStepAdamW (one step count per group) against torch.optim.AdamW: 3 updates of torch's,
    its state_dict loaded (per-param counts), 3 more updates of either: the same parameters."""

    def model_and_groups():
        torch.manual_seed(0)
        model = timm.create_model(
            "deit_jax_tiny_patch16_224", depth=1, img_size=8, patch_size=4, embed_dim=8, num_heads=2, num_classes=3
        ).double()
        return model, param_groups(model, weight_decay=0.1, lr_decay=0.8)

    def update(model, opt, seed):
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()

    reference, groups = model_and_groups()
    torch_adamw = torch.optim.AdamW(groups, lr=1e-2)
    model, groups = model_and_groups()
    first = torch.optim.AdamW(groups, lr=1e-2)
    for seed in range(3):
        update(reference, torch_adamw, seed), update(model, first, seed)
    resumed = GroupStepAdamW(groups, lr=1e-2)
    resumed.load_state_dict(first.state_dict())
    for seed in range(3, 6):
        update(reference, torch_adamw, seed), update(model, resumed, seed)
    # float32 step counts (as torch's capturable AdamW and optax) round the bias corrections: ~2e-7
    # here; restarting the count at 0 would be off by ~1e-2
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)


def _model(*overrides):
    return build_model(load(DEMO, list(overrides) + ["model.layers=2"]))


def test_kan_weight_decay_adds_exactly_the_coefficients_to_the_decayed_params():
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}

    def decayed(**kwargs):
        return {
            names[id(p)] for g in param_groups(model, 0.05, 1.0, **kwargs) if g["weight_decay"] > 0 for p in g["params"]
        }

    assert decayed(kan_weight_decay=True) - decayed() == {
        "blocks.0.mlp.kan.coefficients",
        "blocks.1.mlp.kan.coefficients",
    }
