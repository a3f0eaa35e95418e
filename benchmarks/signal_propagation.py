"""Signal propagation at initialisation: the six models at 224 px, with each KAN ablation switch.

    python benchmarks/signal_propagation.py [--batch 16] [--models small] [--out runs/signal_propagation]

For each model (original init, model.init_seed 0 as the trainer builds it) and each KAN switch, one
forward and backward on a batch of the demo's digits (scikit-learn's 8x8 images, bicubic to 224 px,
RGB, ImageNet-normalised) with random labels, measuring per block:
- the residual stream's RMS after the block;
- the feed-forward branch's output RMS relative to its input's (the block's second LayerNorm);
- the KAN input's saturated fraction: |x| > 3.47, where tanh'(x) < 0.004 and T_k(tanh x) is flat;
- the L2 norm of the loss gradient over the block's parameters.
Prints Markdown tables (a summary per setting; per block for the S/16 models, or the first size
given) and writes them to OUT/signal.md, every number to OUT/signal.json and a plot to OUT/signal.png.
"""

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import machine_info  # noqa: E402

import kan_vit  # noqa: E402, F401  (registers the models)
from kan_vit.training.seeding import seeded_host_rngs  # noqa: E402

SATURATED = 3.47  # tanh'(3.47) = 0.0039
SIZES = ("tiny", "small", "base")
KAN_SETTINGS = {
    "original": {},
    "input scale": {"kan_input_scale": True},
    "base branch": {"kan_base_branch": True},
    "variance-preserving init": {"kan_init": "variance_preserving"},
}


def digit_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` demo digits at 224 px, normalised as the trainer does, and random ImageNet labels."""
    rng = np.random.default_rng(seed)
    digits = load_digits().images[rng.choice(1797, batch, replace=False)] / 16.0
    images = torch.tensor(digits, dtype=torch.float32)[:, None].expand(-1, 3, -1, -1)
    images = F.interpolate(images, size=224, mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return (images - mean) / std, torch.tensor(rng.integers(0, 1000, batch))


def rms(x: torch.Tensor) -> float:
    return x.detach().double().pow(2).mean().sqrt().item()


def measure(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per-block lists of the four measures for one forward and backward."""
    blocks = list(model.blocks)
    out = {key: [None] * len(blocks) for key in ("residual_rms", "ffn_gain", "saturated", "grad_norm")}
    handles = []
    for i, block in enumerate(blocks):

        def on_ffn(module, args, output, i=i):
            out["ffn_gain"][i] = rms(output) / rms(args[0])
            if hasattr(module, "kan"):
                x = module.kan.tanh_input(args[0])
                out["saturated"][i] = (x.detach().abs() > SATURATED).double().mean().item()

        def on_block(module, args, output, i=i):
            out["residual_rms"][i] = rms(output)

        handles += [block.mlp.register_forward_hook(on_ffn), block.register_forward_hook(on_block)]
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    for handle in handles:
        handle.remove()
    for i, block in enumerate(blocks):
        grads = [p.grad.double().pow(2).sum() for p in block.parameters() if p.grad is not None]
        out["grad_norm"][i] = torch.stack(grads).sum().sqrt().item()
    return out


def settings(sizes) -> dict:
    """name -> (timm model name, kwargs)."""
    runs = {}
    for size in sizes:
        letter = size[0].upper()
        for name, kwargs in KAN_SETTINGS.items():
            runs[f"KAN-ViT-{letter}/16, {name}"] = (f"kan_vit_{size}_patch16_224", kwargs)
        runs[f"DeiT-{letter}/16"] = (f"deit_jax_{size}_patch16_224", {})
    return runs


def summary_table(results: dict) -> str:
    lines = [
        "| model, setting | residual RMS, block 1 -> L | FFN out/in RMS (median over blocks) | "
        "KAN input saturated (max over blocks) | grad norm, block 1 / block L |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        sat = "-" if r["saturated"][0] is None else f"{100 * max(r['saturated']):.2f}%"
        g = r["grad_norm"]
        lines.append(
            f"| {name} | {r['residual_rms'][0]:.3g} -> {r['residual_rms'][-1]:.3g} | "
            f"{float(np.median(r['ffn_gain'])):.3g} | {sat} | {g[0]:.3g} / {g[-1]:.3g} = {g[0] / g[-1]:.3g} |"
        )
    return "\n".join(lines)


def block_table(results: dict, names: list, key: str) -> str:
    depth = len(results[names[0]][key])
    lines = ["| block | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i in range(depth):
        lines.append(f"| {i + 1} | " + " | ".join(f"{results[n][key][i]:.3g}" for n in names) + " |")
    return "\n".join(lines)


def plot(results: dict, letter: str, path: str) -> None:
    keys = [
        ("residual_rms", "residual-stream RMS"),
        ("ffn_gain", "FFN output RMS / input RMS"),
        ("saturated", "KAN input |x| > 3.47"),
        ("grad_norm", "block gradient norm"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (key, title) in zip(axes, keys):
        for name, r in results.items():
            if f"{letter}/16" in name and r[key][0] is not None:
                ax.plot(range(1, len(r[key]) + 1), r[key], marker="o", label=name)
        ax.set_title(title)
        ax.set_xlabel("block")
        ax.set_yscale("log" if key != "saturated" else "linear")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--models", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--out", default=os.path.join("runs", "signal_propagation"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    images, labels = digit_batch(args.batch)
    results = {}
    for name, (model_name, kwargs) in settings(args.models).items():
        with seeded_host_rngs(0):  # the trainer's init (model.init_seed = 0)
            model = timm.create_model(model_name, **kwargs).eval()  # no dropout, drop path 0 at init
        results[name] = measure(model, images, labels)
        print(f"{name}: done", flush=True)
    letter = "S" if "small" in args.models else args.models[0][0].upper()  # the size tabled per block
    focus = [n for n in results if f"{letter}/16" in n]
    report = [
        f"Machine: {machine_info()}",
        f"Batch {args.batch} demo digits at 224 px, random labels, float32, init seed 0.",
        "",
        summary_table(results),
    ]
    for key, title in [("ffn_gain", "FFN output RMS / input RMS"), ("grad_norm", "gradient norm")]:
        report += ["", f"Per block, {letter}/16: {title}", "", block_table(results, focus, key)]
    text = "\n".join(report)
    print(text)
    with open(os.path.join(args.out, "signal.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "signal.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, letter, os.path.join(args.out, "signal.png"))
    print(f"wrote {args.out}/signal.md, signal.json, signal.png")


if __name__ == "__main__":
    main()
