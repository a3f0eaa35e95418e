"""The original's Flax parameter tree and timm's state dict of the same model, leaf by leaf.

`flax_to_timm` / `timm_to_flax` convert the weights losslessly (docs/original.md, "Checkpoints");
the architecture is read off the tree itself (`infer_flax_architecture`) or off a model
(`model_architecture`), and `timm_model_for` names the registered timm model that builds it.
No files: `kan_vit.flax.msgpack` reads and writes the format, `kan_vit.convert` is the command line.
"""

from __future__ import annotations

import math
import re
import warnings
from functools import cache

import numpy as np
import torch

from kan_vit.models.vision_transformer import KanVisionTransformer

__all__ = [
    "ConvertError",
    "check_timm_semantics",
    "describe",
    "flatten",
    "flax_to_timm",
    "infer_flax_architecture",
    "model_architecture",
    "timm_model_for",
    "timm_to_flax",
]

DEFAULT_IMAGE_SIZE = 224
# timm names registered by kan_vit.models.vision_transformer, by feed-forward kind.
MODEL_NAMES = {
    True: ("kan_vit_tiny_patch16_224", "kan_vit_small_patch16_224", "kan_vit_base_patch16_224"),
    False: ("deit_jax_tiny_patch16_224", "deit_jax_small_patch16_224", "deit_jax_base_patch16_224"),
}


class ConvertError(ValueError):
    """A checkpoint that cannot be converted; the message names the problem."""


# ---------------------------------------------------------------------------------------------
# Architecture and the leaf-by-leaf mapping


def _mapping(arch: dict) -> list[tuple[str, tuple[str, ...], tuple, tuple, str]]:
    """(timm key, flax paths, flax shape of each path, timm shape, kind) for every parameter.

    kind: 'reshape' (same values), 'linear' (flax kernel (in..., out...) <-> weight (out, in)),
    'conv' (HWIO <-> OIHW). Several flax paths are concatenated along timm's first axis (qkv).
    """
    d, h, p = arch["embed_dim"], arch["num_heads"], arch["patch_size"]
    g = arch["img_size"] // p
    dh = d // h
    entries = [
        ("patch_embed.proj.weight", ("embed/wte/kernel",), (p, p, 3, d), (d, 3, p, p), "conv"),
        ("patch_embed.proj.bias", ("embed/wte/bias",), (d,), (d,), "reshape"),
    ]
    if arch["posemb"] == "learnable":
        entries.append(("pos_embed", ("embed/wpe",), (g, g, d), (1, g * g, d), "reshape"))
    if arch["pooling"] == "cls":
        entries.append(("cls_token", ("embed/cls_token",), (1, 1, d), (1, 1, d), "reshape"))
    for i in range(arch["depth"]):
        flax_prefix, timm_prefix = f"layer_{i}/", f"blocks.{i}."
        qkv = tuple(f"{flax_prefix}attn/{w}" for w in ("wq", "wk", "wv"))
        entries += [
            (timm_prefix + "norm1.weight", (flax_prefix + "norm1/scale",), (d,), (d,), "reshape"),
            (timm_prefix + "norm1.bias", (flax_prefix + "norm1/bias",), (d,), (d,), "reshape"),
            (timm_prefix + "attn.qkv.weight", tuple(w + "/kernel" for w in qkv), (d, h, dh), (3 * d, d), "linear"),
            (timm_prefix + "attn.qkv.bias", tuple(w + "/bias" for w in qkv), (h, dh), (3 * d,), "reshape"),
            (timm_prefix + "attn.proj.weight", (flax_prefix + "attn/wo/kernel",), (h, dh, d), (d, d), "linear"),
            (timm_prefix + "attn.proj.bias", (flax_prefix + "attn/wo/bias",), (d,), (d,), "reshape"),
            (timm_prefix + "norm2.weight", (flax_prefix + "norm2/scale",), (d,), (d,), "reshape"),
            (timm_prefix + "norm2.bias", (flax_prefix + "norm2/bias",), (d,), (d,), "reshape"),
        ]
        if arch["use_kan"]:
            num_terms = arch["polynomial_degree"] + 1
            entries.append(
                (
                    timm_prefix + "mlp.kan.coefficients",
                    (flax_prefix + "ff/ChebyKAN_0/coefficients",),
                    (d, d, num_terms),
                    (d, d, num_terms),
                    "reshape",
                )
            )
        else:
            entries += [
                (timm_prefix + "mlp.fc1.weight", (flax_prefix + "ff/w1/kernel",), (d, 4 * d), (4 * d, d), "linear"),
                (timm_prefix + "mlp.fc1.bias", (flax_prefix + "ff/w1/bias",), (4 * d,), (4 * d,), "reshape"),
                (timm_prefix + "mlp.fc2.weight", (flax_prefix + "ff/w2/kernel",), (4 * d, d), (d, 4 * d), "linear"),
                (timm_prefix + "mlp.fc2.bias", (flax_prefix + "ff/w2/bias",), (d,), (d,), "reshape"),
            ]
        if arch["layerscale"]:
            entries += [
                (timm_prefix + "ls1.gamma", (flax_prefix + "scale1",), (d,), (d,), "reshape"),
                (timm_prefix + "ls2.gamma", (flax_prefix + "scale2",), (d,), (d,), "reshape"),
            ]
    entries += [
        ("norm.weight", ("norm/scale",), (d,), (d,), "reshape"),
        ("norm.bias", ("norm/bias",), (d,), (d,), "reshape"),
    ]
    if arch["num_classes"]:
        c = arch["num_classes"]
        entries += [
            ("head.weight", ("head/kernel",), (d, c), (c, d), "linear"),
            ("head.bias", ("head/bias",), (c,), (c,), "reshape"),
        ]
    return entries


def _to_timm_layout(x: np.ndarray, kind: str, shape: tuple) -> np.ndarray:
    if kind == "conv":
        return x.transpose(3, 2, 0, 1)
    if kind == "linear":
        return x.reshape(shape[1], shape[0]).T
    return x.reshape(shape)


def _to_flax_layout(x: np.ndarray, kind: str, shape: tuple) -> np.ndarray:
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)
    if kind == "linear":
        return x.T.reshape(shape)
    return x.reshape(shape)


def _check_leaves(leaves: dict, expected: dict, what: str, arch: dict) -> None:
    """Same keys and shapes as the inferred architecture implies, else name the differences."""
    missing = [k for k in expected if k not in leaves]
    unexpected = [k for k in leaves if k not in expected]
    if missing or unexpected:
        parts = [f"missing keys {missing}"] if missing else []
        parts += [f"unexpected keys {unexpected}"] if unexpected else []
        raise ConvertError(f"not a {describe(arch)} {what}: " + "; ".join(parts))
    for key, shape in expected.items():
        value = leaves[key]
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
            raise ConvertError(f"{key} is not a floating-point array")
        if tuple(value.shape) != shape:
            raise ConvertError(
                f"inconsistent shapes: {key} is {tuple(value.shape)}, but the rest of the {what} "
                f"({describe(arch)}) implies {shape}"
            )


def describe(arch: dict) -> str:
    """One line naming every field of an architecture dict, for messages and the converter's report."""
    ff = f"KAN degree {arch['polynomial_degree']}" if arch["use_kan"] else "MLP"
    return (
        f"{'KAN-ViT' if arch['use_kan'] else 'ViT'} (depth {arch['depth']}, dim {arch['embed_dim']}, "
        f"heads {arch['num_heads']}, patch {arch['patch_size']}, image {arch['img_size']}, {ff}, "
        f"posemb {arch['posemb']}, pooling {arch['pooling']}, "
        f"layerscale {'on' if arch['layerscale'] else 'off'}, classes {arch['num_classes'] or 'none'})"
    )


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested Flax tree as {"layer_0/attn/wq/kernel": leaf, ...}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _shape_of(leaves: dict, key: str, ndim: int, what: str) -> tuple:
    if key not in leaves:
        raise ConvertError(f"not a KAN-ViT/ViT {what}: missing key {key!r}")
    shape = tuple(leaves[key].shape)
    if len(shape) != ndim:
        raise ConvertError(f"inconsistent shapes: {key} is {shape}, expected {ndim} dimensions")
    return shape


def _depth(leaves: dict, pattern: str, what: str) -> int:
    indices = {int(m.group(1)) for k in leaves if (m := re.match(pattern, k))}
    if not indices:
        raise ConvertError(f"not a KAN-ViT/ViT {what}: no transformer layers found")
    if indices != set(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise ConvertError(f"not a KAN-ViT/ViT {what}: layers {missing} are missing")
    return len(indices)


def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def _grid(num_tokens: int, key: str) -> int:
    if not _is_square(num_tokens):
        raise ConvertError(f"{key} has {num_tokens} positions: not a square grid (plus a class token)")
    return math.isqrt(num_tokens)


# Parameters the architecture is read from, as (Flax path, timm key).
_ARCH_KEYS = dict(
    layers=(r"layer_(\d+)/", r"blocks\.(\d+)\."),
    patch_kernel=("embed/wte/kernel", "patch_embed.proj.weight"),
    patch_bias=("embed/wte/bias", "patch_embed.proj.bias"),
    kan=("layer_0/ff/ChebyKAN_0/coefficients", "blocks.0.mlp.kan.coefficients"),
    posemb=("embed/wpe", "pos_embed"),
    cls=("embed/cls_token", "cls_token"),
    layerscale=("layer_0/scale1", "blocks.0.ls1.gamma"),
    head_bias=("head/bias", "head.bias"),
)


def _read_architecture(leaves: dict, layout: int, what: str) -> dict:
    """Everything but heads and image size, from either layout (`layout` 0: Flax keys, 1: timm keys).

    Only sizes both layouts share are read here; `_check_leaves` then checks every shape.
    """
    key = {role: keys[layout] for role, keys in _ARCH_KEYS.items()}
    dim = _shape_of(leaves, key["patch_bias"], 1, what)[0]
    patch = math.isqrt(math.prod(_shape_of(leaves, key["patch_kernel"], 4, what)) // (3 * dim))
    arch = dict(
        use_kan=key["kan"] in leaves,
        depth=_depth(leaves, key["layers"], what),
        embed_dim=dim,
        patch_size=patch,
        posemb="learnable" if key["posemb"] in leaves else "sincos2d",
        pooling="cls" if key["cls"] in leaves else "gap",
        layerscale=key["layerscale"] in leaves,
        num_classes=_shape_of(leaves, key["head_bias"], 1, what)[0] if key["head_bias"] in leaves else 0,
    )
    if arch["use_kan"]:
        arch["polynomial_degree"] = _shape_of(leaves, key["kan"], 3, what)[2] - 1
        if arch["polynomial_degree"] < 1:
            raise ConvertError(f"{key['kan']} has degree 0; the original needs K >= 1")
    return arch


def infer_flax_architecture(params: dict, image_size: int | None = None) -> dict:
    """Read the architecture off an original tree (docs/original.md, "Checkpoints").

    Only a sincos2d model's image size is not in it.
    """
    if not isinstance(params, dict) or not isinstance(params.get("model"), dict):
        raise ConvertError("not a KAN-ViT/ViT checkpoint: the top-level key 'model' is missing")
    leaves = flatten(params["model"])
    what = "Flax checkpoint"
    arch = _read_architecture(leaves, 0, what)
    arch["num_heads"] = _shape_of(leaves, "layer_0/attn/wq/kernel", 3, what)[1]
    patch = arch["patch_size"]
    if arch["posemb"] == "learnable":
        grid = _shape_of(leaves, "embed/wpe", 3, what)[0]
        if image_size is not None and image_size != grid * patch:
            raise ConvertError(
                f"the learnable position embedding fixes the image size to {grid * patch}, "
                f"not {image_size}; drop the image size"
            )
        arch["img_size"] = grid * patch
    else:
        arch["img_size"] = DEFAULT_IMAGE_SIZE if image_size is None else image_size
        if arch["img_size"] % patch:
            raise ConvertError(f"image size {arch['img_size']} is not a multiple of the patch size {patch}")
    _check_leaves(leaves, {path: shape for _, paths, shape, _, _ in _mapping(arch) for path in paths}, what, arch)
    return arch


@cache
def _registered_arch(name: str) -> dict:
    """The defaults of a registered model, read off an instance on the meta device (no memory)."""
    import timm

    with torch.device("meta"):
        return model_architecture(timm.create_model(name))


def model_architecture(model: torch.nn.Module) -> dict:
    """The architecture dict of a `KanVisionTransformer` instance."""
    arch = dict(
        use_kan=model.use_kan,
        depth=len(model.blocks),
        embed_dim=model.embed_dim,
        num_heads=model.blocks[0].attn.num_heads,
        patch_size=model.patch_embed.patch_size[0],
        img_size=model.patch_embed.img_size[0],
        posemb=model.posemb,
        pooling=model.pooling,
        layerscale=hasattr(model.blocks[0].ls1, "gamma"),
        num_classes=model.num_classes,
    )
    if model.use_kan:
        arch["polynomial_degree"] = model.polynomial_degree
    return arch


def timm_model_for(arch: dict) -> tuple[str, dict]:
    """The registered name (same dim and heads, else the smallest of the kind) and the overrides."""
    names = MODEL_NAMES[arch["use_kan"]]
    name = next(
        (
            n
            for n in names
            if (_registered_arch(n)["embed_dim"], _registered_arch(n)["num_heads"])
            == (arch["embed_dim"], arch["num_heads"])
        ),
        names[0],
    )
    defaults = _registered_arch(name)
    return name, {k: v for k, v in arch.items() if k != "use_kan" and defaults[k] != v}


def check_timm_semantics(model: torch.nn.Module, name: str) -> None:
    """Refuse what the original cannot express; warn where only the activation differs."""
    if isinstance(model, KanVisionTransformer):
        return
    pooling_ok = model.global_pool == ("token" if model.cls_token is not None else "avg")
    if not pooling_ok or model.pos_embed is None or getattr(model, "num_reg_tokens", 0):
        raise ConvertError(
            f"{name}: pooling/position embedding/register tokens differ from the original ViT; cannot convert"
        )
    act = model.blocks[0].mlp.act
    if not (isinstance(act, torch.nn.GELU) and act.approximate == "tanh"):
        warnings.warn(
            f"{name} uses {act}; the original's MLP uses tanh-approximated GELU, "
            "so the converted model computes a slightly different function",
            stacklevel=2,
        )


# ---------------------------------------------------------------------------------------------
# Conversion


def flax_to_timm(params: dict, image_size: int | None = None) -> tuple[dict, str, dict]:
    """(state_dict, timm model name, model_args) computing the function of the original `params`.

    `image_size` matters only for posemb='sincos2d' (default 224); a learnable grid fixes it.
    Tensors keep the checkpoint's dtype and do not share memory with `params`.
    """
    arch = infer_flax_architecture(params, image_size)
    leaves = flatten(params["model"])
    state_dict = {}
    for key, paths, _, shape, kind in _mapping(arch):
        parts = [_to_timm_layout(leaves[p], kind, (shape[0] // len(paths),) + shape[1:]) for p in paths]
        value = np.empty(shape, parts[0].dtype)  # C order for safetensors; filled without a temporary
        np.concatenate(parts, out=value)
        state_dict[key] = torch.from_numpy(value)
    name, model_args = timm_model_for(arch)
    return state_dict, name, model_args


def timm_to_flax(state_dict: dict, num_heads: int) -> dict:
    """The original's tree ({"model": ...}, float32 numpy) for a timm state dict of our layout.

    timm's own ViTs put a position embedding on the class token; it is folded into
    `cls_token` (exact: the class token's input is cls_token + pos_embed[:, 0]).
    """
    what = "PyTorch state dict"
    leaves = {
        k: (v.detach().cpu().float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
        for k, v in state_dict.items()
    }
    arch = _read_architecture(leaves, 1, what)
    if arch["embed_dim"] % num_heads:
        raise ConvertError(f"dim {arch['embed_dim']} is not divisible by {num_heads} heads")
    arch["num_heads"] = num_heads
    arch["img_size"] = DEFAULT_IMAGE_SIZE  # not stored by the original under sincos2d
    if arch["posemb"] == "learnable":
        tokens = _shape_of(leaves, "pos_embed", 3, what)[1]
        if arch["pooling"] == "cls" and not _is_square(tokens) and _is_square(tokens - 1):
            warnings.warn(
                "folded the class token's position embedding into cls_token (the original has none)", stacklevel=2
            )
            pos_embed = leaves.pop("pos_embed")
            leaves["cls_token"] = leaves["cls_token"] + pos_embed[:, :1]
            leaves["pos_embed"] = pos_embed[:, 1:]
            tokens -= 1
        arch["img_size"] = _grid(tokens, "pos_embed") * arch["patch_size"]
    _check_leaves(leaves, {key: shape for key, _, _, shape, _ in _mapping(arch)}, what, arch)
    flat = {}
    for key, paths, shape, _, kind in _mapping(arch):
        for path, part in zip(paths, np.split(leaves[key], len(paths))):
            flat[path] = np.array(_to_flax_layout(part, kind, shape), dtype=np.float32, order="C")
    return {"model": _unflatten(flat)}
