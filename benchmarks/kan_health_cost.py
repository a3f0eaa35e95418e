"""Step-time cost of run.kan_health on the XLA device (PJRT CPU here): one update with and
without the health metrics, timed round-robin in one process after warm-up.

    PJRT_DEVICE=CPU python benchmarks/kan_health_cost.py [--reps 10] [--s16]

Demo size (configs/demo_digits.yaml, batch 64); --s16 adds KAN-S/16 at 224 px, batch 8. Each
update is the trainer's `train_step` on a fixed batch, followed by xm.wait_device_ops() so the
time covers execution, not only tracing; every update is a log step (log_interval 1), the worst
case for the closure.
"""

import argparse
import os
import sys

import torch
import torch_xla
import torch_xla.core.xla_model as xm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import machine_info, median_ms  # noqa: E402

from kan_vit.training import loop  # noqa: E402
from kan_vit.training.config import load  # noqa: E402

SETUPS = {
    "demo (4 x dim 96, K=4, batch 64, 32 px)": ("demo_digits.yaml", []),
    "KAN-S/16 (12 x dim 384, K=8, batch 8, 224 px)": ("kan_s16.yaml", ["data.train_batch_size=8"]),
}


def make_update(config: str, overrides: list[str], health: bool):
    cfg = load(
        os.path.join(ROOT, "configs", config),
        overrides + [f"run.kan_health={str(health).lower()}", "schedule.log_interval=1"],
    )
    device = torch_xla.device()
    state = loop.build_state(cfg, device)
    batch, size, labels = cfg.data.train_batch_size, cfg.model.image_size, cfg.model.labels
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen).to(device)
    targets = torch.nn.functional.one_hot(torch.randint(0, labels, (batch,), generator=gen), labels).float().to(device)
    micro_batch = (images, targets, torch.zeros(1, dtype=torch.int64, device=device))

    def update():
        loop.train_step(state, [micro_batch], cfg)
        xm.wait_device_ops()

    return update


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--s16", action="store_true", help="also KAN-S/16 at batch 8 (slow to compile)")
    args = parser.parse_args()
    print(machine_info())
    print(f"\nmedian ms per update over {args.reps} round-robin reps after 3 warm-up\n")
    print("| model | health off | health on | cost |")
    print("|---|---:|---:|---:|")
    for name, (config, overrides) in SETUPS.items():
        if config == "kan_s16.yaml" and not args.s16:
            continue
        times = median_ms({health: make_update(config, overrides, health) for health in (False, True)}, args.reps)
        print(
            f"| {name} | {times[False]:.1f} | {times[True]:.1f} | {100 * (times[True] / times[False] - 1):+.1f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
