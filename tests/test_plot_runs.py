"""kan-vit-plot: the drawn curves are the metrics.jsonl values of each run, written by the
trainer's RunLogger; a directory without metrics exits 2 and writes nothing."""

import math
import os

import numpy as np
from matplotlib.image import imread

from kan_vit.analysis.plot_runs import PANELS, main, plot_runs
from kan_vit.training.config import load
from kan_vit.training.metrics_log import RunLogger, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo_digits.yaml")


def _logged_run(run_dir, decay):
    """A run directory as the trainer leaves it: RunLogger's metrics.jsonl with train and val records."""
    cfg = load(DEMO, [f"run.output_dir={run_dir}", "schedule.training_steps=40"])
    os.makedirs(run_dir)
    logger = RunLogger(cfg, master=True, start_step=0)
    for step in range(10, 41, 10):
        logger.train(
            step,
            {
                "train/loss": 2.3 * math.exp(-decay * step),
                "train/acc1": 0.1,
                "train/acc5": 0.5,
                "train/lr": 1e-3 * step / 40,
                "data/skipped": 0,
            },
        )
        if step % 20 == 0:
            logger.eval(step, {"val/loss": 1.0, "val/acc1": 1 - math.exp(-decay * step), "val/count": 360})
    logger.close()
    return str(run_dir)


def test_drawn_curves_are_the_files_values(tmp_path):
    runs = [_logged_run(tmp_path / "a", 0.01), _logged_run(tmp_path / "b", 0.05)]
    fig = plot_runs(runs)
    for ax, (key, _) in zip(fig.axes, PANELS):
        assert [line.get_label() for line in ax.lines] == runs
        for line, run in zip(ax.lines, runs):
            records = [r for r in read_metrics(os.path.join(run, "metrics.jsonl")) if key in r]
            assert len(records) == (2 if key == "val/acc1" else 4)
            np.testing.assert_array_equal(line.get_xdata(), [r["step"] for r in records])
            np.testing.assert_array_equal(line.get_ydata(), [r[key] for r in records])

    out = tmp_path / "curves.png"
    assert main(runs + ["--out", str(out)]) == 0
    assert imread(str(out)).shape[2] in (3, 4)


def test_a_directory_without_metrics_exits_2(tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main([str(tmp_path), "--out", str(out)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err and not out.exists()
