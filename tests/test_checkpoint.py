"""Checkpoint files: atomic writes (a failure at any point of a write leaves the previous file
intact), weights_only-loadable contents, and which checkpoint a run resumes from."""

import os

import pytest
import torch

from kan_vit.training import checkpoint
from kan_vit.training.config import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_digits.yaml")


def _ckpt(value: float) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "step": int(value), "rng": [{"python": (3, (1, 2), None)}]}


def _truncating_save(obj, file):
    file.write(b"PK\x03\x04 half a checkpoint")  # bytes on disk, then the crash
    raise OSError("disk full")


def _failing(*args, **kwargs):
    raise OSError("simulated failure")


@pytest.mark.parametrize(
    "target, replacement",
    [
        (torch, ("save", _truncating_save)),  # mid-serialisation
        (os, ("fsync", _failing)),  # data written, not yet durable
        (os, ("replace", _failing)),  # complete temp file, rename fails
    ],
)
def test_interrupted_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, target, replacement):
    path = str(tmp_path / "last.pth")
    checkpoint.save(_ckpt(1.0), path)
    monkeypatch.setattr(target, *replacement)
    with pytest.raises(OSError):
        checkpoint.save(_ckpt(2.0), path)
    monkeypatch.undo()
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], torch.full((64, 64), 1.0))
    assert os.listdir(tmp_path) == ["last.pth"]  # no partial file, no temp file left behind


def test_write_replaces_and_is_weights_only_loadable(tmp_path):
    path = str(tmp_path / "last.pth")
    checkpoint.save(_ckpt(1.0), path)
    checkpoint.save(_ckpt(2.0), path)
    loaded = checkpoint.load(path)
    assert loaded["step"] == 2 and loaded["rng"][0]["python"] == (3, (1, 2), None)
    assert os.listdir(tmp_path) == ["last.pth"]


def test_to_cpu_copies_nested_tensors():
    tree = {"a": [torch.ones(2, requires_grad=True), (torch.zeros(1), 3)], "b": "x"}
    out = checkpoint.to_cpu(tree)
    assert out["b"] == "x" and out["a"][1][1] == 3 and isinstance(out["a"][1], tuple)
    assert not out["a"][0].requires_grad


def test_resume_setting_picks_the_checkpoint(tmp_path):
    cfg = load(DEMO, [f"run.output_dir={tmp_path}"])
    assert checkpoint.resume_path(cfg) is None  # auto, nothing there yet
    (tmp_path / "last.pth").write_bytes(b"")
    assert checkpoint.resume_path(cfg) == str(tmp_path / "last.pth")
    cfg.run.resume = "never"
    assert checkpoint.resume_path(cfg) is None
    cfg.run.resume = str(tmp_path / "other.pth")
    assert checkpoint.resume_path(cfg) == str(tmp_path / "other.pth")


def test_an_unreadable_checkpoint_to_resume_is_refused_before_spawning(tmp_path):
    cfg = load(DEMO, [f"run.output_dir={tmp_path}"])
    (tmp_path / "last.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"last.pth is not a readable trainer checkpoint .*run.resume=never"):
        checkpoint.check_resume(cfg, world_size=1)
