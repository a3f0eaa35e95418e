"""kan-vit-convert: Flax <-> PyTorch checkpoint files in both directions, timm names and folders,
bad input and failed writes.

Fixtures are written by the real `flax.serialization`; converted models are checked against the
independent NumPy forward pass (tests/numpy_reference.py) in float64.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from flax import serialization
from numpy_reference import forward as reference_forward
from numpy_reference import random_params

from kan_vit.convert import main
from kan_vit.flax import msgpack as flax_msgpack

SMALL = dict(layers=2, dim=16, heads=2, patch=4, grid=3)
IMAGE_SIZE = 12  # grid 3 x patch 4

VARIANTS = {
    "kan-learnable-cls": dict(degree=3),
    "kan-sincos2d-gap-layerscale": dict(degree=4, posemb="sincos2d", pooling="gap", layerscale=True),
    "mlp": dict(degree=None),
    "kan-degree1-nohead": dict(degree=1, labels=None),
}


def _leaves(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def _assert_trees_identical(actual, expected):
    a, e = _leaves(actual), _leaves(expected)
    assert a.keys() == e.keys()
    for key in e:
        assert a[key].dtype == e[key].dtype == np.float32, key
        assert a[key].shape == e[key].shape, key
        assert np.array_equal(a[key], e[key]), key


def _write_flax(path, params):
    path.write_bytes(serialization.msgpack_serialize(params))
    return path


def _images(n=3):
    return np.random.default_rng(7).standard_normal((n, 3, IMAGE_SIZE, IMAGE_SIZE))


# --- conversion against the NumPy reference ----------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cli_flax_to_timm_to_flax(variant, tmp_path, capsys):
    params = random_params(seed=3, **SMALL, **VARIANTS[variant])
    src = _write_flax(tmp_path / "orig.msgpack", params)
    suffix = ".pth" if variant == "mlp" else ".safetensors"
    out = tmp_path / f"converted{suffix}"
    assert (
        main([str(src), str(out), "--image-size", str(IMAGE_SIZE)] if "sincos" in variant else [str(src), str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    n_params = sum(v.size for v in _leaves(params).values())
    assert f"Parameters: {n_params:,}" in printed and str(out) in printed

    sidecar = json.loads(out.with_suffix(".json").read_text())
    # strict loading: a missing or unexpected key raises here
    model = timm.create_model(
        sidecar["model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), **sidecar["model_args"]
    )
    logits = model.double().eval()(torch.from_numpy(_images())).detach().numpy()
    assert np.abs(logits - reference_forward(params, _images())).max() <= 1e-6

    back = tmp_path / "back.msgpack"
    assert main([str(out), str(back)]) == 0  # heads come from the sidecar
    assert back.read_bytes() == src.read_bytes()  # every leaf bit-identical, same layout
    _assert_trees_identical(serialization.msgpack_restore(back.read_bytes()), params)


@pytest.mark.parametrize("variant", ["kan-learnable-cls", "kan-sincos2d-gap-layerscale"])
def test_converted_folder_loads_with_local_dir(variant, tmp_path):
    """The converter writes timm's config.json next to the weights: `local-dir:` rebuilds the
    architecture (classes, depth, degree, image size of a sincos2d model) and loads them."""
    params = random_params(seed=6, **SMALL, **VARIANTS[variant])
    src = _write_flax(tmp_path / "orig.msgpack", params)
    folder = tmp_path / "converted"
    folder.mkdir()
    assert main([str(src), str(folder / "model.safetensors"), "--image-size", str(IMAGE_SIZE)]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["num_classes"] == 5 and config["pretrained_cfg"]["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    logits = model.double().eval()(torch.from_numpy(_images())).detach().numpy()
    assert np.abs(logits - reference_forward(params, _images())).max() <= 1e-6


def test_foreign_config_json_is_not_overwritten(tmp_path, capsys):
    src = _write_flax(tmp_path / "orig.msgpack", random_params(seed=6, **SMALL))
    (tmp_path / "config.json").write_text('{"lr": 0.1}')
    assert main([str(src), str(tmp_path / "model.safetensors")]) == 1
    assert "config.json exists and is not a timm config" in capsys.readouterr().err
    assert (tmp_path / "config.json").read_text() == '{"lr": 0.1}'
    assert not (tmp_path / "model.safetensors").exists()


def test_exclude_head(tmp_path):
    params = random_params(seed=4, **SMALL, degree=2)
    src = _write_flax(tmp_path / "orig.msgpack", params)
    out = tmp_path / "headless.safetensors"
    assert main([str(src), str(out), "--exclude-head"]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["model_args"]["num_classes"] == 0
    model = timm.create_model(
        sidecar["model"], pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), **sidecar["model_args"]
    )
    features = model.double().eval()(torch.from_numpy(_images())).detach().numpy()
    del params["model"]["head"]
    assert np.abs(features - reference_forward(params, _images())).max() <= 1e-6


def test_chunked_flax_file(tmp_path, monkeypatch):
    """Reading Flax's chunked layout and writing it gives the same arrays as the plain layout."""
    params = random_params(seed=5, **SMALL, degree=3)
    plain = _write_flax(tmp_path / "plain.msgpack", params)
    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 512)  # every (16,16,4) coefficient chunked
    chunked = _write_flax(tmp_path / "chunked.msgpack", params)
    assert b"__msgpack_chunked_array__" in chunked.read_bytes()
    _assert_trees_identical(flax_msgpack.load(chunked), flax_msgpack.load(plain))
    monkeypatch.setattr(flax_msgpack, "MAX_CHUNK_SIZE", 512)  # main()'s writer uses the default
    out = tmp_path / "w.safetensors"
    assert main([str(chunked), str(out)]) == 0
    back = tmp_path / "back.msgpack"
    assert main([str(out), str(back)]) == 0
    assert back.read_bytes() == chunked.read_bytes()
    _assert_trees_identical(serialization.msgpack_restore(back.read_bytes()), params)


def test_timm_vit_folds_class_position_embedding(tmp_path, capsys):
    """timm's own ViT layout (position embedding on the class token) from a .pth state dict."""
    model = (
        timm.create_model(
            "vit_tiny_patch16_224",
            img_size=IMAGE_SIZE,
            patch_size=4,
            embed_dim=16,
            depth=2,
            num_heads=2,
            num_classes=5,
            act_layer="gelu_tanh",
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        model.pos_embed.normal_(std=0.5)
        model.cls_token.normal_(std=0.5)
    src = tmp_path / "vit.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, src)  # trainer-checkpoint shape
    out = tmp_path / "vit.msgpack"
    assert main([str(src), str(out)]) == 1
    assert "--num-heads" in capsys.readouterr().err
    assert main([str(src), str(out), "--num-heads", "2"]) == 0
    assert "folded the class token's position embedding" in capsys.readouterr().err
    params = serialization.msgpack_restore(out.read_bytes())
    assert params["model"]["embed"]["wpe"].shape == (3, 3, 16)
    # a trainer checkpoint records its config, which gives the heads
    torch.save({"model": model.state_dict(), "config": {"model": {"heads": 2}}}, src)
    assert main([str(src), str(tmp_path / "cfg.msgpack")]) == 0
    assert (tmp_path / "cfg.msgpack").read_bytes() == out.read_bytes()
    expected = model(torch.from_numpy(_images())).detach().numpy()
    assert np.abs(reference_forward(params, _images()) - expected).max() <= 1e-6


# --- bad input -------------------------------------------------------------------------------


def _tree_missing_key():
    params = random_params(seed=6, **SMALL, degree=3)
    del params["model"]["norm"]["scale"]
    return params


def _tree_unexpected_key():
    params = random_params(seed=6, **SMALL, degree=3)
    params["model"]["layer_1"]["extra"] = np.zeros(3, np.float32)
    return params


def _tree_mixed_degrees():
    params = random_params(seed=6, **SMALL, degree=3)
    params["model"]["layer_1"]["ff"]["ChebyKAN_0"]["coefficients"] = np.zeros((16, 16, 6), np.float32)
    return params


def _tree_no_model():
    return {"params": random_params(seed=6, **SMALL, degree=3)["model"]}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: b"this is not msgpack", "not a msgpack file"),
        (_tree_missing_key, "missing keys ['norm/scale']"),
        (_tree_unexpected_key, "unexpected keys ['layer_1/extra']"),
        (_tree_mixed_degrees, "layer_1/ff/ChebyKAN_0/coefficients is (16, 16, 6)"),
        (_tree_no_model, "'model' is missing"),
    ],
)
def test_bad_flax_input(make, message, tmp_path, capsys):
    made = make()
    src = tmp_path / "bad.msgpack"
    src.write_bytes(made if isinstance(made, bytes) else serialization.msgpack_serialize(made))
    assert main([str(src), str(tmp_path / "out.safetensors")]) != 0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.msgpack"]


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.pth"])
def test_bad_torch_input(name, tmp_path, capsys):
    (tmp_path / name).write_bytes(b"not a checkpoint at all")
    assert main([str(tmp_path / name), str(tmp_path / "out.msgpack")]) != 0
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_unwritable_output_and_bad_suffix(tmp_path, capsys):
    src = _write_flax(tmp_path / "m.msgpack", random_params(seed=7, **SMALL, degree=2))
    assert main([str(src), str(tmp_path / "missing_dir" / "out.safetensors")]) != 0
    assert "cannot write" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "out.txt")]) != 0
    assert ".safetensors or .pth" in capsys.readouterr().err
    assert main([str(tmp_path / "x.pth"), str(tmp_path / "y.pth")]) != 0
    assert "cannot tell the direction" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.msgpack"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    """An error while serializing (here: disk full) removes the temporary files."""
    src = _write_flax(tmp_path / "m.msgpack", random_params(seed=7, **SMALL, degree=2))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    assert main([str(src), str(tmp_path / "out.pth")]) != 0
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.msgpack"]


def test_converter_does_not_import_jax(tmp_path):
    src = _write_flax(tmp_path / "m.msgpack", random_params(seed=8, **SMALL, degree=2))
    code = (
        "import sys\n"
        "from kan_vit.convert import main\n"
        f"assert main([{str(src)!r}, {str(tmp_path / 'o.safetensors')!r}]) == 0\n"
        f"assert main([{str(tmp_path / 'o.safetensors')!r}, {str(tmp_path / 'b.msgpack')!r}]) == 0\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "b.msgpack").read_bytes() == src.read_bytes()
