"""Typed training configuration: the original's flags (dashes -> underscores) in six sections.

Defaults are the original CLI's defaults (original-semantics §5); keys marked "new" had no
original flag. Seeds live with what they seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class DataConfig:
    # "webdataset" (tar shards, keys jpg/cls; local paths, brace patterns, URLs),
    # "imagefolder" (torchvision ImageFolder dirs) or "demo_digits" (embedded demo). New.
    format: str = "webdataset"
    train_dataset_shards: Optional[str] = None
    valid_dataset_shards: Optional[str] = None
    train_batch_size: int = 2048  # global, over all replicas and grad_accum micro-batches
    valid_batch_size: int = 256  # global
    train_loader_workers: int = 40  # per host process
    valid_loader_workers: int = 5
    shuffle_seed: int = 0
    cache_dir: Optional[str] = None  # new: where the demo shards are written (default ~/.cache/kan_vit)


@dataclass
class AugmentConfig:
    random_crop: str = "rrc"  # none | rrc | src
    color_jitter: float = 0.0
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # None / "none" disables
    random_erasing: float = 0.25
    augment_repeats: int = 3
    test_crop_ratio: float = 0.875
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_seed: int = 0
    criterion: str = "ce"  # ce | bce
    label_smoothing: float = 0.1


@dataclass
class ModelConfig:
    use_kan: bool = False
    polynomial_degree: int = 8
    layers: int = 12
    dim: int = 768
    heads: int = 12
    labels: Optional[int] = None  # None: no head (features only)
    layerscale: bool = False
    patch_size: int = 16
    image_size: int = 224
    posemb: str = "learnable"  # learnable | sincos2d
    pooling: str = "cls"  # cls | gap
    dropout: float = 0.0
    droppath: float = 0.1
    grad_ckpt: bool = False
    init_seed: int = 0
    dropout_seed: int = 0
    pretrained_ckpt: Optional[str] = None
    label_mapping: Optional[str] = None


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | lamb
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    lr_decay: float = 1.0
    clip_grad: float = 0.0
    grad_accum: int = 1


@dataclass
class ScheduleConfig:
    warmup_steps: int = 10000
    training_steps: int = 200000
    log_interval: int = 50
    eval_interval: int = 0  # 0: evaluate only at the end


@dataclass
class RunConfig:
    project: Optional[str] = None
    name: Optional[str] = None
    output_dir: str = "."
    wandb: str = "disabled"  # new: disabled | offline | online


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
