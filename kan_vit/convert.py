"""Lossless conversion between the original's Flax checkpoints (`.msgpack`) and timm state dicts.

    kan-vit-convert IN.msgpack OUT.safetensors   # or OUT.pth; also writes OUT.json
    kan-vit-convert IN.safetensors OUT.msgpack   # IN: .safetensors / .pth / trainer checkpoint
    kan-vit-convert vit_tiny_patch16_224 OUT.msgpack   # a timm ViT name (pretrained weights)

Flax -> PyTorch infers the whole architecture from the tree; the JSON sidecar
`{"model": name, "model_args": {...}}` makes
`timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(file=OUT), **model_args)`
rebuild the model, and timm's `config.json` in OUT's folder makes
`timm.create_model("local-dir:FOLDER", pretrained=True)` do the same (one model per folder). Runs without JAX: the format is read and written by `kan_vit.flax_msgpack`.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from . import flax_msgpack
from .atomic_files import atomic_outputs
from .checkpoint import CheckpointError, read_torch_checkpoint
from .vision_transformer import KanVisionTransformer

__all__ = ["ConvertError", "flax_to_timm", "timm_to_flax", "infer_flax_architecture", "main"]

TORCH_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
FLAX_SUFFIX = ".msgpack"
TIMM_CONFIG_NAME = "config.json"  # what timm's `local-dir:` and `hf-hub:` sources read
DEFAULT_IMAGE_SIZE = 224
# timm names registered by kan_vit.vision_transformer, by feed-forward kind.
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
        f, t = f"layer_{i}/", f"blocks.{i}."
        qkv = tuple(f"{f}attn/{w}" for w in ("wq", "wk", "wv"))
        entries += [
            (t + "norm1.weight", (f + "norm1/scale",), (d,), (d,), "reshape"),
            (t + "norm1.bias", (f + "norm1/bias",), (d,), (d,), "reshape"),
            (t + "attn.qkv.weight", tuple(w + "/kernel" for w in qkv), (d, h, dh), (3 * d, d), "linear"),
            (t + "attn.qkv.bias", tuple(w + "/bias" for w in qkv), (h, dh), (3 * d,), "reshape"),
            (t + "attn.proj.weight", (f + "attn/wo/kernel",), (h, dh, d), (d, d), "linear"),
            (t + "attn.proj.bias", (f + "attn/wo/bias",), (d,), (d,), "reshape"),
            (t + "norm2.weight", (f + "norm2/scale",), (d,), (d,), "reshape"),
            (t + "norm2.bias", (f + "norm2/bias",), (d,), (d,), "reshape"),
        ]
        if arch["use_kan"]:
            k1 = arch["polynomial_degree"] + 1
            entries.append((t + "mlp.kan.coefficients", (f + "ff/ChebyKAN_0/coefficients",),
                            (d, d, k1), (d, d, k1), "reshape"))
        else:
            entries += [
                (t + "mlp.fc1.weight", (f + "ff/w1/kernel",), (d, 4 * d), (4 * d, d), "linear"),
                (t + "mlp.fc1.bias", (f + "ff/w1/bias",), (4 * d,), (4 * d,), "reshape"),
                (t + "mlp.fc2.weight", (f + "ff/w2/kernel",), (4 * d, d), (d, 4 * d), "linear"),
                (t + "mlp.fc2.bias", (f + "ff/w2/bias",), (d,), (d,), "reshape"),
            ]
        if arch["layerscale"]:
            entries += [
                (t + "ls1.gamma", (f + "scale1",), (d,), (d,), "reshape"),
                (t + "ls2.gamma", (f + "scale2",), (d,), (d,), "reshape"),
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
        raise ConvertError(f"not a {_describe(arch)} {what}: " + "; ".join(parts))
    for key, shape in expected.items():
        value = leaves[key]
        if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
            raise ConvertError(f"{key} is not a floating-point array")
        if tuple(value.shape) != shape:
            raise ConvertError(
                f"inconsistent shapes: {key} is {tuple(value.shape)}, but the rest of the {what} "
                f"({_describe(arch)}) implies {shape}"
            )


def _describe(arch: dict) -> str:
    ff = f"KAN degree {arch['polynomial_degree']}" if arch["use_kan"] else "MLP"
    return (
        f"{'KAN-ViT' if arch['use_kan'] else 'ViT'} (depth {arch['depth']}, dim {arch['embed_dim']}, "
        f"heads {arch['num_heads']}, patch {arch['patch_size']}, image {arch['img_size']}, {ff}, "
        f"posemb {arch['posemb']}, pooling {arch['pooling']}, "
        f"layerscale {'on' if arch['layerscale'] else 'off'}, classes {arch['num_classes'] or 'none'})"
    )


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
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


def _read_architecture(leaves: dict, side: int, what: str) -> dict:
    """Everything but heads and image size, from either layout (side 0: Flax, 1: timm).

    Only sizes both layouts share are read here; `_check_leaves` then checks every shape.
    """
    key = {role: keys[side] for role, keys in _ARCH_KEYS.items()}
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
    leaves = _flatten(params["model"])
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
    _check_leaves(leaves, {path: shape for _, paths, shape, _, _ in _mapping(arch) for path in paths},
                  what, arch)
    return arch


@lru_cache(maxsize=None)
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
        (n for n in names if (_registered_arch(n)["embed_dim"], _registered_arch(n)["num_heads"])
         == (arch["embed_dim"], arch["num_heads"])),
        names[0],
    )
    defaults = _registered_arch(name)
    return name, {k: v for k, v in arch.items() if k != "use_kan" and defaults[k] != v}


# ---------------------------------------------------------------------------------------------
# Conversion


def flax_to_timm(params: dict, image_size: int | None = None) -> tuple[dict, str, dict]:
    """(state_dict, timm model name, model_args) computing the function of the original `params`.

    `image_size` matters only for posemb='sincos2d' (default 224); a learnable grid fixes it.
    Tensors keep the checkpoint's dtype and do not share memory with `params`.
    """
    arch = infer_flax_architecture(params, image_size)
    leaves = _flatten(params["model"])
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
    leaves = {k: (v.detach().cpu().float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
              for k, v in state_dict.items()}
    arch = _read_architecture(leaves, 1, what)
    if arch["embed_dim"] % num_heads:
        raise ConvertError(f"dim {arch['embed_dim']} is not divisible by {num_heads} heads")
    arch["num_heads"] = num_heads
    arch["img_size"] = DEFAULT_IMAGE_SIZE  # not stored by the original under sincos2d
    if arch["posemb"] == "learnable":
        tokens = _shape_of(leaves, "pos_embed", 3, what)[1]
        if arch["pooling"] == "cls" and not _is_square(tokens) and _is_square(tokens - 1):
            warnings.warn("folded the class token's position embedding into cls_token (the original has none)")
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


# ---------------------------------------------------------------------------------------------
# Files and CLI


def save_flax(params: dict, path: str | Path) -> None:
    """Write the original's `.msgpack` atomically: a crash leaves the previous file intact."""
    with atomic_outputs(path) as (tmp,):
        with open(tmp, "wb") as f:
            flax_msgpack.dump(params, f)


def _load_torch_source(source: str) -> tuple[dict, int | None]:
    """(state dict, heads if known) from a file we wrote, a trainer checkpoint or a timm name."""
    import timm

    path = Path(source)
    if not path.exists():
        if not timm.is_model(source):
            raise ConvertError(f"{source}: no such file, nor a timm model name")
        model = timm.create_model(source, pretrained=True)
        _check_timm_semantics(model, source)
        return model.state_dict(), model.blocks[0].attn.num_heads
    state_dict, config = read_torch_checkpoint(path)
    heads = (config or {}).get("model", {}).get("heads")
    sidecar = path.with_suffix(".json")
    if heads is None and sidecar.exists():
        try:
            meta = json.loads(sidecar.read_text())
            with torch.device("meta"):
                model = timm.create_model(meta["model"], **meta.get("model_args", {}))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ConvertError(f"{sidecar}: not a sidecar written by kan-vit-convert ({e})") from None
        heads = model.blocks[0].attn.num_heads
    return state_dict, heads


def _check_timm_semantics(model: torch.nn.Module, name: str) -> None:
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
            "so the converted model computes a slightly different function"
        )


def _drop_head_flax(params: dict) -> dict:
    return {**params, "model": {k: v for k, v in params["model"].items() if k != "head"}}


def _flax_to_torch_file(src: Path, dst: Path, image_size: int | None, exclude_head: bool) -> None:
    try:
        params = flax_msgpack.load(src)
    except flax_msgpack.FlaxMsgpackError as e:
        raise ConvertError(f"{src}: {e}") from None
    if exclude_head and isinstance(params, dict) and isinstance(params.get("model"), dict):
        params = _drop_head_flax(params)
    arch = infer_flax_architecture(params, image_size)
    state_dict, name, model_args = flax_to_timm(params, image_size)
    del params  # free the decoded file before serializing (peak memory)
    print(f"Architecture: {_describe(arch)}")
    print(f"Parameters: {sum(v.numel() for v in state_dict.values()):,}")
    print(f"timm: {name} {json.dumps(model_args)}")
    sidecar = dst.with_suffix(".json")
    timm_config = dst.parent / TIMM_CONFIG_NAME
    _check_replaceable_timm_config(timm_config)
    with atomic_outputs(dst, sidecar, timm_config) as (tmp, tmp_sidecar, tmp_timm_config):
        if dst.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state_dict, tmp)
        else:
            torch.save(state_dict, tmp)
        Path(tmp_sidecar).write_text(json.dumps({"model": name, "model_args": model_args}, indent=2) + "\n")
        _write_timm_config(name, model_args, tmp_timm_config)
    print(f"Wrote {dst}, {sidecar} and {timm_config}")


def _check_replaceable_timm_config(path: Path) -> None:
    """A `config.json` already in OUT's folder is replaced only if it is a timm config."""
    if not path.exists():
        return
    try:
        is_timm_config = "architecture" in json.loads(path.read_text())
    except (ValueError, TypeError):
        is_timm_config = False
    if not is_timm_config:
        raise ConvertError(f"{path} exists and is not a timm config; write OUT into another folder")


def _write_timm_config(name: str, model_args: dict, path: str) -> None:
    """timm's `config.json` for the weights, written by timm itself from the model it describes,
    so that `timm.create_model("local-dir:FOLDER", pretrained=True)` rebuilds and loads them."""
    import timm
    from timm.models._hub import save_config_for_hf

    with torch.device("meta"):
        model = timm.create_model(name, **model_args)
    save_config_for_hf(model, path, model_args=model_args)


def _torch_to_flax_file(
    src: str, dst: Path, num_heads: int | None, image_size: int | None, exclude_head: bool
) -> None:
    state_dict, known_heads = _load_torch_source(src)
    heads = num_heads or known_heads
    if heads is None:
        raise ConvertError(
            f"{src}: a PyTorch state dict does not store the number of attention heads; "
            "pass --num-heads N (or keep the .json sidecar next to the file)"
        )
    if exclude_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    params = timm_to_flax(state_dict, heads)
    del state_dict
    arch = infer_flax_architecture(params, image_size)
    print(f"Architecture: {_describe(arch)}")
    print(f"Parameters: {sum(v.size for v in _flatten(params).values()):,}")
    save_flax(params, dst)
    print(f"Wrote {dst}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kan-vit-convert",
        description=(
            "Convert between the original KAN-ViT's Flax checkpoints (.msgpack) and timm/PyTorch "
            "(.safetensors, .pth). The direction follows the suffixes. Flax -> PyTorch infers the "
            "architecture from the tree and writes OUT plus OUT with suffix .json: "
            '{"model": <timm name>, "model_args": {...}} for timm.create_model(model, '
            "pretrained=True, pretrained_cfg_overlay=dict(file=OUT), **model_args), and timm's "
            "config.json in OUT's folder for timm.create_model('local-dir:FOLDER', pretrained=True) "
            "(one model per folder; name OUT model.safetensors). "
            "PyTorch -> Flax reads a file we wrote, a trainer checkpoint (dict with a 'model' key) "
            "or a timm ViT name of the MLP kind; timm's class-token position embedding is "
            "added to cls_token (the original has none), and timm's own vit_*/deit_* models use "
            "exact GELU where the original uses tanh-GELU: converted, with a warning that the "
            "function changes slightly."
        ),
    )
    parser.add_argument("input", help="IN: .msgpack, .safetensors, .pth/.pt/.bin, or a timm model name")
    parser.add_argument("output", type=Path, help="OUT: .safetensors (or .pth) from .msgpack, else .msgpack")
    parser.add_argument("--image-size", type=int, default=None,
                        help=f"image size of a posemb=sincos2d model (not stored; default {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads, for PyTorch input without its .json sidecar")
    parser.add_argument("--exclude-head", action="store_true", help="drop the classifier")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    src, dst = args.input, args.output
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if src.endswith(FLAX_SUFFIX):
                if dst.suffix not in (".safetensors", ".pth"):
                    raise ConvertError(f"output of a {FLAX_SUFFIX} input must end in .safetensors or .pth")
                _flax_to_torch_file(Path(src), dst, args.image_size, args.exclude_head)
            elif dst.suffix == FLAX_SUFFIX:
                _torch_to_flax_file(src, dst, args.num_heads, args.image_size, args.exclude_head)
            else:
                raise ConvertError(
                    f"cannot tell the direction: one of IN/OUT must end in {FLAX_SUFFIX} "
                    f"(the other: {', '.join(TORCH_SUFFIXES)})"
                )
        for w in caught:
            print(f"Note: {w.message}", file=sys.stderr)
    except (ConvertError, CheckpointError, OSError) as e:
        print(f"kan-vit-convert: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
