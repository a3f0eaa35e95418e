"""Image transforms against the original: random erasing's noise fill and probability, the fill
colour and AugMix translation reaching timm's ops, posterize to 0 bits, the validation crop."""

import math

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

from kan_vit.training.config import Config
from kan_vit.training.transforms import augment_policy, train_transform, valid_transform


def _erasing_cfg(probability):
    cfg = Config()
    cfg.model.image_size, cfg.augment.random_crop, cfg.augment.auto_augment = 32, "none", "none"
    cfg.augment.random_erasing = probability
    return cfg


def test_random_erasing_fills_with_normal_noise_cast_to_uint8():
    """The original's fill: N(0, 1) floats written into uint8 pixels, i.e. trunc(z) mod 256."""
    torch.manual_seed(0)
    transform, grey = train_transform(_erasing_cfg(1.0)), 128  # no N(0, 1) draw casts to 128
    image = Image.fromarray(np.full((32, 32, 3), grey, dtype=np.uint8))
    filled = []
    for _ in range(200):
        out = transform(image)
        erased = (out != grey).any(0)
        rows, cols = erased.any(1).nonzero()[:, 0], erased.any(0).nonzero()[:, 0]
        h, w = len(rows), len(cols)
        assert erased.sum() == h * w and rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w  # a box
        # area 0.02..0.33 of the image, aspect 0.3..3.3, before h and w were rounded
        assert (h - 0.5) * (w - 0.5) <= 0.33 * 1024 and (h + 0.5) * (w + 0.5) >= 0.02 * 1024
        assert (h - 0.5) / (w + 0.5) <= 3.3 and (h + 0.5) / (w - 0.5) >= 0.3
        filled.append(out[:, erased].flatten().numpy())
    values = np.concatenate(filled)
    # P(trunc(z) = k) for z ~ N(0, 1); k < 0 lands on 256 + k
    ks = np.arange(-4, 5)
    cdf = scipy.stats.norm.cdf
    prob = np.where(ks > 0, cdf(ks + 1.0) - cdf(ks), np.where(ks < 0, cdf(ks) - cdf(ks - 1.0), cdf(1.0) - cdf(-1.0)))
    observed = np.array([(values == k % 256).sum() for k in ks])
    assert observed.sum() == len(values)  # nothing outside -4..4
    assert prob[4] == pytest.approx(0.6827, abs=1e-4)  # mostly 0, then 1 and 255 (13.6% each)
    expected = prob / prob.sum() * len(values)  # |z| >= 5 (p = 6e-7) is left out
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3


def test_random_erasing_probability():
    torch.manual_seed(1)
    transform = train_transform(_erasing_cfg(0.25))
    image = Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))
    erased = sum(bool((transform(image) != 128).any()) for _ in range(800))
    assert abs(erased / 800 - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 800)


def test_augment_fill_colour_and_augmix_translation_reach_timm_ops():
    white = Image.fromarray(np.full((20, 100, 3), 255, dtype=np.uint8))
    rand = augment_policy("rand-m9-mstd0.5-inc1", 100)
    rotate = next(op for op in rand.ops if op.name == "Rotate")
    rotate.prob, rotate.magnitude_std = 1.0, 0
    corner = np.asarray(rotate(white))[0, 0]  # uncovered by the rotated image: the fill colour
    assert tuple(corner) == (123, 116, 103)  # int(255 * mean), truncated as the original

    augmix = augment_policy("augmix-m10-w3", 100)
    translate = next(op for op in augmix.ops if op.name == "TranslateXRel")
    assert translate.kwargs["fillcolor"] == (123, 116, 103)
    translate.prob, translate.magnitude_std = 1.0, 0
    shifted = np.asarray(translate(white))[0, :, 0]
    assert (shifted != 255).sum() == 30  # magnitude 10 of 10 shifts by 0.3 of the width (timm default: 0.45)


def test_valid_transform_matches_pil_resize_and_centre_crop():
    cfg = Config()
    cfg.model.image_size, cfg.augment.test_crop_ratio = 24, 0.875
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    short = int(24 / 0.875)  # 27
    resized = np.asarray(image.resize((int(short * 60 / 40), short), Image.BICUBIC))
    top, left = round((short - 24) / 2), round((resized.shape[1] - 24) / 2)
    expected = resized[top : top + 24, left : left + 24].transpose(2, 0, 1)
    np.testing.assert_array_equal(valid_transform(cfg)(image).numpy(), expected)


@pytest.mark.parametrize(
    "crop,policy", [("rrc", "rand-m9-mstd0.5-inc1"), ("src", "augmix-m5-w3"), ("none", "original"), ("none", "none")]
)
def test_train_transform_variants_give_uint8_chw(crop, policy):
    cfg = Config()
    cfg.model.image_size = 24
    cfg.augment.random_crop, cfg.augment.auto_augment, cfg.augment.color_jitter = crop, policy, 0.4
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    out = train_transform(cfg)(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)
    cfg.augment.random_crop = "square"
    with pytest.raises(ValueError, match="random_crop='square'"):
        train_transform(cfg)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "augmix-m5-w3", "v0"])
def test_posterize_to_zero_bits_gives_black_as_old_pillow(policy):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    transform = augment_policy(policy, 16)
    ops = getattr(transform, "ops", None) or [op for sub in transform.policy for op in sub]
    posterize = [op for op in ops if op.name.startswith("Posterize") and op.name != "PosterizeOriginal"]
    assert posterize
    for op in posterize:  # the strongest level keeps 0 bits (Pillow <= 11: all pixels 0; Pillow 12+ raised)
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10 if op.name == "PosterizeIncreasing" else 0, 0
        assert not np.asarray(op(image)).any()
