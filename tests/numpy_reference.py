"""Independent NumPy re-implementation of the original JAX/Flax KAN-ViT forward pass (eval mode).

Runs directly on the original's parameter tree (nested dict, layout in docs/original.md, "Checkpoints"),
so it shares no code with the PyTorch model or the converter. Everything the architecture needs
is read off the tree: heads from wq's kernel, K from the coefficients, pooling from cls_token,
posemb from wpe, layerscale from scale1. Used by the model and converter tests in float64.
"""

from __future__ import annotations

import math

import numpy as np

LAYERNORM_EPS = 1e-6


def _layernorm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LAYERNORM_EPS) * p["scale"] + p["bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _sincos2d(grid, dim):
    freqs = 1.0 / 10000 ** np.linspace(0.0, 1.0, dim // 4)
    h, w = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    wf = w.reshape(-1, 1) * freqs
    hf = h.reshape(-1, 1) * freqs
    return np.concatenate([np.sin(wf), np.cos(wf), np.sin(hf), np.cos(hf)], axis=1)


def _attention(x, p):
    q = np.einsum("bnd,dhk->bnhk", x, p["wq"]["kernel"]) + p["wq"]["bias"]
    k = np.einsum("bnd,dhk->bnhk", x, p["wk"]["kernel"]) + p["wk"]["bias"]
    v = np.einsum("bnd,dhk->bnhk", x, p["wv"]["kernel"]) + p["wv"]["bias"]
    q = q / math.sqrt(q.shape[-1])
    scores = np.einsum("bqhk,bshk->bhqs", q, k)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs = probs / probs.sum(-1, keepdims=True)
    out = np.einsum("bhqs,bshk->bqhk", probs, v)
    return np.einsum("bqhk,hkd->bqd", out, p["wo"]["kernel"]) + p["wo"]["bias"]


def _feed_forward(x, p):
    if "ChebyKAN_0" in p:
        coef = p["ChebyKAN_0"]["coefficients"]  # (in, out, K + 1)
        t = np.tanh(x)
        basis = [np.ones_like(t), t]
        for _ in range(2, coef.shape[-1]):
            basis.append(2 * t * basis[-1] - basis[-2])
        basis = np.stack(basis[: coef.shape[-1]], axis=-1)
        return np.einsum("bnik,ijk->bnj", basis, coef)
    h = _gelu_tanh(x @ p["w1"]["kernel"] + p["w1"]["bias"])
    return h @ p["w2"]["kernel"] + p["w2"]["bias"]


def forward(params: dict, images: np.ndarray) -> np.ndarray:
    """Logits (or pooled features when there is no head) for normalised NCHW float images."""
    p = params["model"]
    images = np.asarray(images, dtype=np.float64)
    kernel = p["embed"]["wte"]["kernel"]  # (P, P, 3, D), HWIO
    patch, dim = kernel.shape[0], kernel.shape[-1]
    b, c, height, width = images.shape
    gh, gw = height // patch, width // patch
    patches = images.reshape(b, c, gh, patch, gw, patch).transpose(0, 2, 4, 3, 5, 1)
    x = np.einsum("bhwpqc,pqcd->bhwd", patches, kernel) + p["embed"]["wte"]["bias"]
    x = x.reshape(b, gh * gw, dim)

    if "wpe" in p["embed"]:
        x = x + p["embed"]["wpe"].reshape(gh * gw, dim)
    else:
        assert gh == gw, "the reference sincos2d table is square"
        x = x + _sincos2d(gh, dim)
    if "cls_token" in p["embed"]:
        cls = np.broadcast_to(p["embed"]["cls_token"], (b, 1, dim))
        x = np.concatenate([cls, x], axis=1)

    i = 0
    while f"layer_{i}" in p:
        layer = p[f"layer_{i}"]
        scale1 = layer.get("scale1", 1.0)
        scale2 = layer.get("scale2", 1.0)
        x = x + scale1 * _attention(_layernorm(x, layer["norm1"]), layer["attn"])
        x = x + scale2 * _feed_forward(_layernorm(x, layer["norm2"]), layer["ff"])
        i += 1

    x = _layernorm(x, p["norm"])
    x = x[:, 0] if "cls_token" in p["embed"] else x.mean(axis=1)
    if "head" in p:
        x = x @ p["head"]["kernel"] + p["head"]["bias"]
    return x


def random_params(
    seed: int = 0,
    *,
    layers: int = 2,
    dim: int = 16,
    heads: int = 2,
    patch: int = 4,
    grid: int = 3,
    labels: int | None = 5,
    degree: int | None = 3,
    posemb: str = "learnable",
    pooling: str = "cls",
    layerscale: bool = False,
    dtype=np.float32,
) -> dict:
    """A random tree shaped as the original's checkpoint (`degree=None`: the MLP variant).

    Values are O(0.1-1), not init-like, so every branch (layer scales, KAN, biases) matters.
    """
    rng = np.random.default_rng(seed)

    def normal(*shape, std=0.2, mean=0.0):
        return (mean + std * rng.standard_normal(shape)).astype(dtype)

    head_dim = dim // heads
    embed = {"wte": {"kernel": normal(patch, patch, 3, dim), "bias": normal(dim)}}
    if posemb == "learnable":
        embed["wpe"] = normal(grid, grid, dim)
    if pooling == "cls":
        embed["cls_token"] = normal(1, 1, dim)
    model = {"embed": embed}
    for i in range(layers):
        layer = {
            "norm1": {"scale": normal(dim, mean=1.0), "bias": normal(dim)},
            "attn": {
                **{
                    w: {"kernel": normal(dim, heads, head_dim), "bias": normal(heads, head_dim)}
                    for w in ("wq", "wk", "wv")
                },
                "wo": {"kernel": normal(heads, head_dim, dim), "bias": normal(dim)},
            },
            "norm2": {"scale": normal(dim, mean=1.0), "bias": normal(dim)},
        }
        if degree is None:
            layer["ff"] = {
                "w1": {"kernel": normal(dim, 4 * dim), "bias": normal(4 * dim)},
                "w2": {"kernel": normal(4 * dim, dim), "bias": normal(dim)},
            }
        else:
            layer["ff"] = {"ChebyKAN_0": {"coefficients": normal(dim, dim, degree + 1, std=0.05)}}
        if layerscale:
            layer["scale1"] = normal(dim, mean=0.5)
            layer["scale2"] = normal(dim, mean=0.5)
        model[f"layer_{i}"] = layer
    model["norm"] = {"scale": normal(dim, mean=1.0), "bias": normal(dim)}
    if labels is not None:
        model["head"] = {"kernel": normal(dim, labels), "bias": normal(labels)}
    return {"model": model}
