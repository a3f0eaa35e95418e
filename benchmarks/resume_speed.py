"""How long does a resumed run take to reach its first update, early and late in a run?

    PJRT_DEVICE=CPU python benchmarks/resume_speed.py [--late 2000] [--batch 8] [--workdir DIR]

Writes synthetic ImageNet-like shards (16 shards x 125 JPEGs of about 400x350, random sizes and
smooth colour fields with noise, quality 90), trains a one-block KAN-ViT (32 px, batch 8) through
the real trainer (launch/train_tpu.py, one XLA:CPU replica) to update 20 and, separately, to
update --late, then reruns copies of each with one more update: seconds from the rerun's start to its first
update (its metrics.jsonl record, polled), median of --reps round-robin reruns as written (the
loader starts from its saved stream state), and once with output_dir/stream removed (the loader
replays the stream from batch 0, what every resume did before). The two kept figures and their
ratio (<= 1.3) answer the question; start-up and compilation are in every figure.
"""

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import machine_info  # noqa: E402

LAUNCH = os.path.join(ROOT, "launch", "train_tpu.py")
DEMO = os.path.join(ROOT, "configs", "demo_digits.yaml")
SHARDS, PER_SHARD, CLASSES = 16, 125, 10


def write_shards(directory: str) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)

    def jpeg() -> bytes:
        h, w = int(rng.integers(320, 380)), int(rng.integers(370, 430))
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        field = np.stack([np.sin(6.28 * (rng.random() * 3 * x + rng.random() * 3 * y + rng.random())) for _ in "rgb"])
        pixels = 127 + 100 * field.transpose(1, 2, 0) + rng.normal(0, 12, (h, w, 3))
        out = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
        return out.getvalue()

    def shard(path: str, count: int) -> None:
        with tarfile.open(path, "w") as tar:
            for i in range(count):
                for ext, payload in (("jpg", jpeg()), ("cls", str(int(rng.integers(CLASSES))).encode())):
                    info = tarfile.TarInfo(f"{i:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))

    for s in range(SHARDS):
        shard(os.path.join(directory, f"train-{s:02d}.tar"), PER_SHARD)
    shard(os.path.join(directory, "valid-00.tar"), 40)
    return os.path.join(directory, f"train-{{00..{SHARDS - 1:02d}}}.tar"), os.path.join(directory, "valid-00.tar")


def command(out: str, train: str, valid: str, steps: int, batch: int) -> list[str]:
    overrides = [
        "data.format=webdataset",
        f"data.train_dataset_shards={train}",
        f"data.valid_dataset_shards={valid}",
        f"data.train_batch_size={batch}",
        "data.valid_batch_size=40",
        "augment.random_crop=rrc",
        "model.layers=1",
        "model.dim=32",
        "model.heads=2",
        "schedule.warmup_steps=5",
        f"schedule.training_steps={steps}",
        "schedule.log_interval=1",
        "schedule.eval_interval=0",
        f"run.output_dir={out}",
    ]
    return [sys.executable, LAUNCH, "--config", DEMO] + [a for o in overrides for a in ("--set", o)]


def run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PJRT_DEVICE="CPU"))
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])


def seconds_to_first_update(cmd: list[str], out: str, step: int) -> float:
    """From the rerun's start until metrics.jsonl holds update `step` (logged after it ran)."""
    metrics = os.path.join(out, "metrics.jsonl")
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=dict(os.environ, PJRT_DEVICE="CPU"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    while True:
        if os.path.exists(metrics):
            with open(metrics, encoding="utf-8") as file:
                if any(json.loads(line).get("step") == step and "train/loss" in line for line in file if line.strip()):
                    elapsed = time.perf_counter() - start
                    break
        if proc.poll() is not None:
            raise SystemExit(f"the rerun ended before update {step}: {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.01)
    if proc.wait() != 0:
        raise SystemExit(proc.stderr.read().decode()[-3000:])
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--early", type=int, default=20)
    parser.add_argument("--late", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3, help="reruns of each resume (the median is shown)")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory, removed at the end")
    args = parser.parse_args()
    print(machine_info())
    work = args.workdir or tempfile.mkdtemp(prefix="resume_speed_")
    try:
        train, valid = write_shards(os.path.join(work, "shards"))
        steps, trained = (args.early, args.late), {}
        for step in steps:  # train to the update, keep the run as it is then
            out = os.path.join(work, f"run{step}")
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            run(command(out, train, valid, step, args.batch))
            trained[step] = time.perf_counter() - started
        kept = {step: [] for step in steps}
        for _ in range(args.reps):  # round-robin: load from other processes hits both alike
            for step in steps:
                out = os.path.join(work, f"rerun{step}")
                shutil.rmtree(out, ignore_errors=True)
                shutil.copytree(os.path.join(work, f"run{step}"), out)
                kept[step].append(
                    seconds_to_first_update(command(out, train, valid, step + 1, args.batch), out, step + 1)
                )
        replayed = {}
        for step in steps:  # the loader without its states: what every resume did before
            out = os.path.join(work, f"replay{step}")
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(os.path.join(work, f"run{step}"), out)
            shutil.rmtree(os.path.join(out, "stream"))
            replayed[step] = seconds_to_first_update(command(out, train, valid, step + 1, args.batch), out, step + 1)
        print(f"\nbatch {args.batch}, {SHARDS} x {PER_SHARD} JPEGs of about 400x350, one XLA:CPU replica\n")
        print(
            f"| resume at update | training to it, s | first update after resume, s (median of {args.reps}) "
            "| same, stream replayed from batch 0, s |"
        )
        print("|---:|---:|---:|---:|")
        for step in steps:
            print(f"| {step:,} | {trained[step]:.1f} | {statistics.median(kept[step]):.1f} | {replayed[step]:.1f} |")
        ratio = statistics.median(kept[args.late]) / statistics.median(kept[args.early])
        print(f"\nall reruns, s: {kept}")
        print(f"ratio late / early, stream state kept: {ratio:.2f} (must stay <= 1.3)")
        print(f"ratio late / early, replayed: {replayed[args.late] / replayed[args.early]:.2f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
