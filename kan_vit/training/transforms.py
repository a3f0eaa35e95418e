"""Image transforms (docs/original.md, "Data"): PIL in, uint8 CHW tensor out.

Normalisation happens on the device, as in the original, so every transform here ends in uint8.
"""

from __future__ import annotations

from typing import get_args

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, auto_augment
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode, v2

from kan_vit.training.config import RandomCrop

# The original's fill colour for geometric ops: int() truncates, (123, 116, 103).
AUGMENT_FILL = tuple(int(255 * m) for m in IMAGENET_DEFAULT_MEAN)
AUGMIX_TRANSLATE_PCT = 0.3  # the original's AugMix translation range (timm's default is 0.45)


def _posterize(img, bits_to_keep, **kwargs):
    # Pillow >= 12 rejects 0 bits, which timm's Posterize levels reach (rand-m9-mstd0.5 does) and older
    # Pillow (the original's) turned into a black image.
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def augment_policy(policy: str, size: int):
    """timm's transform for an augment.auto_augment policy (rand-*, augmix-*, or an AutoAugment
    name) with the original's fill colour and AugMix translation, and posterize to 0 bits kept."""
    hparams = dict(translate_const=int(0.45 * size), img_mean=AUGMENT_FILL)
    if policy.startswith("rand"):
        transform = rand_augment_transform(policy, hparams)
        ops = transform.ops
    elif policy.startswith("augmix"):
        transform = augment_and_mix_transform(policy, dict(hparams, translate_pct=AUGMIX_TRANSLATE_PCT))
        ops = transform.ops
    else:
        transform = auto_augment_transform(policy, hparams)
        ops = [op for sub_policy in transform.policy for op in sub_policy]
    for op in ops:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize
    return transform


def train_transform(cfg) -> T.Compose:
    size, aug = cfg.model.image_size, cfg.augment
    bicubic = InterpolationMode.BICUBIC
    if aug.random_crop == "rrc":
        ops = [T.RandomResizedCrop(size, interpolation=bicubic)]
    elif aug.random_crop == "src":
        ops = [T.Resize(size, interpolation=bicubic), T.RandomCrop(size, padding=4, padding_mode="reflect")]
    elif aug.random_crop == "none":
        ops = [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)]
    else:
        raise ValueError(f"augment.random_crop={aug.random_crop!r}: use one of {', '.join(get_args(RandomCrop))}")
    ops.append(T.RandomHorizontalFlip())
    if aug.auto_augment and aug.auto_augment != "none":
        ops.append(augment_policy(aug.auto_augment, size))
    if aug.color_jitter > 0:
        ops.append(T.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter))
    if aug.random_erasing > 0:
        # As the original: torchvision v2 erases the PIL image (as a uint8 tensor) with N(0, 1) noise
        # cast to uint8 (truncated toward 0, negatives wrap), so erased pixels are mostly 0, else 1/255, 2/254...
        ops.append(v2.RandomErasing(aug.random_erasing, value="random"))
    ops.append(T.PILToTensor())
    return T.Compose(ops)


def valid_transform(cfg) -> T.Compose:
    size = cfg.model.image_size
    return T.Compose(
        [
            T.Resize(int(size / cfg.augment.test_crop_ratio), interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.PILToTensor(),
        ]
    )
