"""Atomic checkpoint writes: a failure at any point of a write leaves the previous file intact."""
import os

import pytest
import torch

from kan_vit import checkpoint


def _ckpt(value: float) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "step": int(value), "rng": [{"python": (3, (1, 2), None)}]}


def _truncating_save(obj, file):
    file.write(b"PK\x03\x04 half a checkpoint")  # bytes on disk, then the crash
    raise OSError("disk full")


def _failing(*args, **kwargs):
    raise OSError("simulated failure")


@pytest.mark.parametrize("target, replacement", [
    (torch, ("save", _truncating_save)),  # mid-serialisation
    (os, ("fsync", _failing)),  # data written, not yet durable
    (os, ("replace", _failing)),  # complete temp file, rename fails
])
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


def test_interrupted_metrics_truncation_keeps_the_log(tmp_path, monkeypatch):
    """Resuming rewrites metrics.jsonl without the records after the checkpoint; a crash while
    rewriting must not lose the records before it."""
    import json

    from kan_vit import metrics_log

    path = tmp_path / metrics_log.METRICS_FILE
    original = "".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (10, 20, 30))
    path.write_text(original)
    written = []

    def dumps_then_crash(record):
        if written:
            raise OSError("disk full")
        written.append(record)
        return json.dumps(record)

    monkeypatch.setattr(metrics_log.json, "dumps", dumps_then_crash)
    with pytest.raises(OSError, match="disk full"):
        metrics_log._truncate_after(str(path), 20)
    monkeypatch.undo()
    assert path.read_text() == original
    assert sorted(os.listdir(tmp_path)) == [metrics_log.METRICS_FILE]
    metrics_log._truncate_after(str(path), 20)
    assert [r["step"] for r in metrics_log.read_metrics(str(path))] == [10, 20]
