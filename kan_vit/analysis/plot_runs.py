"""Training curves of one or more runs side by side: train loss, lr and val acc1 against the
optimizer step, one line per run, from each run's metrics.jsonl.

    kan-vit-plot RUN_DIR [RUN_DIR ...] --out curves.png
"""

from __future__ import annotations

import argparse
import os
import sys

from kan_vit.training.metrics_log import METRICS_FILE, read_metrics
from kan_vit.utils.atomic_files import atomic_outputs

PANELS = (("train/loss", "train loss (interval mean)"), ("train/lr", "learning rate"), ("val/acc1", "val acc1"))


def plot_runs(run_dirs: list[str]):
    """The figure: one axes per PANELS entry, in each one line per run (label: the run's directory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for run_dir in run_dirs:
        path = os.path.join(run_dir, METRICS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: pass a run's output_dir (it holds {METRICS_FILE})")
        runs[os.path.normpath(run_dir)] = read_metrics(path)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8), layout="constrained")
    for ax, (key, title) in zip(axes, PANELS):
        for name, records in runs.items():
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if key == "val/acc1" else None, ms=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="kan-vit-plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run output directories (run.output_dir)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        fig = plot_runs(args.run_dirs)
        with atomic_outputs(args.out) as (tmp,):
            fig.savefig(tmp, format="png", dpi=110)
    except (OSError, ValueError, KeyError) as error:
        print(f"kan-vit-plot: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
