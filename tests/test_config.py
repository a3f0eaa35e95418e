"""Config loading, --set overrides, validation (the ablation switches included), the shipped
recipes (docs/original.md, "Recipes"), saving."""

import os

import pytest

from kan_vit.training import config as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_digits.yaml")


def _valid(**overrides):
    base = ["model.labels=10", "data.format=demo_digits", "data.train_batch_size=64", "data.valid_batch_size=64"]
    return C.load(None, base + [f"{k}={v}" for k, v in overrides.items()])


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(
        C.ConfigError, match=r"unknown config key optim\.learnig_rate; did you mean optim\.learning_rate\?"
    ):
        C.load(None, ["optim.learnig_rate=0.1"])
    with pytest.raises(C.ConfigError, match=r"unknown config section 'shedule'; did you mean schedule\?"):
        C.from_dict({"shedule": {"training_steps": 3}})


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dimm: 64\n")
    with pytest.raises(C.ConfigError, match=r"model\.dimm; did you mean model\.dim\?"):
        C.load(str(path))


def test_set_values_are_yaml_typed_and_override_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dim: 64\n  heads: 4\noptim:\n  learning_rate: 0.5\n")
    cfg = C.load(
        str(path),
        [
            "model.dim=128",
            "optim.learning_rate=1e-3",
            "model.use_kan=true",
            "model.labels=null",
            "optim.clip_grad=1",
            "run.name=7",
        ],
    )
    assert cfg.model.dim == 128 and cfg.model.heads == 4
    assert cfg.optim.learning_rate == 1e-3 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.model.use_kan is True and cfg.model.labels is None
    assert cfg.optim.clip_grad == 1.0 and isinstance(cfg.optim.clip_grad, float)
    assert cfg.run.name == "7"
    assert cfg.schedule.training_steps == 200000  # untouched keys keep the original's defaults


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dim=abc", r"model\.dim must be a int, got 'abc'"),
        ("model.use_kan=1", r"model\.use_kan must be a bool, got 1"),
        ("model.layers=2.5", r"model\.layers must be a int"),
        ("model.dim", r"--set expects section\.key=value"),
    ],
)
def test_wrong_types_and_malformed_overrides(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load(None, [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.dim": 100, "model.heads": 3}, r"model\.dim \(100\) must be divisible by model\.heads \(3\)"),
        ({"augment.criterion": "mse"}, r"augment\.criterion must be one of ce, bce; got 'mse'"),
        ({"model.posemb": "rope"}, r"model\.posemb must be one of learnable, sincos2d"),
        ({"optim.optimizer": "sgd"}, r"optim\.optimizer must be one of adamw, lamb"),
        ({"run.wandb": "cloud"}, r"run\.wandb must be one of disabled, offline, online"),
        (
            {"data.train_batch_size": 60, "optim.grad_accum": 8},
            r"data\.train_batch_size \(60\) must be divisible by replicas x optim\.grad_accum \(1 x 8 = 8\)",
        ),
        ({"model.labels": "null"}, r"model\.labels must be set"),
        (
            {"model.image_size": 30, "model.patch_size": 8},
            r"model\.image_size \(30\) must be divisible by model\.patch_size",
        ),
        (
            {"schedule.warmup_steps": 10, "schedule.training_steps": 10},
            r"warmup_steps \(10\) must be < schedule\.training_steps",
        ),
        ({"model.droppath": 1.0}, r"model\.droppath must be in \[0, 1\)"),
        ({"optim.learning_rate": 0}, r"optim\.learning_rate must be > 0"),
        ({"run.resume": "/nonexistent/last.pth"}, r"run\.resume must be auto, never or an existing checkpoint file"),
    ],
)
def test_bad_values_and_combinations(overrides, message):
    cfg = _valid(**overrides)
    with pytest.raises(C.ConfigError, match=message):
        C.validate(cfg, world_size=1)


@pytest.mark.parametrize(
    "overrides, backend, message",
    [
        ({"run.compile_cache_dir": "/tmp/cache"}, "accelerate", r"run\.compile_cache_dir is the XLA compile cache"),
        ({"run.compile": "true"}, "xla", r"run\.compile is torch\.compile under accelerate .*: remove it"),
    ],
)
def test_options_of_the_other_backend_are_errors(overrides, backend, message):
    cfg = _valid(**overrides)
    with pytest.raises(C.ConfigError, match=message):
        C.validate(cfg, world_size=1, backend=backend)
    C.validate(cfg, world_size=1, backend="xla" if backend == "accelerate" else "accelerate")


def test_batch_divisibility_counts_replicas():
    cfg = _valid(**{"data.train_batch_size": 64, "optim.grad_accum": 2})
    C.validate(cfg, world_size=4)  # 64 / (4 x 2)
    with pytest.raises(C.ConfigError, match=r"\(3 x 2 = 6\)"):
        C.validate(cfg, world_size=3)


# The published recipes, written out here from the original's config/deit/*.sh (not read from our files).
COMMON = {
    "data.train_batch_size": 1024,
    "data.valid_batch_size": 512,
    "data.train_loader_workers": 40,
    "data.valid_loader_workers": 10,
    "augment.random_crop": "rrc",
    "augment.color_jitter": 0.0,
    "augment.auto_augment": "rand-m9-mstd0.5-inc1",
    "augment.random_erasing": 0.25,
    "augment.augment_repeats": 3,
    "augment.test_crop_ratio": 0.875,
    "augment.mixup": 0.8,
    "augment.cutmix": 1.0,
    "augment.criterion": "ce",
    "augment.label_smoothing": 0.1,
    "model.layers": 12,
    "model.patch_size": 16,
    "model.image_size": 224,
    "model.posemb": "learnable",
    "model.pooling": "cls",
    "model.dropout": 0.0,
    "model.labels": 1000,
    "model.layerscale": False,
    "optim.optimizer": "adamw",
    "optim.learning_rate": 1e-3,
    "optim.weight_decay": 0.05,
    "optim.adam_b1": 0.9,
    "optim.adam_b2": 0.999,
    "optim.adam_eps": 1e-8,
    "optim.lr_decay": 1.0,
    "optim.clip_grad": 0.0,
    "optim.grad_accum": 1,
    "schedule.warmup_steps": 6255,
    "schedule.training_steps": 375341,
    "schedule.log_interval": 100,
    "schedule.eval_interval": 1251,
}
RECIPES = {  # dim, heads, droppath, seeds, use_kan
    "deit_t16": (192, 3, 0.0, 0, False),
    "deit_s16": (384, 6, 0.0, 0, False),
    "deit_b16": (768, 12, 0.05, 1, False),
    "kan_t16": (192, 3, 0.0, 0, True),
    "kan_s16": (384, 6, 0.0, 0, True),
    "kan_b16": (768, 12, 0.05, 1, True),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_published_recipes(name):
    cfg = C.load(os.path.join(ROOT, "configs", f"{name}.yaml"))
    dim, heads, droppath, seed, use_kan = RECIPES[name]
    expected = dict(
        COMMON,
        **{
            "model.dim": dim,
            "model.heads": heads,
            "model.droppath": droppath,
            "model.use_kan": use_kan,
            "model.init_seed": seed,
            "model.dropout_seed": seed,
            "augment.mixup_seed": seed,
            "data.shuffle_seed": seed,
        },
    )
    if use_kan:
        expected["model.polynomial_degree"] = 8
    for key, value in expected.items():
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == value, key
    # The dataset paths are placeholders the user must replace; validation says which key and how.
    with pytest.raises(C.ConfigError, match=r"data\.train_dataset_shards is the placeholder .* set it to your dataset"):
        C.validate(cfg, world_size=8)
    C.validate(
        C.load(
            os.path.join(ROOT, "configs", f"{name}.yaml"),
            ["data.train_dataset_shards=/data/train-{0..1}.tar", "data.valid_dataset_shards=/data/v.tar"],
        ),
        world_size=8,
    )


def test_save_and_reload_round_trip(tmp_path):
    cfg = C.load(DEMO, ["optim.learning_rate=2e-3", "model.labels=10"])
    C.save(cfg, str(tmp_path / "config.yaml"))
    assert C.load(str(tmp_path / "config.yaml")) == cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.kan_degrees=[2, 3]"], "model.kan_degrees must list 4 integers"),
        (["model.kan_degrees=[2, 3, 0, 1]"], "model.kan_degrees must list 4 integers"),
        (["model.use_kan=false", "model.kan_base_branch=true"], "model.kan_base_branch applies to KAN models only"),
        (["model.use_kan=false", "optim.kan_weight_decay=true"], "optim.kan_weight_decay applies to KAN models only"),
        (["model.use_kan=false", "model.kan_init=variance_preserving"], "model.kan_init applies to KAN models only"),
        (["model.kan_init=xavier"], "model.kan_init must be one of"),
        (["model.mlp_ratio=0"], "model.mlp_ratio must be > 0"),
        (["model.kan_input_scale=true", "run.export_flax=true"], "run.export_flax writes the original's format"),
    ],
)
def test_bad_switch_settings_name_the_key(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        C.validate(C.load(DEMO, overrides), world_size=1)
