"""KAN-ViT / DeiT-JAX models: timm integration, sizes, init, equality with the original's math and
the ablation switches; then the registered models wherever PyTorch users take a model: timm's
model-test checks that apply to ViTs (forward, backward, default cfg, features, intermediates, fx,
TorchScript), then torch.compile and torch.export, each checked against eager."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from numpy_reference import forward as reference_forward
from numpy_reference import random_params
from timm.models._features_fx import FeatureGraphNet, create_feature_extractor, get_graph_node_names
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

import kan_vit  # noqa: F401  (registers the models)
from kan_vit import ChebyKAN
from kan_vit.flax.layout import flax_to_timm
from kan_vit.training.config import load
from kan_vit.training.model_factory import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_digits.yaml")

KAN_MODELS = ["kan_vit_tiny_patch16_224", "kan_vit_small_patch16_224", "kan_vit_base_patch16_224"]
MLP_MODELS = ["deit_jax_tiny_patch16_224", "deit_jax_small_patch16_224", "deit_jax_base_patch16_224"]
SMALL = dict(img_size=32, depth=2, num_classes=7)


def expected_param_count(
    dim, layers=12, patch=16, grid=14, labels=1000, degree=None, learnable=True, cls=True, layerscale=False
):
    """Closed form of the original's parameter count (the tree in docs/original.md, "Checkpoints")."""
    embed = patch * patch * 3 * dim + dim + (grid * grid * dim if learnable else 0) + (dim if cls else 0)
    attn = 3 * (dim * dim + dim) + dim * dim + dim
    ff = dim * dim * (degree + 1) if degree else (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)
    layer = 4 * dim + attn + ff + (2 * dim if layerscale else 0)
    head = dim * labels + labels if labels else 0
    return embed + layers * layer + 2 * dim + head


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_registered():
    assert timm.list_models("kan_vit*") == sorted(KAN_MODELS)
    assert timm.list_models("deit_jax*") == sorted(MLP_MODELS)


@pytest.mark.parametrize("name", KAN_MODELS + MLP_MODELS)
def test_small_models_build_and_run(name):
    model = timm.create_model(name, **SMALL).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name,dim",
    [
        ("kan_vit_small_patch16_224", 384),
        ("deit_jax_small_patch16_224", 384),
        ("kan_vit_tiny_patch16_224", 192),
        ("deit_jax_tiny_patch16_224", 192),
    ],
)
def test_param_counts(name, dim):
    model = timm.create_model(name)
    degree = 8 if name.startswith("kan") else None
    assert n_params(model) == expected_param_count(dim, degree=degree)


def test_published_sizes():
    assert expected_param_count(384, degree=8) == 23_796_712
    assert expected_param_count(384) == 22_050_280
    with torch.device("meta"):
        assert n_params(timm.create_model("kan_vit_base_patch16_224")) == expected_param_count(768, degree=8)
        assert n_params(timm.create_model("deit_jax_base_patch16_224")) == expected_param_count(768)


def test_options_change_the_architecture():
    model = timm.create_model(
        "kan_vit_tiny_patch16_224",
        img_size=32,
        depth=2,
        num_classes=3,
        polynomial_degree=2,
        posemb="sincos2d",
        pooling="gap",
        layerscale=True,
        drop_path_rate=0.2,
    )
    assert model.pos_embed is None and model.cls_token is None and model.num_prefix_tokens == 0
    assert model.blocks[0].mlp.kan.coefficients.shape == (192, 192, 3)
    assert torch.all(model.blocks[1].ls2.gamma == 1e-4)
    assert model.blocks[1].drop_path2.drop_prob == pytest.approx(0.2)
    assert n_params(model) == expected_param_count(
        192, layers=2, grid=2, labels=3, degree=2, learnable=False, cls=False, layerscale=True
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(posemb="sincos"), "posemb must be one of"),
        (dict(pooling="avg"), "pooling must be one of"),
        (dict(polynomial_degree=0), "degree must be an integer >= 1"),
        (dict(global_pool="avg"), "set pooling= instead"),
        (dict(act_layer="gelu"), "fixes timm's 'act_layer'"),
        (dict(drop_path_schedule="cosine"), "drop_path_schedule must be one of"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("kan_vit_tiny_patch16_224", **SMALL, **kwargs)


def test_original_init():
    """Kernels/embeddings ~ N(0, 0.02) truncated at +-2 std, biases 0, LN (1, 0), KAN std 1/(D(K+1))."""
    torch.manual_seed(0)
    model = timm.create_model("kan_vit_small_patch16_224", layerscale=True)
    truncated_std = 0.02 * 0.8796  # std of a standard normal truncated to [-2, 2]
    for name, p in model.named_parameters():
        if name.endswith(".weight") and p.ndim >= 2 or name in ("pos_embed", "cls_token"):
            assert p.abs().max() <= 0.04 + 1e-7, name
            if p.numel() > 10000:
                assert abs(p.std().item() / truncated_std - 1) < 0.05, name
        elif name.endswith("coefficients"):
            assert abs(p.std().item() * 384 * 9 - 1) < 0.05, name
        elif name.endswith("gamma"):
            assert torch.all(p == 1e-4), name
        elif "norm" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
        else:
            assert name.endswith("bias") and torch.all(p == 0), name


def test_timm_api():
    model = timm.create_model("kan_vit_tiny_patch16_224", **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 4, 192)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 192)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(11)
    assert model(x).shape == (2, 11)
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert model.pretrained_cfg["crop_pct"] == 0.875
    features = timm.create_model("kan_vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0).eval()
    assert features(x).shape == (2, 192)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model("kan_vit_tiny_patch16_224", **SMALL, drop_path_rate=0.3).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    grads = []
    for ckpt in (False, True):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad()
        torch.manual_seed(1)  # same drop-path draws in both runs
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ("constant", [0.1, 0.1, 0.1, 0.1]),  # the original: Dropout(droppath) in every block
        ("linear", [0.0, 0.1 / 3, 0.2 / 3, 0.1]),  # timm's ramp, also what drop_path_rate alone gives
    ],
)
def test_drop_path_schedule_rate_of_every_block(schedule, expected):
    def rates(model):
        return [
            getattr(getattr(b, name), "drop_prob", 0.0)  # rate 0: an Identity
            for b in model.blocks
            for name in ("drop_path1", "drop_path2")
        ]

    kwargs = dict(img_size=32, depth=4, num_classes=7, drop_path_rate=0.1)
    model = timm.create_model("kan_vit_tiny_patch16_224", **kwargs, drop_path_schedule=schedule)
    assert rates(model) == pytest.approx([r for r in expected for _ in range(2)], abs=1e-7)
    if schedule == "linear":
        assert rates(timm.create_model("kan_vit_tiny_patch16_224", **kwargs)) == rates(model)


def test_drop_path_drops_whole_samples_and_rescales():
    """Train mode with drop path 0.5: each sample's residual branch is either 0 or scaled by 2."""
    torch.manual_seed(0)
    model = timm.create_model("kan_vit_tiny_patch16_224", **SMALL, drop_path_rate=0.5).double()
    block = model.blocks[1]  # rate 0.5 (timm's linear rule ends at the given rate)
    x = torch.randn(64, 5, 192, dtype=torch.float64)
    block.eval()
    branch = block.ls1(block.attn(block.norm1(x)))
    block.train()
    torch.manual_seed(3)
    out = block.drop_path1(branch)
    kept = out.flatten(1).abs().sum(1) > 0
    assert 0 < kept.sum() < 64
    torch.testing.assert_close(out[kept], 2 * branch[kept])
    assert torch.all(out[~kept] == 0)


@pytest.mark.parametrize(
    "variant",
    [
        dict(degree=3, posemb="learnable", pooling="cls", layerscale=False),
        dict(degree=4, posemb="sincos2d", pooling="gap", layerscale=True),
        dict(degree=None, posemb="learnable", pooling="cls", layerscale=False),
    ],
)
def test_matches_numpy_reference_float64(variant):
    """The original's function (docs/original.md, "Forward pass"): max |dlogits| <= 1e-6, float64."""
    params = random_params(seed=1, layers=3, dim=16, heads=2, patch=4, grid=3, labels=5, **variant)
    state_dict, name, model_args = flax_to_timm(params, image_size=12)
    model = timm.create_model(name, **model_args).double().eval()
    model.load_state_dict({k: v.double() for k, v in state_dict.items()})
    images = np.random.default_rng(0).standard_normal((4, 3, 12, 12))
    expected = reference_forward(params, images)
    logits = model(torch.from_numpy(images)).detach().numpy()
    assert np.abs(logits - expected).max() <= 1e-6
    # train mode without dropout / drop path is the same function
    model.train()
    assert np.abs(model(torch.from_numpy(images)).detach().numpy() - expected).max() <= 1e-6


def test_xla_backend_runs_the_explicit_attention():
    """The XLA backend's model: timm's attention in its explicit form (q k^T, softmax, @ v); on the
    XLA device its float32 logits match the NumPy reference of the original."""
    import torch_xla

    from kan_vit.training.backend import XlaBackend

    params = random_params(seed=3, layers=2, dim=16, heads=2, patch=4, grid=3, labels=5, degree=3)
    state_dict, name, model_args = flax_to_timm(params, image_size=12)
    model = timm.create_model(name, **model_args)
    model.load_state_dict(state_dict)
    model = XlaBackend().prepare(model.to(torch_xla.device()))
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert attention and all(not m.fused_attn for m in attention)
    images = np.random.default_rng(1).standard_normal((3, 3, 12, 12))
    logits = model(torch.from_numpy(images).float().to(torch_xla.device())).cpu().detach().numpy()
    assert np.abs(logits - reference_forward(params, images)).max() <= 1e-4


def test_float32_and_bfloat16():
    params = random_params(seed=2, layers=2, dim=16, heads=2, patch=4, grid=3, labels=5, degree=3)
    state_dict, name, model_args = flax_to_timm(params, image_size=12)
    model = timm.create_model(name, **model_args).eval()
    model.load_state_dict(state_dict)
    images = np.random.default_rng(0).standard_normal((2, 3, 12, 12))
    expected = reference_forward(params, images)
    out32 = model(torch.from_numpy(images).float())
    assert out32.dtype == torch.float32
    assert np.abs(out32.detach().numpy() - expected).max() <= 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(torch.from_numpy(images).float())
    assert out16.dtype == torch.bfloat16
    assert np.abs(out16.float().detach().numpy() - expected).max() <= 0.1 * np.abs(expected).max()


def test_pretrained_file_overlay(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("kan_vit_tiny_patch16_224", **SMALL, layerscale=True).eval()
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = timm.create_model(
        "kan_vit_tiny_patch16_224",
        **SMALL,
        layerscale=True,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_pretrained_file_resamples_pos_embed(tmp_path):
    """A checkpoint from another grid loads with its position embedding resized (no class entry)."""
    source = timm.create_model("kan_vit_tiny_patch16_224", **SMALL)
    path = tmp_path / "weights.pth"
    torch.save({"model": source.state_dict()}, path)  # trainer-checkpoint layout
    loaded = timm.create_model(
        "kan_vit_tiny_patch16_224",
        img_size=48,
        depth=2,
        num_classes=7,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
    )
    assert loaded.pos_embed.shape == (1, 9, 192)
    torch.testing.assert_close(loaded.cls_token, source.cls_token)


def test_torch_xla_forward_backward():
    """One forward + backward of a KAN-ViT (with gradient checkpointing) on the XLA device."""
    import torch_xla

    device = torch_xla.device()
    torch.manual_seed(0)
    model = timm.create_model("kan_vit_tiny_patch16_224", **SMALL, drop_path_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    model.eval()  # no drop path: a deterministic comparison across devices
    model.zero_grad()
    model(x).square().mean().backward()
    cpu_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.to(device).eval()
    model.set_grad_checkpointing(True)
    model.zero_grad()
    loss = model(x.to(device)).square().mean()
    loss.backward()
    torch_xla.sync()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), cpu_grads[n], rtol=1e-3, atol=1e-5, msg=n)
    assert math.isfinite(loss.item())


HUB_SCRIPT = """
import sys, timm, torch, kan_vit
from huggingface_hub.errors import LocalEntryNotFoundError
from kan_vit.flax import msgpack as flax_msgpack
from kan_vit.flax.layout import flax_to_timm

try:  # an empty cache: the hub download is really attempted, and refused offline
    timm.create_model("deit_jax_tiny_patch16_224.in1k", pretrained=True, cache_dir=sys.argv[2])
    raise SystemExit("loaded without the file")
except LocalEntryNotFoundError:
    pass
expected, _, _ = flax_to_timm(flax_msgpack.load(sys.argv[1]))
model = timm.create_model("deit_jax_tiny_patch16_224.in1k", pretrained=True)
assert model.state_dict().keys() == expected.keys()
for key, value in model.state_dict().items():
    assert torch.equal(value, expected[key]), key
retargeted = timm.create_model("deit_jax_tiny_patch16_224.in1k", pretrained=True, num_classes=10)
assert retargeted.head.out_features == 10  # a new head; the rest is the checkpoint's
assert torch.equal(retargeted.pos_embed, expected["pos_embed"])
print("loaded from", model.pretrained_cfg["hf_hub_id"], model.pretrained_cfg["hf_hub_filename"])
"""


@pytest.mark.slow
def test_hub_tag_loads_the_original_msgpack_from_the_hub_cache(tmp_path):
    """`deit_jax_*.in1k` goes through timm's hub download (offline, the file already where the
    hub cache keeps it) and converts the original's Flax file on load."""
    from flax.serialization import msgpack_serialize

    cfg = timm.get_pretrained_cfg("deit_jax_tiny_patch16_224.in1k")
    assert (cfg.hf_hub_id, cfg.hf_hub_filename) == ("affjljoo3581/deit3-jax", "deit-t16-224-in1k-300ep-best.msgpack")
    params = random_params(seed=5, layers=12, dim=192, heads=3, patch=16, grid=14, labels=1000, degree=None)
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--affjljoo3581--deit3-jax"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / cfg.hf_hub_filename).write_bytes(msgpack_serialize(params))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    result = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, str(snapshot / cfg.hf_hub_filename), str(tmp_path / "empty")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "loaded from affjljoo3581/deit3-jax deit-t16-224-in1k-300ep-best.msgpack" in result.stdout


# --- ablation switches (built from the demo config) -----------------------------------------


def _model(*overrides):
    return build_model(load(DEMO, list(overrides) + ["model.layers=2"]))


def test_input_scale_is_a_new_parameter_applied_before_tanh():
    model = _model("model.kan_input_scale=true", "model.polynomial_degree=3")
    kan = model.blocks[0].mlp.kan
    assert [n for n, _ in model.named_parameters() if n.endswith("input_scale")] == [
        "blocks.0.mlp.kan.input_scale",
        "blocks.1.mlp.kan.input_scale",
    ]
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


# --- wherever PyTorch users take a model: timm's model-test checks, torch.compile, torch.export
# Small shapes (64 px, depth 2) where a check allows; every registered name is exercised.

MODELS = timm.list_models("kan_vit*") + timm.list_models("deit_jax*")


EXPORT_SMALL = dict(img_size=64, depth=2)


def _small(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(EXPORT_SMALL, **kwargs))


def _images(batch=2, size=64):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, fn, x):
    """fn(x) and the parameter gradients of its mean square (which every output element feeds)."""
    model.zero_grad(set_to_none=True)
    out = fn(x)
    out.square().mean().backward()
    return out.detach(), _grads(model)


def _assert_grads_close(got, want, rtol):
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-30)
        assert err <= rtol, (name, err.item())


def test_all_six_registered():
    assert sorted(MODELS) == sorted(
        f"{kind}_{size}_patch16_224" for kind in ("kan_vit", "deit_jax") for size in ("tiny", "small", "base")
    )


# timm's model checks -------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_default_cfg(name):
    """timm's default-cfg check on the full registered model."""
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and model.patch_embed.img_size == (224, 224)
    assert cfg["num_classes"] == model.num_classes == 1000
    state_dict = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state_dict
    assert cfg["classifier"] + ".weight" in state_dict
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (1, 1 + 14 * 14, model.num_features)
        assert model.forward_head(features).shape == (1, 1000)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)


@pytest.mark.parametrize("name", MODELS)
def test_forward(name):
    model = _small(name).eval()
    with torch.no_grad():
        out = model(_images())
    assert out.shape == (2, 1000) and not out.isnan().any()


@pytest.mark.parametrize("name", MODELS)
def test_backward(name):
    """Every parameter gets a gradient (timm's check), at a non-default class count."""
    model = _small(name, num_classes=42).train()
    out = model(_images())
    out.mean().backward()
    assert out.shape == (2, 42)
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.grad is not None} == params.keys()
    assert not any(p.grad.isnan().any() for p in params.values())


@pytest.mark.parametrize("name", MODELS)
def test_features_only_and_intermediates(name):
    """timm's features_only wrapper and forward_intermediates agree with forward_features."""
    model = _small(name).eval()
    x = _images()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        features = timm.create_model(name, features_only=True, out_indices=(0, 1), **EXPORT_SMALL).eval()
        assert not features.model.load_state_dict(model.state_dict(), strict=False).missing_keys
        maps = features(x)
    grid = 64 // 16
    for info, out in zip(model.feature_info, intermediates):
        assert out.shape == (2, info["num_chs"], grid, grid)
    assert len(maps) == len(intermediates) == 2
    for got, want in zip(maps, intermediates):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# fx (timm's helpers) ------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_fx_forward_and_backward(name):
    """timm's fx feature extractor: the traced graph's output and gradients equal eager's."""
    model = _small(name)
    x = _images()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert not any(".kan." in node for node in eval_nodes), "ChebyKAN is a leaf"
    fx_eval = create_feature_extractor(model.eval(), [eval_nodes[-1]])
    with torch.no_grad():
        torch.testing.assert_close(next(iter(fx_eval(x).values())), model(x), rtol=0, atol=0)

    model.train()
    fx_train = create_feature_extractor(model, [train_nodes[-1]])
    out, grads = _loss_and_grads(model, lambda t: next(iter(fx_train(t).values())), x)
    out_ref, grads_ref = _loss_and_grads(model, model, x)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    _assert_grads_close(grads, grads_ref, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_fx_feature_graph_net(name):
    """FeatureGraphNet (fx feature extraction from feature_info) returns the blocks' outputs."""
    model = _small(name).eval()
    x = _images()
    net = FeatureGraphNet(model, out_indices=(0, 1))
    outputs = []
    hooks = [block.register_forward_hook(lambda m, i, o: outputs.append(o)) for block in model.blocks]
    with torch.no_grad():
        model(x)
        for hook in hooks:
            hook.remove()
        for got, want in zip(net(x), outputs, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


# TorchScript ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("variant", [{}, dict(posemb="sincos2d", pooling="gap", dynamic_img_size=True)])
def test_torchscript_matches_eager(name, variant):
    """Scripted, the KAN runs the einsum formulation: equal to the Function up to rounding."""
    model = _small(name, **variant).eval()
    scripted = torch.jit.script(model)
    x = _images(size=48 if variant else 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


# torch.compile -------------------------------------------------------------------------------
def _check_compiled(name, backend, train):
    """Compiled forward + backward (fullgraph) vs eager: outputs 1e-4, gradients 1e-3 relative.
    One block at 32 px: compile time grows with depth."""
    model = _small(name, img_size=32, depth=1).train(train)
    x = _images(size=32)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out, grads = _loss_and_grads(model, compiled, x)
    out_ref, grads_ref = _loss_and_grads(model, model, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    _assert_grads_close(grads, grads_ref, rtol=1e-3)
    assert len(grads) == len(list(model.parameters()))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_aot_eager_matches_eager(name, train):
    """Dynamo + AOTAutograd (functionalized graphs, no code generation)."""
    torch._dynamo.reset()
    _check_compiled(name, "aot_eager", train)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, train",
    [(name, False) for name in MODELS] + [("kan_vit_tiny_patch16_224", True), ("deit_jax_tiny_patch16_224", True)],
    ids=lambda value: {True: "train", False: "eval"}.get(value, value),
)
def test_compile_inductor_matches_eager(name, train):
    """The default backend: inductor's generated C++ kernels. Training (the backward's kernels,
    5-16 s per model) on one model of each family: the S and B sizes run the same code."""
    torch._dynamo.reset()
    _check_compiled(name, "inductor", train)


def _compiled_saved_for_backward(layer, x):
    """Tensors the compiled forward saves for backward, split by inductor's partitioner."""
    forward_graphs = []

    def forward_compiler(graph_module, example_inputs):
        forward_graphs.append(graph_module)
        return make_boxed_func(graph_module.forward)

    backend = aot_autograd(
        fw_compiler=forward_compiler,
        bw_compiler=lambda graph_module, example_inputs: make_boxed_func(graph_module.forward),
        partition_fn=min_cut_rematerialization_partition,
    )
    torch._dynamo.reset()
    torch.compile(layer, backend=backend, fullgraph=True)(x).sum().backward()
    (graph,) = forward_graphs
    (output,) = [node for node in graph.graph.nodes if node.op == "output"]
    # outputs: the layer's one output, then what is saved for backward
    return [node.meta["val"] for node in output.args[0][1:] if node is not None]


def test_compiled_kan_saves_only_its_input():
    """Under torch.compile the KAN saves x (and its coefficients) as in eager, not the basis;
    the einsum formulation, compiled the same way, saves several input-sized tensors."""
    d, tokens = 32, 10
    x = torch.randn(tokens, d, requires_grad=True)
    layer = ChebyKAN(d, d, 8)
    saved = _compiled_saved_for_backward(layer, x)
    activations = [t for t in saved if t.shape != layer.coefficients.shape]
    assert [tuple(t.shape) for t in activations] == [(tokens, d)], [t.shape for t in saved]

    reference = ChebyKAN(d, d, 8, memory_efficient=False)
    saved_ref = _compiled_saved_for_backward(reference, x)
    assert sum(t.numel() for t in saved_ref) - reference.coefficients.numel() > 2 * tokens * d


# torch.export --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_export_matches_eager(name):
    """The exported program, and its core-ATen decomposition (what runtimes consume), run as
    called (grad mode on: no out= ops into views in the graph) and equal eager to 1e-5."""
    model = _small(name).eval()
    program = torch.export.export(model, (_images(),))
    decomposed = program.run_decompositions()
    for x in (_images(), 2 * _images()):  # other values: the graph did not fold its example
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(program.module()(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decomposed.module()(x), want, rtol=1e-5, atol=1e-5)
