"""Fine-tuning starts (docs/original.md, "Fine-tuning"): position-embedding resize, head re-init, label mapping."""

import json

import jax
import numpy as np
import pytest
import timm
import torch
from flax.serialization import msgpack_serialize
from numpy_reference import random_params

import kan_vit  # noqa: F401
from kan_vit.models.pretrained import load_pretrained
from kan_vit.training.config import ModelConfig

# checkpoint: 3x3 grid (12px, patch 4), 5 classes; fine-tune: 4x4 grid (16px), 7 classes
ARCH = dict(layers=2, dim=16, heads=2, patch=4, degree=3)
MODEL_ARGS = dict(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, polynomial_degree=3, num_classes=7)


@pytest.fixture
def msgpack_ckpt(tmp_path):
    params = random_params(seed=3, grid=3, labels=5, **ARCH)
    path = tmp_path / "run-best.msgpack"
    path.write_bytes(msgpack_serialize(params))
    return params, path


def fine_tune_model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("kan_vit_tiny_patch16_224", **MODEL_ARGS)


def test_msgpack_other_size_and_classes(msgpack_ckpt):
    params, path = msgpack_ckpt
    model = fine_tune_model()
    fresh_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    load_pretrained(model, ModelConfig(pretrained_ckpt=str(path), image_size=16))
    # the original resizes wpe with jax.image.resize(method="bicubic")
    wpe = np.asarray(jax.image.resize(params["model"]["embed"]["wpe"], (4, 4, 16), method="bicubic"))
    np.testing.assert_allclose(model.pos_embed.detach().reshape(4, 4, 16).numpy(), wpe, atol=2e-6)
    # a head of another shape is re-initialised (the model's own init), the rest is loaded
    torch.testing.assert_close(model.head.state_dict(), fresh_head)
    np.testing.assert_array_equal(model.cls_token.detach().numpy(), params["model"]["embed"]["cls_token"])
    np.testing.assert_array_equal(
        model.blocks[1].mlp.kan.coefficients.detach().numpy(),
        params["model"]["layer_1"]["ff"]["ChebyKAN_0"]["coefficients"],
    )


def test_label_mapping(msgpack_ckpt, tmp_path):
    params, path = msgpack_ckpt
    mapping = tmp_path / "mapping.json"
    src, dst = [4, 0, 2], [1, 6, 3]
    mapping.write_text(json.dumps({"src": src, "dst": dst}))
    model = fine_tune_model()
    load_pretrained(model, ModelConfig(pretrained_ckpt=str(path), label_mapping=str(mapping), image_size=16))
    kernel, bias = params["model"]["head"]["kernel"], params["model"]["head"]["bias"]  # (D, 5), (5,)
    expected_w = np.zeros((7, 16), np.float32)
    expected_b = np.full(7, -10.0, np.float32)
    for s, d in zip(src, dst):
        expected_w[d] = kernel[:, s]
        expected_b[d] = bias[s]
    np.testing.assert_array_equal(model.head.weight.detach().numpy(), expected_w)
    np.testing.assert_array_equal(model.head.bias.detach().numpy(), expected_b)


def test_same_shape_head_is_kept_and_headless_checkpoint_reinits(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("kan_vit_tiny_patch16_224", **MODEL_ARGS)
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model = fine_tune_model(seed=1)
    load_pretrained(model, ModelConfig(pretrained_ckpt=str(path), image_size=16))
    torch.testing.assert_close(model.state_dict(), source.state_dict(), rtol=0, atol=0)

    headless = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    torch.save({"model": headless, "step": 3}, tmp_path / "last.pth")  # trainer-checkpoint layout
    model = fine_tune_model(seed=1)
    fresh_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    load_pretrained(model, ModelConfig(pretrained_ckpt=str(tmp_path / "last.pth"), image_size=16))
    torch.testing.assert_close(model.head.state_dict(), fresh_head)
    torch.testing.assert_close(model.pos_embed, source.pos_embed)


def test_mismatched_architecture_is_named(msgpack_ckpt):
    _, path = msgpack_ckpt
    model = timm.create_model("kan_vit_tiny_patch16_224", **{**MODEL_ARGS, "polynomial_degree": 4})
    with pytest.raises(ValueError, match=r"does not fit the configured model.*coefficients"):
        load_pretrained(model, ModelConfig(pretrained_ckpt=str(path), image_size=16))


@pytest.mark.parametrize(
    "content,match",
    [
        ('{"src": [0, 1], "dst": [0]}', "src has 2 entries, dst 1"),
        ('{"source": [0]}', "expected a JSON file"),
        ('{"src": [9], "dst": [0]}', r"src ids \[9\] are outside \[0, 5\)"),
    ],
)
def test_bad_label_mapping(msgpack_ckpt, tmp_path, content, match):
    _, path = msgpack_ckpt
    mapping = tmp_path / "mapping.json"
    mapping.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_pretrained(
            fine_tune_model(), ModelConfig(pretrained_ckpt=str(path), label_mapping=str(mapping), image_size=16)
        )


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="model.pretrained_ckpt"):
        load_pretrained(fine_tune_model(), ModelConfig(pretrained_ckpt="/nonexistent/x.msgpack"))


def test_evaluation_needs_the_checkpoint_head(msgpack_ckpt):
    from kan_vit.models.pretrained import load_weights

    params, path = msgpack_ckpt
    with pytest.raises(ValueError, match="set model.labels"):
        load_weights(fine_tune_model(), path, new_head=False)  # 7 classes, the checkpoint has 5
    model = timm.create_model("kan_vit_tiny_patch16_224", **{**MODEL_ARGS, "num_classes": 5, "img_size": 12})
    load_weights(model, path, new_head=False)
    np.testing.assert_array_equal(model.head.weight.detach().numpy(), params["model"]["head"]["kernel"].T)
