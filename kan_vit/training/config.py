"""Typed training configuration: the original's flags (dashes -> underscores) in six sections.

Defaults are the original CLI's defaults (the original's src/main.py, see docs/original.md); keys marked "new" had no
original flag. Seeds live with what they seed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Literal

import yaml

from kan_vit.models.chebykan import KanInit
from kan_vit.models.vision_transformer import Pooling, Posemb
from kan_vit.utils.atomic_files import atomic_outputs

# The backends a config can be trained on (kan_vit.training.backend implements them).
XLA, ACCELERATE = "xla", "accelerate"

# The values a key may take, declared once: `validate` checks every Literal-typed key against
# its values, and other modules derive their checks and messages from the same types.
DataFormat = Literal["webdataset", "imagefolder", "demo_digits", "demo_mnist"]
RandomCrop = Literal["none", "rrc", "src"]
Criterion = Literal["ce", "bce"]
OptimizerName = Literal["adamw", "lamb"]
WandbMode = Literal["disabled", "offline", "online"]


@dataclass
class DataConfig:
    # "webdataset" (tar shards, keys jpg/cls; local paths, brace patterns, URLs),
    # "imagefolder" (torchvision ImageFolder dirs), "demo_digits" or "demo_mnist" (embedded demos,
    # kan_vit.training.demo_digits). New.
    format: DataFormat = "webdataset"
    train_dataset_shards: str | None = None
    valid_dataset_shards: str | None = None
    train_batch_size: int = 2048  # global, over all replicas and grad_accum micro-batches
    valid_batch_size: int = 256  # global
    # Per host, as the original (one process per host): each of the host's replicas (one process
    # per chip) starts workers // local replicas of them, at least 1 (0: load in the process).
    train_loader_workers: int = 40
    valid_loader_workers: int = 5
    shuffle_seed: int = 0
    cache_dir: str | None = None  # new: where the demo shards are written (default ~/.cache/kan_vit)


@dataclass
class AugmentConfig:
    random_crop: RandomCrop = "rrc"
    color_jitter: float = 0.0
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # None / "none" disables
    random_erasing: float = 0.25
    augment_repeats: int = 3
    test_crop_ratio: float = 0.875
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_seed: int = 0
    criterion: Criterion = "ce"
    label_smoothing: float = 0.1


@dataclass
class ModelConfig:
    use_kan: bool = False
    polynomial_degree: int = 8
    # Ablations, new; the defaults are the original's model. kan_degrees: one degree per block
    # (replaces polynomial_degree); kan_input_scale: learned per-channel scale before tanh;
    # kan_base_branch: + W_b SiLU(x) beside each KAN layer; kan_init: the coefficients' init
    # (variance_preserving: Var(KAN(x)) = Var(x), docs/why_kan_trails.md); mlp_ratio: MLP hidden width / dim.
    kan_degrees: list | None = None
    kan_input_scale: bool = False
    kan_base_branch: bool = False
    kan_init: KanInit = "original"
    mlp_ratio: float = 4.0
    layers: int = 12
    dim: int = 768
    heads: int = 12
    labels: int | None = None  # None: no head (features only)
    layerscale: bool = False
    patch_size: int = 16
    image_size: int = 224
    posemb: Posemb = "learnable"
    pooling: Pooling = "cls"
    dropout: float = 0.0
    droppath: float = 0.1
    grad_ckpt: bool = False
    init_seed: int = 0
    dropout_seed: int = 0
    pretrained_ckpt: str | None = None
    label_mapping: str | None = None


@dataclass
class OptimConfig:
    optimizer: OptimizerName = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    lr_decay: float = 1.0
    clip_grad: float = 0.0
    grad_accum: int = 1
    kan_weight_decay: bool = False  # new, an ablation: decay the KAN coefficients (the original does not)


@dataclass
class ScheduleConfig:
    warmup_steps: int = 10000
    training_steps: int = 200000
    log_interval: int = 50
    eval_interval: int = 0  # 0: evaluate only at the end


@dataclass
class RunConfig:
    project: str | None = None
    name: str | None = None
    output_dir: str = "."
    wandb: WandbMode = "disabled"  # new
    resume: str = "auto"  # new: auto (continue from output_dir/last.pth if present) | never | PATH
    bf16: bool = False  # new: bfloat16 autocast of forward + loss (XLA, CUDA or CPU device)
    compile: bool = False  # new, accelerate only: torch.compile the model (XLA compiles every step anyway)
    export_flax: bool = False  # new: also write {name}-last/best.msgpack in the original's format
    compile_cache_dir: str | None = None  # new: persistent XLA compile cache (one subdir per process)
    # new: log KAN input saturation, coefficient norm by degree and the gradient norm (kan_vit.training.kan_health)
    kan_health: bool = False
    # new: also write last.pth every N updates (0: off) and every M minutes (0: off), besides at
    # evaluations and at SIGTERM; the default bounds the work a crash loses to about ten minutes
    checkpoint_interval: int = 0
    checkpoint_minutes: float = 10.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------------------------
# Loading, overrides, validation, saving. Everything is checked here, before any process spawns.

# Shipped recipes carry this prefix where only the user knows the value (their dataset paths).
PLACEHOLDER = "SET-ME"


class ConfigError(ValueError):
    """A config problem, with a message naming the key and the fix."""


def _section_classes() -> dict[str, type]:
    return {f.name: type(f.default_factory()) for f in fields(Config)}


def choices() -> dict[str, tuple]:
    """{"section.key": its allowed values} for every key declared with a Literal type."""
    return {
        f"{section}.{name}": typing.get_args(hint)
        for section, cls in _section_classes().items()
        for name, hint in typing.get_type_hints(cls).items()
        if typing.get_origin(hint) is Literal
    }


def _closest(name: str, candidates, prefix: str = "") -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.0)
    return f"; did you mean {prefix}{match[0]}?" if match else ""


def _coerce(key: str, value, annotation):
    """`value` as the field's declared type (int -> float allowed); ConfigError otherwise."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)  # Optional[X] or X | None
    optional = union and type(None) in typing.get_args(annotation)
    base = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation
    if typing.get_origin(base) is Literal:  # the type of its values; `validate` checks the values
        base = type(typing.get_args(base)[0])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} must be a {base.__name__}, got null")
    if base is float and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            pass
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a numeric run.name
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be a {base.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(raw: dict) -> Config:
    """A Config from nested {section: {key: value}}; unknown sections/keys and wrong types raise."""
    if not isinstance(raw, dict):
        raise ConfigError(
            f"a config must be a mapping of sections {list(_section_classes())}, got {type(raw).__name__}"
        )
    classes = _section_classes()
    sections = {}
    for section, values in raw.items():
        if section not in classes:
            raise ConfigError(f"unknown config section {section!r}{_closest(section, classes)}")
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping of keys, got {values!r}")
        hints = typing.get_type_hints(classes[section])
        for key in values:
            if key not in hints:
                raise ConfigError(f"unknown config key {section}.{key}{_closest(key, hints, section + '.')}")
        sections[section] = classes[section](
            **{key: _coerce(f"{section}.{key}", value, hints[key]) for key, value in values.items()}
        )
    return Config(**sections)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (values parsed as YAML: 1e-3, true, null, [1, 2])."""
    raw = copy.deepcopy(raw)
    for override in overrides:
        path, sep, text = override.partition("=")
        section, dot, key = path.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--set expects section.key=value, got {override!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {override!r}: value is not valid YAML ({error})") from None
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        raw[section][key] = value
    return raw


def load(path: str | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (missing keys take the defaults) and apply `--set` overrides."""
    raw = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as file:
                raw = yaml.safe_load(file) or {}
        except OSError as error:
            raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    return from_dict(apply_overrides(raw, overrides or []))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config, world_size: int, backend: str = XLA) -> None:
    """Value and combination checks for a training run on `world_size` replicas of `backend`
    (xla | accelerate)."""
    for key, values in choices().items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in values, f"{key} must be one of {', '.join(values)}; got {value!r}")
    data_cfg, augment_cfg, model_cfg, optim_cfg = cfg.data, cfg.augment, cfg.model, cfg.optim
    schedule_cfg, run_cfg = cfg.schedule, cfg.run
    positive = {
        "data.train_batch_size": data_cfg.train_batch_size,
        "data.valid_batch_size": data_cfg.valid_batch_size,
        "augment.augment_repeats": augment_cfg.augment_repeats,
        "model.polynomial_degree": model_cfg.polynomial_degree,
        "model.layers": model_cfg.layers,
        "model.dim": model_cfg.dim,
        "model.heads": model_cfg.heads,
        "model.patch_size": model_cfg.patch_size,
        "model.image_size": model_cfg.image_size,
        "optim.grad_accum": optim_cfg.grad_accum,
        "schedule.training_steps": schedule_cfg.training_steps,
        "schedule.log_interval": schedule_cfg.log_interval,
    }
    for key, value in positive.items():
        _check(value >= 1, f"{key} must be >= 1, got {value}")
    non_negative = {
        "data.train_loader_workers": data_cfg.train_loader_workers,
        "data.valid_loader_workers": data_cfg.valid_loader_workers,
        "augment.color_jitter": augment_cfg.color_jitter,
        "augment.mixup": augment_cfg.mixup,
        "augment.cutmix": augment_cfg.cutmix,
        "optim.weight_decay": optim_cfg.weight_decay,
        "optim.clip_grad": optim_cfg.clip_grad,
        "schedule.warmup_steps": schedule_cfg.warmup_steps,
        "schedule.eval_interval": schedule_cfg.eval_interval,
        "run.checkpoint_interval": run_cfg.checkpoint_interval,
        "run.checkpoint_minutes": run_cfg.checkpoint_minutes,
    }
    for key, value in non_negative.items():
        _check(value >= 0, f"{key} must be >= 0, got {value}")
    unit = {
        "augment.random_erasing": augment_cfg.random_erasing,
        "augment.label_smoothing": augment_cfg.label_smoothing,
        "model.dropout": model_cfg.dropout,
        "model.droppath": model_cfg.droppath,
        "optim.adam_b1": optim_cfg.adam_b1,
        "optim.adam_b2": optim_cfg.adam_b2,
    }
    for key, value in unit.items():
        _check(0.0 <= value < 1.0, f"{key} must be in [0, 1), got {value}")
    _check(
        0.0 < augment_cfg.test_crop_ratio <= 1.0,
        f"augment.test_crop_ratio must be in (0, 1], got {augment_cfg.test_crop_ratio}",
    )
    _check(0.0 < optim_cfg.lr_decay <= 1.0, f"optim.lr_decay must be in (0, 1], got {optim_cfg.lr_decay}")
    _check(
        math.isfinite(optim_cfg.learning_rate) and optim_cfg.learning_rate > 0,
        f"optim.learning_rate must be > 0, got {optim_cfg.learning_rate}",
    )
    _check(optim_cfg.adam_eps > 0, f"optim.adam_eps must be > 0, got {optim_cfg.adam_eps}")
    _check(
        model_cfg.labels is not None and model_cfg.labels >= 2,
        f"model.labels must be set to the number of classes (>= 2), got {model_cfg.labels}",
    )
    _check_ablations(cfg)
    _check(
        model_cfg.dim % model_cfg.heads == 0,
        f"model.dim ({model_cfg.dim}) must be divisible by model.heads ({model_cfg.heads})",
    )
    _check(
        model_cfg.posemb != "sincos2d" or model_cfg.dim % 4 == 0,
        f"model.posemb=sincos2d needs model.dim divisible by 4, got {model_cfg.dim}",
    )
    _check(
        model_cfg.image_size % model_cfg.patch_size == 0,
        f"model.image_size ({model_cfg.image_size}) must be divisible by model.patch_size ({model_cfg.patch_size})",
    )
    _check(
        schedule_cfg.warmup_steps < schedule_cfg.training_steps,
        f"schedule.warmup_steps ({schedule_cfg.warmup_steps}) must be < "
        f"schedule.training_steps ({schedule_cfg.training_steps})",
    )
    per_update = world_size * optim_cfg.grad_accum
    _check(
        data_cfg.train_batch_size % per_update == 0,
        f"data.train_batch_size ({data_cfg.train_batch_size}) must be divisible by replicas x optim.grad_accum "
        f"({world_size} x {optim_cfg.grad_accum} = {per_update})",
    )
    _check(
        data_cfg.valid_batch_size % world_size == 0,
        f"data.valid_batch_size ({data_cfg.valid_batch_size}) must be divisible by the {world_size} replicas",
    )
    for key in ("train_dataset_shards", "valid_dataset_shards"):
        value = getattr(data_cfg, key)
        _check(
            value is None or not value.startswith(PLACEHOLDER),
            f"data.{key} is the placeholder {value!r}: set it to your dataset, e.g. "
            f"--set data.{key}='pipe:gsutil cat gs://BUCKET/imagenet1k-{key.split('_')[0]}-{{0000..1023}}.tar'",
        )
    for key in ("pretrained_ckpt", "label_mapping"):
        value = getattr(model_cfg, key)
        _check(value is None or os.path.isfile(value), f"model.{key} {value!r} is not a file")
    _check(
        backend == XLA or not run_cfg.compile_cache_dir,
        "run.compile_cache_dir is the XLA compile cache: remove it when training with accelerate "
        "(launch/train_gpu.py); run.compile=true compiles there",
    )
    _check(
        backend == ACCELERATE or not run_cfg.compile,
        "run.compile is torch.compile under accelerate (launch/train_gpu.py); torch_xla compiles every "
        "step graph already: remove it (run.compile_cache_dir keeps XLA's compilations across runs)",
    )
    _check(
        run_cfg.resume in ("auto", "never") or os.path.isfile(run_cfg.resume),
        f"run.resume must be auto, never or an existing checkpoint file; {run_cfg.resume!r} is none of these",
    )


def launcher_parser(description: str, config_help: str) -> argparse.ArgumentParser:
    """The launchers' command line: --config and repeatable --set overrides (see `apply_overrides`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one key; the value is parsed as YAML; repeatable",
    )
    return parser


def _check_ablations(cfg: Config) -> None:
    model_cfg = cfg.model
    kan_switches = {
        "model.kan_degrees": model_cfg.kan_degrees is not None,
        "model.kan_input_scale": model_cfg.kan_input_scale,
        "model.kan_base_branch": model_cfg.kan_base_branch,
        "model.kan_init": model_cfg.kan_init != "original",
        "optim.kan_weight_decay": cfg.optim.kan_weight_decay,
    }
    for key, on in kan_switches.items():
        _check(model_cfg.use_kan or not on, f"{key} applies to KAN models only: unset it or set model.use_kan=true")
    if model_cfg.kan_degrees is not None:
        _check(
            len(model_cfg.kan_degrees) == model_cfg.layers
            and all(type(k) is int and k >= 1 for k in model_cfg.kan_degrees),
            f"model.kan_degrees must list {model_cfg.layers} integers >= 1 (one per block, model.layers), "
            f"got {model_cfg.kan_degrees!r}",
        )
    _check(model_cfg.mlp_ratio > 0, f"model.mlp_ratio must be > 0, got {model_cfg.mlp_ratio}")
    # an init changes no parameter: its checkpoints are the original's format
    changed = [key for key, on in kan_switches.items() if on and key.startswith("model.") and key != "model.kan_init"]
    _check(
        not (cfg.run.export_flax and changed),
        f"run.export_flax writes the original's format, which has no {', '.join(changed)}: unset one or the other",
    )


def save(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML atomically (a crash leaves the previous file intact)."""
    with atomic_outputs(path) as (tmp,):
        with open(tmp, "w", encoding="utf-8") as file:
            yaml.safe_dump(to_dict(cfg), file, sort_keys=False)
