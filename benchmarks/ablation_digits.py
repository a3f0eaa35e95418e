"""KAN vs MLP and the KAN ablation switches on the digits demo (configs/demo_digits.yaml).

    python benchmarks/ablation_digits.py [--steps 600] [--seeds 3] [--out runs/ablation_digits]

Every configuration trains through the real trainer (`kan_vit.training.loop.train`, XLA device) with
model.init_seed = data.shuffle_seed = model.dropout_seed = seed, evaluating once at the end;
--steps shortens the demo's schedule, keeping its warm-up fraction (50 of 600 updates).
The MLP is matched to the demo's KAN (degree 4) at equal parameter count: its hidden width H is
the integer nearest to solving 2*D*H + H + D = D*D*(K + 1) (MLP vs KAN feed-forward parameters;
everything else is shared), asserted to give the whole model within 1% of the KAN's parameters.
Writes OUT/ablation.md (mean ± std over seeds of the final val acc1 and of the last logged train
loss) and OUT/ablation.png; each run's own directory keeps its metrics.jsonl (see kan-vit-plot).
A run whose result.json exists is not repeated, so an interrupted grid continues where it stopped.
"""

import argparse
import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import machine_info  # noqa: E402

from kan_vit.training.config import load, validate  # noqa: E402
from kan_vit.training.loop import train  # noqa: E402
from kan_vit.training.metrics_log import METRICS_FILE, read_metrics  # noqa: E402
from kan_vit.training.model_factory import build_model  # noqa: E402

DEMO = os.path.join(ROOT, "configs", "demo_digits.yaml")
DEMO_DEGREE = 4  # configs/demo_digits.yaml


def matched_mlp_ratio(dim: int, degree: int) -> float:
    """mlp_ratio whose hidden width H = int(dim * ratio) gives the MLP the KAN's feed-forward size."""
    hidden = round((dim * dim * (degree + 1) - dim) / (2 * dim + 1))
    return (hidden + 0.5) / dim  # the half keeps int(dim * ratio) == hidden despite float rounding


def configurations(dim: int) -> dict[str, list[str]]:
    return {
        "KAN K=1": ["model.polynomial_degree=1"],
        "KAN K=2": ["model.polynomial_degree=2"],
        "KAN K=4 (demo)": [],
        "KAN K=8": ["model.polynomial_degree=8"],
        "MLP, params = KAN K=4": ["model.use_kan=false", f"model.mlp_ratio={matched_mlp_ratio(dim, DEMO_DEGREE)}"],
        "K=4 + decay on KAN coefficients": ["optim.kan_weight_decay=true"],
        "K=4 + input scale before tanh": ["model.kan_input_scale=true"],
        "K=4 + base branch W SiLU(x)": ["model.kan_base_branch=true"],
        "degrees [1, 2, 4, 8] by block": ["model.kan_degrees=[1, 2, 4, 8]"],
    }


def run_one(overrides: list[str], steps: int, seed: int, out_dir: str) -> dict:
    """Train one configuration (or read its stored result); returns acc1, final loss, params."""
    result_path = os.path.join(out_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as file:
            return json.load(file)
    cfg = load(
        DEMO,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="optimizer updates per run (the demo: 600)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "ablation_digits"))
    args = parser.parse_args()
    if args.steps <= 50 or args.seeds < 1:
        parser.error("--steps must exceed the demo's 50 warm-up steps and --seeds be >= 1")

    dim = load(DEMO).model.dim
    results = {}
    for name, overrides in configurations(dim).items():
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        results[name] = [
            run_one(overrides, args.steps, seed, os.path.join(args.out, slug, f"seed{seed}"))
            for seed in range(args.seeds)
        ]

    kan_params = results["KAN K=4 (demo)"][0]["params"]
    mlp_params = results["MLP, params = KAN K=4"][0]["params"]
    assert abs(mlp_params - kan_params) <= 0.01 * kan_params, (mlp_params, kan_params)
    lines = [
        f"{machine_info()}",
        "",
        f"digits demo, {args.steps} updates per run, {args.seeds} seeds, mean ± std over seeds",
        "",
        "| configuration | params | val acc1 | final train loss |",
        "|---|---:|---:|---:|",
    ]
    for name, runs in results.items():
        lines.append(
            f"| {name} | {runs[0]['params']:,} | {mean_std([r['val_acc1'] for r in runs])} | "
            f"{mean_std([r['train_loss'] for r in runs])} |"
        )
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "ablation.md"), "w") as file:
        file.write(table)
    print(table)

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for i, name in enumerate(names):
        accs = [r["val_acc1"] for r in results[name]]
        ax.scatter([i] * len(accs), accs, color="tab:gray", s=12, zorder=3)
        ax.errorbar(
            i,
            statistics.mean(accs),
            yerr=statistics.stdev(accs) if len(accs) > 1 else 0,
            fmt="o",
            color="tab:blue",
            capsize=4,
        )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("val acc1 (360 images)")
    ax.set_title(f"digits demo, {args.steps} updates, {args.seeds} seeds (dots), mean ± std")
    fig.savefig(os.path.join(args.out, "ablation.png"), dpi=120)


if __name__ == "__main__":
    main()
