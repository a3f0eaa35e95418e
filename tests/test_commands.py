"""kan-vit-train and kan-vit-eval (through the launch/ wrappers): a bad config or a checkpoint that
does not fit prints one line and exits 2 before any replica starts."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_digits.yaml")
EVALUATE = os.path.join(ROOT, "launch", "evaluate.py")


def _launch(*args, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "train_tpu.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PJRT_DEVICE="CPU", **(env or {})),
    )


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["--set", "model.dimm=64"], None, "unknown config key model.dimm; did you mean model.dim?"),
        (["--set", "model.heads=5"], None, "model.dim (96) must be divisible by model.heads (5)"),
        (
            ["--set", "data.train_batch_size=66"],
            {"CPU_NUM_DEVICES": "4"},
            "divisible by replicas x optim.grad_accum (4 x 1 = 4)",
        ),
        (
            [
                "--set",
                "data.format=webdataset",
                "--set",
                "data.train_dataset_shards=/nonexistent/s-{0..3}.tar",
                "--set",
                "data.valid_dataset_shards=/nonexistent/v.tar",
            ],
            None,
            "shards are missing or empty",
        ),
    ],
)
def test_launcher_rejects_bad_configs_before_spawning(tmp_path, args, env, message):
    out = tmp_path / "run"
    result = _launch("--config", DEMO, "--set", f"run.output_dir={out}", *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.startswith("config error: ")
    assert not out.exists()  # nothing started: no output directory, config or checkpoint


@pytest.mark.slow  # trains a checkpoint first: ~7 s
def test_evaluate_rejects_a_checkpoint_that_does_not_fit(tmp_path):
    from flax.serialization import msgpack_serialize
    from numpy_reference import random_params

    path = tmp_path / "other.msgpack"  # dim 16, 5 classes: not the demo's model
    path.write_bytes(msgpack_serialize(random_params(grid=4, patch=8)))
    result = subprocess.run(
        [sys.executable, EVALUATE, "--config", DEMO, "--checkpoint", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PJRT_DEVICE="CPU"),
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: checkpoint") and "set model.labels" in result.stderr
