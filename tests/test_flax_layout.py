"""The Flax <-> timm mapping: registered names for the published sizes, and the timm layouts the
original cannot express refused (or warned about) with the reason. The conversions themselves are
checked against the NumPy reference through the converter in tests/test_convert.py."""

import pytest
import timm
from numpy_reference import random_params

from kan_vit.flax.layout import ConvertError, check_timm_semantics, flax_to_timm, timm_to_flax

IMAGE_SIZE = 12  # grid 3 x patch 4


def test_named_sizes_get_registered_names():
    params = random_params(seed=0, layers=1, dim=192, heads=3, patch=16, grid=14, labels=1000, degree=8)
    _, name, model_args = flax_to_timm(params)
    assert (name, model_args) == ("kan_vit_tiny_patch16_224", {"depth": 1})
    params = random_params(seed=0, layers=1, dim=384, heads=6, patch=16, grid=2, labels=10, degree=None)
    _, name, model_args = flax_to_timm(params)
    assert name == "deit_jax_small_patch16_224"
    assert model_args == {"depth": 1, "img_size": 32, "num_classes": 10}


def test_timm_semantics_checks():
    small = dict(img_size=IMAGE_SIZE, patch_size=4, embed_dim=16, depth=1, num_heads=2)
    with pytest.warns(UserWarning, match="tanh-approximated GELU"):
        check_timm_semantics(timm.create_model("vit_tiny_patch16_224", **small), "vit_tiny_patch16_224")
    with pytest.raises(ConvertError, match="pooling"):
        check_timm_semantics(timm.create_model("vit_tiny_patch16_224", global_pool="avg", **small), "x")


def test_timm_to_flax_rejects_other_layouts():
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=IMAGE_SIZE, patch_size=4, embed_dim=16, depth=1, num_heads=2, reg_tokens=1
    )
    with pytest.raises(ConvertError, match="pos_embed has 11 positions"):
        timm_to_flax(model.state_dict(), num_heads=2)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=IMAGE_SIZE,
        patch_size=4,
        embed_dim=16,
        depth=1,
        num_heads=2,
        reg_tokens=1,
        no_embed_class=True,
    )
    with pytest.raises(ConvertError, match="unexpected keys \\['reg_token'\\]"):
        timm_to_flax(model.state_dict(), num_heads=2)
