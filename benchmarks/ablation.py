"""KAN vs an equal-parameter MLP, the KAN degrees and ablation switches, on the embedded tasks.

    python benchmarks/ablation.py [--task digits|mnist] [--layers 4] [--steps 600] [--seeds 5]
                                  [--only NAME ...] [--out DIR]

Every configuration trains through the real trainer (`kan_vit.training.loop.train`, XLA device) from
configs/demo_digits.yaml or configs/demo_mnist.yaml (the same model and recipe), seed s setting
model.init_seed = data.shuffle_seed = model.dropout_seed = s, evaluating once at the end; --steps
shortens the schedule keeping its warm-up fraction (50 of 600 updates); --layers deepens the model
(12: the recipes' depth). The MLP is matched to the KAN (degree 4) at equal parameter count: its
hidden width H is the integer nearest to solving 2*D*H + H + D = D*D*(K + 1) (MLP vs KAN
feed-forward parameters; everything else is shared), asserted to give the whole model within 1% of
the KAN's parameters.

Each configuration is compared with the MLP and with KAN K=4 by a paired t-test over seeds (seed
s of both shares the data order): mean difference, two-sided p, and `*` where p < 0.05. Writes
OUT/ablation.md and OUT/ablation.png; each run's directory keeps its metrics.jsonl (see
kan-vit-plot). A run whose result.json exists is not repeated, so an interrupted grid continues
where it stopped.
"""

import argparse
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy import stats  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import machine_info  # noqa: E402

from kan_vit.training.config import load, validate  # noqa: E402
from kan_vit.training.loop import train  # noqa: E402
from kan_vit.training.metrics_log import METRICS_FILE, read_metrics  # noqa: E402
from kan_vit.training.model_factory import build_model  # noqa: E402

TASKS = {
    "digits": (os.path.join(ROOT, "configs", "demo_digits.yaml"), 360),
    "mnist": (os.path.join(ROOT, "configs", "demo_mnist.yaml"), 1000),
}
DEGREE = 4  # the demos' polynomial_degree
KAN = f"KAN K={DEGREE}"  # the baseline every setting is paired with, besides the MLP
MLP = f"MLP, params = {KAN}"


def matched_mlp_ratio(dim: int, degree: int) -> float:
    """mlp_ratio whose hidden width H = int(dim * ratio) gives the MLP the KAN's feed-forward size."""
    hidden = round((dim * dim * (degree + 1) - dim) / (2 * dim + 1))
    return (hidden + 0.5) / dim  # the half keeps int(dim * ratio) == hidden despite float rounding


def configurations(dim: int, layers: int) -> dict[str, list[str]]:
    by_block = [d for d in (1, 2, 4, 8) for _ in range(layers // 4)]  # quarters of the depth
    by_block += [8] * (layers - len(by_block))
    return {
        "KAN K=1": ["model.polynomial_degree=1"],
        "KAN K=2": ["model.polynomial_degree=2"],
        KAN: [],
        "KAN K=8": ["model.polynomial_degree=8"],
        MLP: ["model.use_kan=false", f"model.mlp_ratio={matched_mlp_ratio(dim, DEGREE)}"],
        "K=4 + variance-preserving init": ["model.kan_init=variance_preserving"],
        "K=4 + decay on KAN coefficients": ["optim.kan_weight_decay=true"],
        "K=4 + input scale before tanh": ["model.kan_input_scale=true"],
        "K=4 + base branch W SiLU(x)": ["model.kan_base_branch=true"],
        f"degrees {by_block} by block": [f"model.kan_degrees={by_block}"],
    }


def run_one(config: str, overrides: list[str], steps: int, seed: int, out_dir: str) -> dict:
    """Train one configuration (or read its stored result); returns acc1, final loss, params."""
    result_path = os.path.join(out_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as file:
            return json.load(file)
    cfg = load(
        config,
        overrides
        + [
            f"schedule.training_steps={steps}",
            f"schedule.warmup_steps={max(1, steps // 12)}",
            "schedule.eval_interval=0",
            f"model.init_seed={seed}",
            f"model.dropout_seed={seed}",
            f"data.shuffle_seed={seed}",
            f"run.output_dir={out_dir}",
            "run.resume=never",
        ],
    )
    validate(cfg, world_size=1)
    metrics = train(cfg)
    losses = [r["train/loss"] for r in read_metrics(os.path.join(out_dir, METRICS_FILE)) if "train/loss" in r]
    params = sum(p.numel() for p in build_model(cfg).parameters())
    result = {"val_acc1": metrics["val/acc1"], "train_loss": losses[-1], "params": params}
    with open(result_path, "w") as file:
        json.dump(result, file)
    return result


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def paired(runs: list[dict], base_runs: list[dict]) -> str:
    """Mean acc1 difference to base_runs over the seeds, the paired t-test's p, `*` if p < 0.05."""
    diffs = [r["val_acc1"] - b["val_acc1"] for r, b in zip(runs, base_runs)]
    if len(diffs) < 2:
        return f"{statistics.mean(diffs):+.4f}"
    p = stats.ttest_rel([r["val_acc1"] for r in runs], [b["val_acc1"] for b in base_runs]).pvalue
    return f"{statistics.mean(diffs):+.4f} (p = {p:.3f}){' *' if p < 0.05 else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="digits")
    parser.add_argument("--layers", type=int, default=4, help="blocks (the demos: 4; the recipes: 12)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer updates per run (the demos: 600)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="configurations to run (with KAN K=4, MLP)")
    parser.add_argument("--out", help="default runs/ablation/TASK-LAYERSL-STEPS")
    args = parser.parse_args()
    if args.steps <= 50 or args.seeds < 1 or args.layers < 1:
        parser.error("--steps must exceed the demo's 50 warm-up steps, --seeds and --layers be >= 1")
    config, num_valid = TASKS[args.task]
    out = args.out or os.path.join(ROOT, "runs", "ablation", f"{args.task}-{args.layers}L-{args.steps}")
    dim = load(config).model.dim
    grid = configurations(dim, args.layers)
    unknown = sorted(set(args.only or []) - set(grid))
    if unknown:
        parser.error(f"--only: unknown configuration {unknown[0]!r}; choose from {sorted(grid)}")
    names = [n for n in grid if args.only is None or n in args.only or n in (MLP, KAN)]

    results = {name: [] for name in names}
    for seed in range(args.seeds):  # seed-major: an interrupted grid leaves complete pairs
        for name in names:
            slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
            overrides = grid[name] + [f"model.layers={args.layers}"]
            results[name].append(run_one(config, overrides, args.steps, seed, os.path.join(out, slug, f"seed{seed}")))

    kan_params, mlp_params = results[KAN][0]["params"], results[MLP][0]["params"]
    assert abs(mlp_params - kan_params) <= 0.01 * kan_params, (mlp_params, kan_params)
    lines = [
        f"{machine_info()}",
        "",
        f"{args.task} ({num_valid} held-out images), {args.layers} blocks, {args.steps} updates per run, "
        f"{args.seeds} seeds (0..{args.seeds - 1}), mean ± std over seeds; vs MLP, vs KAN K=4: "
        "paired over seeds, t-test p, * p < 0.05",
        "",
        "| configuration | params | val acc1 | vs MLP | vs KAN K=4 | final train loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        vs_mlp = "-" if name == MLP else paired(runs, results[MLP])
        vs_kan = "-" if name in (MLP, KAN) else paired(runs, results[KAN])
        lines.append(
            f"| {name} | {runs[0]['params']:,} | {mean_std([r['val_acc1'] for r in runs])} | {vs_mlp} | {vs_kan} | "
            f"{mean_std([r['train_loss'] for r in runs])} |"
        )
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "ablation.md"), "w") as file:
        file.write(table)
    print(table)

    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for i, name in enumerate(names):
        accs = [r["val_acc1"] for r in results[name]]
        ax.scatter([i] * len(accs), accs, color="tab:gray", s=12, zorder=3)
        std = statistics.stdev(accs) if len(accs) > 1 else 0
        ax.errorbar(i, statistics.mean(accs), yerr=std, fmt="o", color="tab:blue", capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"val acc1 ({num_valid} images)")
    ax.set_title(f"{args.task}, {args.layers} blocks, {args.steps} updates, {args.seeds} seeds (dots), mean ± std")
    fig.savefig(os.path.join(out, "ablation.png"), dpi=120)


if __name__ == "__main__":
    main()
