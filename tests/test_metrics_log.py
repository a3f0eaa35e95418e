"""The run's logs: metrics.jsonl rewritten atomically on resume, and wandb runs continued on resume."""

import json
import os

import pytest
from test_train import DEMO, tiny_overrides

from kan_vit.training import metrics_log
from kan_vit.training.config import Config, load
from kan_vit.training.metrics_log import RunLogger


def test_interrupted_metrics_truncation_keeps_the_log(tmp_path, monkeypatch):
    """Resuming rewrites metrics.jsonl without the records after the checkpoint; a crash while
    rewriting must not lose the records before it."""
    cfg = Config()
    cfg.run.output_dir = str(tmp_path)
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
        RunLogger(cfg, master=True, start_step=20)  # a run resumed from its step-20 checkpoint
    monkeypatch.undo()
    assert path.read_text() == original
    assert sorted(os.listdir(tmp_path)) == [metrics_log.METRICS_FILE]
    RunLogger(cfg, master=True, start_step=20).close()
    assert [r["step"] for r in metrics_log.read_metrics(str(path))] == [10, 20]


def test_wandb_offline_resume_continues_the_stored_run_and_a_fresh_start_gets_a_new_one(tmp_path):
    """Real wandb in offline mode: each run writes output_dir/wandb/offline-run-<time>-<id>/."""
    cfg = load(DEMO, tiny_overrides(tmp_path) + ["run.wandb=offline", "run.project=kan-vit-test"])

    def run(start_step):  # the trainer passes the resumed checkpoint's step (0: a fresh start)
        logger = RunLogger(cfg, master=True, start_step=start_step)
        run_id = logger.wandb.id
        logger.train(start_step + 3, {"train/loss": 1.0, "train/lr": 1e-3})
        logger.close()
        return run_id

    first = run(0)
    resumed = run(3)  # e.g. resume=auto found last.pth at step 3
    fresh = run(0)  # resume=never (or no checkpoint): a new run
    assert first == resumed != fresh
    assert (tmp_path / "wandb_id.txt").read_text().strip() == fresh
    # the id is read from each run's data file: a directory's name gains a "-1" when a resumed run
    # starts in the same second as the run it continues
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    run_files = [f for d in run_dirs for f in d.glob("run-*.wandb")]
    assert len(run_dirs) == len(run_files) == 3
    written = sorted(f.name.removeprefix("run-").removesuffix(".wandb") for f in run_files)
    assert written == sorted([first, first, fresh])
    assert all(f.stat().st_size > 0 for f in run_files)
