"""torch.compile (inductor, default options) vs eager on CPU: KAN feed-forward and train step.

    python benchmarks/compile_speed.py [--tokens 1576] [--batch 8] [--reps 10]

float32. Feed-forward: ChebyKAN D -> D (degree 8) and the MLP it replaces, ViT-S/16 shapes
(batch 8 x 197 tokens, D = 384), forward + backward. Train step: KAN-ViT-S/16 and DeiT-JAX-S/16,
224 px, forward + backward + AdamW (the model compiled, the optimizer eager). Eager and compiled
copies run round-robin in one process; "compile s" is the first compiled call (tracing and code
generation) minus an eager call. "Saved" counts what autograd keeps for backward in one forward
(a compiled graph saves through one autograd node, so the hooks see it too).
"""

import argparse
import time
from functools import partial

import torch
from common import machine_info, median_ms, saved_activation_bytes
from timm.layers import Mlp
from torch import nn
from train_step import make_step

from kan_vit.models.chebykan import ChebyKAN


def first_call_s(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def feed_forward_cases(tokens: int, dim: int):
    """name -> (module, its fwd+bwd step, its forward) for eager and compiled copies."""
    torch.manual_seed(0)
    x = torch.randn(tokens, dim, requires_grad=True)
    grad = torch.randn(tokens, dim)
    layers = {
        "ChebyKAN D->D": ChebyKAN(dim, dim, 8),
        "MLP D->4D->D": Mlp(dim, 4 * dim, act_layer=partial(nn.GELU, approximate="tanh")),
    }
    cases = {}
    for name, layer in layers.items():
        for mode, forward in (("eager", layer), ("compiled", torch.compile(layer))):

            def step(forward=forward, layer=layer):
                x.grad = None
                layer.zero_grad(set_to_none=True)
                forward(x).backward(grad)

            cases[name, mode] = (layer, step, partial(forward, x))
    return cases


def train_step_cases(batch: int):
    cases = {}
    for name in ("kan_vit_small_patch16_224", "deit_jax_small_patch16_224"):
        for mode in ("eager", "compiled"):
            model, images, step, forward = make_step(name, batch, compiled=mode == "compiled")
            cases[name, mode] = (model, step, partial(forward, images))
    return cases


def report(title: str, cases: dict, reps: int, unit: str, scale: float):
    eager_first = {name: first_call_s(step) for (name, mode), (_, step, _) in cases.items() if mode == "eager"}
    compile_s = {
        name: first_call_s(step) - eager_first[name]
        for (name, mode), (_, step, _) in cases.items()
        if mode == "compiled"
    }
    times = median_ms({key: step for key, (_, step, _) in cases.items()}, reps, warmup=2)
    print(f"\n{title}\n")
    print(
        f"| {'workload':<28} | eager ms | compiled ms | compiled speed-up | compile s | "
        f"saved for backward, eager / compiled ({unit}) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in eager_first:
        saved = [
            saved_activation_bytes(cases[name, mode][2], exclude=list(cases[name, mode][0].parameters())) / scale
            for mode in ("eager", "compiled")
        ]
        eager, compiled = times[name, "eager"], times[name, "compiled"]
        print(
            f"| {name:<28} | {eager:.0f} | {compiled:.0f} | {eager / compiled:.2f}x | "
            f"{compile_s[name]:.0f} | {saved[0]:.1f} / {saved[1]:.1f} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8 * 197)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    print(machine_info())
    print(f"float32; median of {args.reps} reps after 2 warm-up, eager and compiled round-robin")
    report(
        f"Feed-forward, {args.tokens} tokens x D={args.dim}, forward + backward",
        feed_forward_cases(args.tokens, args.dim),
        args.reps,
        "floats/token",
        4 * args.tokens,
    )
    report(
        f"Train step, batch {args.batch}, 224 px, forward + backward + AdamW",
        train_step_cases(args.batch),
        args.reps,
        "MiB",
        2**20,
    )


if __name__ == "__main__":
    main()
