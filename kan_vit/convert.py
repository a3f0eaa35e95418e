"""Lossless conversion between the original's Flax checkpoints (`.msgpack`) and timm state dicts.

    kan-vit-convert IN.msgpack OUT.safetensors   # or OUT.pth; also writes OUT.json
    kan-vit-convert IN.safetensors OUT.msgpack   # IN: .safetensors / .pth / trainer checkpoint
    kan-vit-convert vit_tiny_patch16_224 OUT.msgpack   # a timm ViT name (pretrained weights)

Flax -> PyTorch infers the whole architecture from the tree; the JSON sidecar
`{"model": name, "model_args": {...}}` makes
`timm.create_model(model, pretrained=True, pretrained_cfg_overlay=dict(file=OUT), **model_args)`
rebuild the model, and timm's `config.json` in OUT's folder makes
`timm.create_model("local-dir:FOLDER", pretrained=True)` do the same (one model per folder).

This module is the command line and its files; the leaf-by-leaf mapping and the architecture
inference are `kan_vit.flax.layout`. Runs without JAX: the format is read and written by
`kan_vit.flax.msgpack`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

from kan_vit.flax import msgpack as flax_msgpack
from kan_vit.flax.layout import (
    DEFAULT_IMAGE_SIZE,
    ConvertError,
    check_timm_semantics,
    describe,
    flatten,
    flax_to_timm,
    infer_flax_architecture,
    timm_to_flax,
)
from kan_vit.models.pretrained import CheckpointError, read_torch_checkpoint
from kan_vit.utils.atomic_files import atomic_outputs

TORCH_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
FLAX_SUFFIX = ".msgpack"
TIMM_CONFIG_NAME = "config.json"  # what timm's `local-dir:` and `hf-hub:` sources read


def _load_torch_source(source: str) -> tuple[dict, int | None]:
    """(state dict, heads if known) from a file we wrote, a trainer checkpoint or a timm name."""
    import timm

    path = Path(source)
    if not path.exists():
        if not timm.is_model(source):
            raise ConvertError(f"{source}: no such file, nor a timm model name")
        model = timm.create_model(source, pretrained=True)
        check_timm_semantics(model, source)
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
    print(f"Architecture: {describe(arch)}")
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


def _torch_to_flax_file(src: str, dst: Path, num_heads: int | None, image_size: int | None, exclude_head: bool) -> None:
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
    print(f"Architecture: {describe(arch)}")
    print(f"Parameters: {sum(v.size for v in flatten(params).values()):,}")
    flax_msgpack.save(params, dst)
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
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"image size of a posemb=sincos2d model (not stored; default {DEFAULT_IMAGE_SIZE})",
    )
    parser.add_argument(
        "--num-heads", type=int, default=None, help="attention heads, for PyTorch input without its .json sidecar"
    )
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
