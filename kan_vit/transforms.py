"""Image transforms (original-semantics §4): PIL in, uint8 CHW tensor out.

Normalisation happens on the device (§2), so every transform here ends in uint8.
"""
from __future__ import annotations

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, auto_augment
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def _posterize(img, bits_to_keep, **kwargs):
    # Pillow >= 12 rejects 0 bits, which timm's Posterize levels reach (rand-m9-mstd0.5 does) and older
    # Pillow (the original's) turned into a black image.
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _auto_augment(policy: str, size: int):
    hparams = dict(translate_const=int(0.45 * size), img_mean=tuple(round(255 * m) for m in IMAGENET_DEFAULT_MEAN))
    if policy.startswith("rand"):
        transform = rand_augment_transform(policy, hparams)
        ops = transform.ops
    elif policy.startswith("augmix"):
        transform = augment_and_mix_transform(policy, hparams)
        ops = transform.ops
    else:
        transform = auto_augment_transform(policy, hparams)
        ops = [op for sub_policy in transform.policy for op in sub_policy]
    for op in ops:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize
    return transform


class Uint8RandomErasing:
    """timm's RandomErasing (mode 'pixel') on a uint8 CHW image.

    timm erases normalised float tensors with N(0, 1) noise; we round-trip through that space so the
    uint8 output carries the same noise (clipped to 0..255) and untouched pixels come back exactly.
    """

    def __init__(self, probability: float):
        self.erase = RandomErasing(probability, mode="pixel", device="cpu")

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = (img.float() / 255 - _MEAN) / _STD
        x = self.erase(x)
        return ((x * _STD + _MEAN) * 255).round_().clamp_(0, 255).to(torch.uint8)


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
        raise ValueError(f"augment.random_crop={aug.random_crop!r}: use one of rrc, src, none")
    ops.append(T.RandomHorizontalFlip())
    if aug.auto_augment and aug.auto_augment != "none":
        ops.append(_auto_augment(aug.auto_augment, size))
    if aug.color_jitter > 0:
        ops.append(T.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter))
    ops.append(T.PILToTensor())
    if aug.random_erasing > 0:
        ops.append(Uint8RandomErasing(aug.random_erasing))
    return T.Compose(ops)


def valid_transform(cfg) -> T.Compose:
    size = cfg.model.image_size
    return T.Compose([
        T.Resize(int(size / cfg.augment.test_crop_ratio), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.PILToTensor(),
    ])
