"""The trainer's XLA train step on this machine's PJRT device: KAN-ViT-S/16 and DeiT-S/16, fp32 and
bf16 autocast, seconds per update and the part of it XLA spent executing.

    PJRT_DEVICE=TPU python benchmarks/xla_step.py [--batch 128] [--reps 10] [--models ...] [--precisions ...]
    PJRT_DEVICE=CPU python benchmarks/xla_step.py --batch 8

One update = `kan_vit.training.loop.train_step` on a fixed device batch (uint8 images, soft targets)
with the configs/kan_s16.yaml and configs/deit_s16.yaml recipes: normalisation, forward, loss,
backward, AdamW, interval metrics, then `xm.wait_device_ops()` so the time covers execution. The
first two updates compile (the steady graph) and are not timed; an update compiled while timing
fails the run. "XLA execution" is torch_xla's ExecuteTime metric: the rest of an update is the
host's (tracing the step in Python). On a TPU the host traces the next update while the chip runs
the last one; on the CPU client here the two add up, and the XLA:CPU wall time says nothing about a
TPU's: what a TPU needs is `kan-vit-tpu-plan` / benchmarks/tpu_step.py, from the TPU compiler.
"""

import argparse
import gc
import os
import statistics
import sys
import time

os.environ.setdefault("PJRT_DEVICE", "CPU")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import machine_info  # noqa: E402

MODELS = {"KAN-ViT-S/16": "kan_s16.yaml", "DeiT-S/16": "deit_s16.yaml"}
PRECISIONS = ("fp32", "bf16")
WARMUP_UPDATES = 2


def load_config(model: str, precision: str, batch: int):
    from kan_vit.training.config import load

    bf16 = "true" if precision == "bf16" else "false"
    overrides = [f"data.train_batch_size={batch}", "schedule.log_interval=1000000", f"run.bf16={bf16}"]
    return load(os.path.join(ROOT, "configs", MODELS[model]), overrides)


def metric_total(name: str) -> tuple[int, float]:
    """(count, seconds) of a torch_xla timing metric in this process so far."""
    import torch_xla.debug.metrics as met

    data = met.metric_data(name)
    return (data[0], data[1] / 1e9) if data else (0, 0.0)


def time_setup(model: str, precision: str, batch: int, reps: int) -> dict:
    import torch_xla
    import torch_xla.core.xla_model as xm

    from kan_vit.training import loop

    cfg = load_config(model, precision, batch)
    device = torch_xla.device()
    state = loop.build_state(cfg, device)
    rng = np.random.default_rng(0)
    size, labels = cfg.model.image_size, cfg.model.labels
    images = torch.from_numpy(rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8))
    targets = torch.nn.functional.one_hot(torch.from_numpy(rng.integers(0, labels, batch)), labels).float()
    micro_batch = (images.to(device), targets.to(device), torch.zeros(1, dtype=torch.int64, device=device))
    torch_xla.sync()  # device data, as the loader's batches

    def update():
        loop.train_step(state, [micro_batch], cfg)
        xm.wait_device_ops()

    start = time.perf_counter()
    for _ in range(WARMUP_UPDATES):
        update()
    warmup_s, (compiles, compile_s) = time.perf_counter() - start, metric_total("CompileTime")
    seconds, executed = [], []
    for _ in range(reps):
        execute_before, start = metric_total("ExecuteTime")[1], time.perf_counter()
        update()
        seconds.append(time.perf_counter() - start)
        executed.append(metric_total("ExecuteTime")[1] - execute_before)
    late = metric_total("CompileTime")[0] - compiles
    if late:
        raise SystemExit(f"{model} {precision}: {late} graph(s) compiled while timing: the step recompiles")
    return dict(
        median_s=statistics.median(seconds),
        execute_s=statistics.median(executed),
        warmup_s=warmup_s,
        compiles=compiles,
        compile_s=compile_s,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="per device")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    args = parser.parse_args()
    import torch_xla
    import torch_xla.runtime as xr

    print(machine_info())
    print(f"torch_xla {torch_xla.__version__}, PJRT device {xr.device_type()}")
    print(f"batch {args.batch} per device, median of {args.reps} updates after {WARMUP_UPDATES} untimed")
    print("| model | step | median s | of which XLA execution s | images/s | graphs compiled at start (s) |")
    print("|---|---|---:|---:|---:|---:|", flush=True)
    for model in args.models:
        for precision in args.precisions:
            r = time_setup(model, precision, args.batch, args.reps)
            label = "fp32" if precision == "fp32" else "bf16 autocast"
            print(
                f"| {model} | {label} | {r['median_s']:.3f} | {r['execute_s']:.3f} | {args.batch / r['median_s']:.1f} "
                f"| {r['compiles']} ({r['compile_s']:.1f}) |",
                flush=True,
            )
            gc.collect()


if __name__ == "__main__":
    main()
