"""Kill -9 a training run at its first checkpoint, or stop it with SIGTERM, rerun it, and compare
it with an uninterrupted run: shared by the multi-replica and multi-process resume tests."""

import os
import signal
import subprocess
import time

import psutil
import pytest

from kan_vit.training import checkpoint
from kan_vit.training.loop import AGREE_EVERY
from kan_vit.training.metrics_log import read_metrics


def kill_at_first_checkpoint(command: list[str], env: dict, out_dir, total_steps: int) -> int:
    """Start `command`, SIGKILL its whole process tree once out_dir/last.pth exists, and return the
    checkpoint's step. The tree, not only the process group: torchrun starts each worker in a
    session of its own."""
    proc = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 240
        while not (out_dir / "last.pth").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.02)
    finally:
        for pid in [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # ended since it was listed
                pass
        proc.wait()
    killed_at = checkpoint.load(str(out_dir / "last.pth"))["step"]
    assert killed_at < total_steps, "the kill came too late to test anything"
    return killed_at


def _last_logged_step(out_dir) -> int:
    try:
        records = read_metrics(str(out_dir / "metrics.jsonl"))
    except (OSError, ValueError):  # not there yet, or a line being written
        return 0
    return records[-1]["step"] if records else 0


def stop_with_sigterm(
    command: list[str], env: dict, out_dir, total_steps: int, rank: int | None = None, status: int = 128 + 15
) -> int:
    """Start `command`, send SIGTERM once it logged an update (after its checkpoint's, when it
    resumes): to the launcher, or (`rank`)
    to the one process of the tree with that RANK (a torchrun worker). The run must stop at an
    agreement boundary with last.pth written there, say so, and exit with `status`; returns the step."""
    resumed_at = checkpoint.load(str(out_dir / "last.pth"))["step"] if (out_dir / "last.pth").exists() else 0
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while _last_logged_step(out_dir) <= resumed_at:
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first log"
            time.sleep(0.02)
        target = proc.pid
        if rank is not None:
            workers = psutil.Process(proc.pid).children(recursive=True)
            target = next(w.pid for w in workers if w.environ().get("RANK") == str(rank))
        os.kill(target, signal.SIGTERM)
        output = proc.communicate(timeout=240)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stopped = checkpoint.load(str(out_dir / "last.pth"))["step"]
    assert f"stopped by SIGTERM at step {stopped}" in output, output[-3000:]
    assert stopped % AGREE_EVERY == 0 and stopped < total_steps, "the stop came too late to test anything"
    assert proc.returncode == status, output[-3000:]
    return stopped


def rerun_resumes(command: list[str], env: dict, out_dir, killed_at: int) -> None:
    rerun = subprocess.run(command, env=env, timeout=300, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {out_dir / 'last.pth'} at step {killed_at}" in rerun.stdout + rerun.stderr


def assert_resume_matches_uninterrupted(
    command_for, env: dict, tmp_path, total_steps: int, interrupts=(kill_at_first_checkpoint,)
) -> None:
    """Run `command_for(out_dir)` uninterrupted in tmp_path/whole, and in tmp_path/broken
    interrupted by each of `interrupts` in turn (kill_at_first_checkpoint, stop_with_sigterm; each
    later one resumes and must stop later), then rerun to the end: both must end alike."""
    whole = subprocess.run(command_for(tmp_path / "whole"), env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    broken = tmp_path / "broken"
    stopped_at = 0
    for interrupt in interrupts:
        step = interrupt(command_for(broken), env, broken, total_steps)
        assert step > stopped_at
        stopped_at = step
    rerun_resumes(command_for(broken), env, broken, stopped_at)
    assert_same_end(tmp_path / "whole", broken, total_steps)


def assert_same_end(whole_dir, resumed_dir, total_steps: int) -> None:
    """Same final parameters and Adam moments (1e-6) and the same logged records."""
    a, b = checkpoint.load(str(whole_dir / "last.pth")), checkpoint.load(str(resumed_dir / "last.pth"))
    assert a["step"] == b["step"] == total_steps and len(a["rng"]) == len(b["rng"])
    for key, value in a["model"].items():
        assert (value - b["model"][key]).abs().max().item() <= 1e-6, key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert (pa[key] - pb[key]).abs().max().item() <= 1e-6
    ma, mb = read_metrics(str(whole_dir / "metrics.jsonl")), read_metrics(str(resumed_dir / "metrics.jsonl"))
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        for key, value in ra.items():
            if not key.startswith("perf/"):
                assert rb[key] == pytest.approx(value, abs=1e-6), (ra["step"], key)
