"""The registered models wherever PyTorch users take a model: timm's model-test checks that apply
to ViTs (forward, backward, default cfg, features, intermediates, fx, TorchScript), then
torch.compile and torch.export, each checked against eager.

Small shapes (64 px, depth 2) where a check allows; every registered name is exercised.
"""
import pytest
import timm
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition
from timm.models._features_fx import FeatureGraphNet, create_feature_extractor, get_graph_node_names

import kan_vit  # noqa: F401  (registers the models)
from kan_vit import ChebyKAN

MODELS = timm.list_models("kan_vit*") + timm.list_models("deit_jax*")
SMALL = dict(img_size=64, depth=2)


def _small(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **dict(SMALL, **kwargs))


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
        features = timm.create_model(name, features_only=True, out_indices=(0, 1), **SMALL).eval()
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
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_inductor_matches_eager(name, train):
    """The default backend: inductor's generated C++ kernels."""
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
