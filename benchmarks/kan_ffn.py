"""KAN feed-forward vs the MLP it replaces: time (forward + backward) and memory saved for backward.

    python benchmarks/kan_ffn.py [--tokens 1576] [--dim 384] [--degree 8] [--reps 20] [--threads N]

ViT-S/16 shapes by default (batch 8 x 197 tokens, D = 384, degree 8), float32 eager on CPU.
"""

import argparse
from functools import partial

import torch
from common import machine_info, median_ms, saved_activation_bytes
from timm.layers import Mlp
from torch import nn

from kan_vit.models.chebykan import ChebyKAN


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1576)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--degree", type=int, default=8)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, d = args.tokens, args.dim
    torch.manual_seed(0)
    layers = {
        "MLP D->4D->D tanh-GELU": Mlp(d, 4 * d, act_layer=partial(nn.GELU, approximate="tanh")),
        "ChebyKAN (memory-efficient, default)": ChebyKAN(d, d, args.degree),
        "ChebyKAN reference (einsum)": ChebyKAN(d, d, args.degree, memory_efficient=False),
    }
    x = torch.randn(n, d, requires_grad=True)
    grad = torch.randn(n, d)

    def fwd_bwd(layer):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    times = median_ms({name: partial(fwd_bwd, layer) for name, layer in layers.items()}, args.reps)
    base = next(iter(times.values()))
    print(machine_info())
    print(f"{n} tokens x D={d}, degree {args.degree}, float32, median of {args.reps} reps after 3 warm-up\n")
    print("| feed-forward | params | fwd+bwd ms | vs MLP | saved for backward (floats/token) |")
    print("|---|---:|---:|---:|---:|")
    for name, layer in layers.items():
        params = list(layer.parameters())
        saved = saved_activation_bytes(lambda layer=layer: layer(x), exclude=params)
        floats = saved / 4 / n
        print(
            f"| {name} | {sum(p.numel() for p in params):,} | {times[name]:.1f} | "
            f"{times[name] / base:.2f}x | {floats:.1f} = {floats / d:.2f}·D |"
        )


if __name__ == "__main__":
    main()
