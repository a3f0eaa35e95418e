"""Look inside a trained KAN-ViT: learned edge functions, coefficient energy by degree, input ranges.

    kan-vit-inspect CHECKPOINT [--config CONFIG [--set section.key=value ...]] --out DIR

CHECKPOINT: anything the trainer reads (trainer .pth, .pth / .safetensors state dicts, the
original's .msgpack). For each KAN layer (block i's feed-forward), DIR gets layer_{i}.png: the
learned functions phi_ij(x) = sum_k C[i, j, k] T_k(tanh(s_i x)) (+ W_b[j, i] SiLU(x) with the
base branch; s_i = 1 without the input scale) of the edges i -> j with the largest coefficient
norm over k >= 1 (T_0 only shifts a function), over the input range seen, drawn over the histogram
of that layer's inputs. report.md shows the figures and the tables, summary.json the numbers:
per layer the share of coefficient energy sum_(i,j) C[i, j, k]^2 by degree k, the largest slope
|d phi / dx| of any edge over the range (finite differences on a grid), and, with --config, the
validation inputs' range and fractions with |x| > 2 and beyond bf16 tanh saturation (3.47).
Without --config there are no inputs: the functions are drawn over DEFAULT_RANGE.
Runs eagerly on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys

import numpy as np
import torch
from torch.nn import functional as F

from kan_vit.models.chebykan import ChebyKAN, chebyshev_basis
from kan_vit.training.kan_health import SATURATION, degree_energy
from kan_vit.utils.atomic_files import atomic_outputs

DEFAULT_RANGE = (-4.0, 4.0)
GRID_POINTS = 801
# Fine fixed bins for the input histograms, accumulated batch by batch (inputs are not kept).
HIST_RANGE, HIST_BINS = 16.0, 1280
_KAN_KEY = re.compile(r"^blocks\.(\d+)\.mlp\.kan\.coefficients$")


@dataclasses.dataclass
class KanLayer:
    """One block's KAN feed-forward, as float64 arrays."""

    block: int
    coefficients: torch.Tensor  # (in, out, K + 1)
    input_scale: torch.Tensor | None  # (in,)
    base_weight: torch.Tensor | None  # (out, in)

    def edge_functions(self, x: torch.Tensor, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """phi_ij(x) for the edges (inputs[e], outputs[e]): (edges, len(x))."""
        scale = self.input_scale[inputs, None] if self.input_scale is not None else x.new_ones(len(inputs), 1)
        basis = chebyshev_basis(torch.tanh(scale * x), self.coefficients.shape[-1] - 1)  # (edges, G, K+1)
        phi = torch.einsum("egk,ek->eg", basis, self.coefficients[inputs, outputs])
        if self.base_weight is not None:
            phi = phi + self.base_weight[outputs, inputs, None] * F.silu(x)
        return phi

    def max_slope(self, x: torch.Tensor) -> tuple[float, int, int]:
        """Largest |d phi_ij / dx| over the grid x of any edge, and that edge (i, j)."""
        d_in, d_out, _ = self.coefficients.shape
        best = (-1.0, 0, 0)
        for i in range(d_in):  # one input at a time: (G, out) values, never (in, out, G)
            phi = self.edge_functions(x, torch.full((d_out,), i), torch.arange(d_out))
            slopes = (phi.diff(dim=1) / x.diff()).abs().amax(dim=1)
            j = int(slopes.argmax())
            if float(slopes[j]) > best[0]:
                best = (float(slopes[j]), i, j)
        return best

    def top_edges(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, outputs) of the `count` edges with the largest ||C[i, j, 1:]||."""
        norms = self.coefficients[:, :, 1:].norm(dim=-1)
        flat = norms.flatten().topk(min(count, norms.numel())).indices
        return flat // norms.shape[1], flat % norms.shape[1]


def kan_layers(state_dict: dict) -> list[KanLayer]:
    """The KAN layers of a KAN-ViT state dict, by block."""
    layers = []
    for key in sorted(state_dict, key=lambda k: [int(n) if n.isdigit() else n for n in k.split(".")]):
        match = _KAN_KEY.match(key)
        if match:
            prefix = f"blocks.{match.group(1)}.mlp."
            optional = [state_dict.get(prefix + name) for name in ("kan.input_scale", "base.weight")]
            layers.append(
                KanLayer(
                    int(match.group(1)),
                    state_dict[key].double(),
                    *[None if t is None else t.double() for t in optional],
                )
            )
    return layers


class InputStatistics:
    """Per-KAN-layer input range, histogram and tail fractions, accumulated by forward pre-hooks."""

    def __init__(self, model: torch.nn.Module):
        self.modules = [m for m in model.modules() if isinstance(m, ChebyKAN)]
        n = len(self.modules)
        self.low, self.high = [math.inf] * n, [-math.inf] * n
        self.count, self.beyond_2, self.saturated = [0] * n, [0] * n, [0] * n
        self.hist = [torch.zeros(HIST_BINS, dtype=torch.float64) for _ in range(n)]
        for index, module in enumerate(self.modules):
            module.register_forward_pre_hook(lambda m, args, index=index: self._add(index, m, args[0]))

    def _add(self, index: int, module: ChebyKAN, x: torch.Tensor) -> None:
        x = x.detach().double()
        tanh_input = module.tanh_input(x).abs()  # tails measured where tanh sees them
        self.low[index] = min(self.low[index], float(x.min()))
        self.high[index] = max(self.high[index], float(x.max()))
        self.count[index] += x.numel()
        self.beyond_2[index] += int((tanh_input > 2).sum())
        self.saturated[index] += int((tanh_input > SATURATION).sum())
        self.hist[index] += torch.histc(x, HIST_BINS, -HIST_RANGE, HIST_RANGE)

    def layer(self, index: int) -> dict:
        return {
            "input_min": self.low[index],
            "input_max": self.high[index],
            "inputs": self.count[index],
            "frac_abs_gt_2": self.beyond_2[index] / self.count[index],
            "frac_abs_gt_3.47": self.saturated[index] / self.count[index],
        }


def collect_statistics(model: torch.nn.Module, batches, max_batches: int) -> InputStatistics:
    """Run up to `max_batches` validation batches (uint8 images) through `model` on the CPU."""
    from kan_vit.training.loop import normalize

    stats = InputStatistics(model)
    model.eval()
    with torch.no_grad():
        for index, (images, _, _) in enumerate(batches):
            if index == max_batches:
                break
            model(normalize(images))
    return stats


def plot_layer(layer: KanLayer, x: torch.Tensor, edges: int, hist: tuple | None, title: str):
    """The figure of one layer: a grid of edge functions over `x`, each over the input histogram
    (`hist` = (bin edges, counts)) when there is one. Each axes' one line is phi over x."""
    import matplotlib.pyplot as plt

    inputs, outputs = layer.top_edges(edges)
    phi = layer.edge_functions(x, inputs, outputs)
    cols = math.ceil(math.sqrt(len(inputs)))
    rows = math.ceil(len(inputs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows), squeeze=False, layout="constrained")
    for e, ax in enumerate(axes.flat):
        if e >= len(inputs):
            ax.set_visible(False)
            continue
        if hist is not None:
            under = ax.twinx()
            bin_edges, counts = hist
            under.stairs(counts, bin_edges, fill=True, color="0.85")
            under.set_yticks([])
            ax.set_zorder(under.get_zorder() + 1)
            ax.patch.set_visible(False)
        ax.plot(x.numpy(), phi[e].numpy(), color="tab:blue", lw=1.3)
        ax.set_title(f"{int(inputs[e])} -> {int(outputs[e])}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def _histogram_over(counts: torch.Tensor, low: float, high: float, bins: int = 60) -> tuple:
    """The fixed fine histogram re-binned to `bins` bins over [low, high]."""
    fine_edges = np.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1)
    centers = (fine_edges[:-1] + fine_edges[1:]) / 2
    edges = np.linspace(low, high, bins + 1)
    coarse, _ = np.histogram(centers, bins=edges, weights=counts.numpy())
    return edges, coarse


def inspect(state_dict: dict, out_dir: str, edges: int = 16, stats: InputStatistics | None = None) -> dict:
    """Write layer_{block}.png, report.md and summary.json into `out_dir` (all or none); returns
    the summary. `stats` (from validation data) sets each layer's range; else DEFAULT_RANGE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = kan_layers(state_dict)
    if not layers:
        raise ValueError("the checkpoint has no KAN layers (blocks.*.mlp.kan.coefficients): is it an MLP model?")
    if stats is not None and len(stats.modules) != len(layers):
        raise ValueError(f"the model has {len(stats.modules)} KAN layers, the checkpoint {len(layers)}")
    summary = {
        "range_source": "validation inputs" if stats else f"default {list(DEFAULT_RANGE)} (no --config)",
        "layers": [],
    }
    figures = {}
    for index, layer in enumerate(layers):
        entry = {"block": layer.block, "degree": layer.coefficients.shape[-1] - 1}
        if stats is not None:
            entry.update(stats.layer(index))
            low, high = entry["input_min"], entry["input_max"]
        else:
            low, high = DEFAULT_RANGE
        x = torch.linspace(low, high, GRID_POINTS, dtype=torch.float64)
        energy = degree_energy(layer.coefficients).double()
        entry["energy_share_by_degree"] = (energy / energy.sum()).tolist()
        entry["max_slope"], i, j = layer.max_slope(x)
        entry["max_slope_edge"] = [i, j]
        summary["layers"].append(entry)
        hist = _histogram_over(stats.hist[index], low, high) if stats is not None else None
        figures[f"layer_{layer.block:02d}.png"] = plot_layer(
            layer, x, edges, hist, f"block {layer.block}: top {edges} edges by ||C[i, j, 1:]||, phi_ij(x)"
        )

    names = list(figures) + ["report.md", "summary.json"]
    os.makedirs(out_dir, exist_ok=True)
    with atomic_outputs(*[os.path.join(out_dir, name) for name in names]) as temps:
        for fig, tmp in zip(figures.values(), temps):
            fig.savefig(tmp, format="png", dpi=110)
            plt.close(fig)
        with open(temps[-2], "w", encoding="utf-8") as file:
            file.write(_report(summary, list(figures)))
        with open(temps[-1], "w", encoding="utf-8") as file:
            json.dump(summary, file, indent=1)
    return summary


def _report(summary: dict, figures: list[str]) -> str:
    layers = summary["layers"]
    degree = max(entry["degree"] for entry in layers)
    lines = [
        "# KAN inspection",
        "",
        f"Function ranges: {summary['range_source']}.",
        "",
        "## Coefficient energy share by degree k, largest slope",
        "",
        "| block | " + " | ".join(f"k={k}" for k in range(degree + 1)) + " | max abs(dphi/dx) | at edge i -> j |",
        "|---" * (degree + 4) + "|",
    ]
    for entry in layers:
        shares = entry["energy_share_by_degree"] + [math.nan] * (degree + 1 - len(entry["energy_share_by_degree"]))
        lines.append(
            f"| {entry['block']} | "
            + " | ".join("" if math.isnan(s) else f"{s:.3f}" for s in shares)
            + f" | {entry['max_slope']:.3g} | {entry['max_slope_edge'][0]} -> {entry['max_slope_edge'][1]} |"
        )
    if "inputs" in layers[0]:
        lines += [
            "",
            "## Validation inputs (tails on the tanh input: s * x with the input scale)",
            "",
            "| block | inputs | min | max | abs(x) > 2 | abs(x) > 3.47 (bf16 tanh = +-1) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for entry in layers:
            lines.append(
                f"| {entry['block']} | {entry['inputs']:,} | {entry['input_min']:.3f} | {entry['input_max']:.3f} | "
                f"{entry['frac_abs_gt_2']:.4%} | {entry['frac_abs_gt_3.47']:.4%} |"
            )
    else:
        lines += ["", "No --config: no validation inputs, so no input statistics or histograms."]
    lines += ["", "## Learned functions", ""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="kan-vit-inspect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="trainer .pth, .pth / .safetensors state dict or original .msgpack")
    parser.add_argument("--config", help="training config: the model and its validation data (input statistics)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key; the value is parsed as YAML; repeatable",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--edges", type=int, default=16, help="edges drawn per layer (default 16)")
    parser.add_argument("--max-batches", type=int, default=8, help="validation batches to run (default 8)")
    args = parser.parse_args(argv)
    if args.edges < 1 or args.max_batches < 1:
        parser.error("--edges and --max-batches must be >= 1")
    if args.set and not args.config:
        parser.error("--set needs --config")
    if not os.path.isfile(args.checkpoint):
        print(
            f"kan-vit-inspect: error: checkpoint {args.checkpoint} does not exist: pass a trainer .pth, "
            "a .pth / .safetensors state dict or an original .msgpack",
            file=sys.stderr,
        )
        return 2
    from kan_vit.training.config import ConfigError

    try:
        if args.config:
            state_dict, stats = _with_validation_data(args)
        else:
            from kan_vit.models.pretrained import read_state_dict

            state_dict, stats = read_state_dict(args.checkpoint), None
        summary = inspect(state_dict, args.out, args.edges, stats)
    except (ConfigError, ValueError, OSError) as error:
        print(f"kan-vit-inspect: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(summary['layers'])} layer figures, report.md and summary.json to {args.out}")
    return 0


def _with_validation_data(args) -> tuple[dict, InputStatistics]:
    """The configured model with the checkpoint's weights, and its inputs on validation batches."""
    from kan_vit.training.config import load, validate
    from kan_vit.training.data import check_dataset, create_valid_loader
    from kan_vit.training.model_factory import build_model_with_weights

    cfg = load(args.config, args.set)
    validate(cfg, world_size=1)
    check_dataset(cfg)
    model = build_model_with_weights(cfg, args.checkpoint)
    loader, _ = create_valid_loader(cfg, world_size=1, rank=0)
    stats = collect_statistics(model, loader, args.max_batches)
    return model.state_dict(), stats


if __name__ == "__main__":
    sys.exit(main())
