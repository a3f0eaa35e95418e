"""Whole-model train step: KAN-ViT-S/16 vs timm's vit_small_patch16_224 (and DeiT-JAX-S/16).

    python benchmarks/train_step.py [--batch 8] [--reps 10]

Forward + backward + AdamW, 224 px, eager float32 on CPU; both models timed round-robin in one
process. Memory, two ways, both counting tensor bytes (peak RSS was tried and dropped: glibc
arenas made it vary by ~800 MiB between the two identical MLP models):
(a) bytes autograd saves for backward in one forward (parameters excluded), saved-tensor hooks;
(b) peak of one train step from the profiler's allocator events (profile_memory=True): running
sum of allocations minus frees over the step (activations, gradients, temporaries) plus the
tensors alive across steps (parameters and AdamW's two moments, 3 x 4 bytes per parameter).
"""

import argparse
from functools import partial

import timm
import torch
from common import machine_info, median_ms, saved_activation_bytes

import kan_vit  # noqa: F401  (registers the models)

MODELS = ["vit_small_patch16_224", "kan_vit_small_patch16_224", "deit_jax_small_patch16_224"]


def make_step(name, batch, compiled=False):
    """(model, images, train step, forward): `compiled` runs the model under torch.compile."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).train()
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, 224, 224)
    labels = torch.randint(0, 1000, (batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(forward(images), labels).backward()
        opt.step()

    return model, images, step, forward


def peak_step_mib(step, params) -> float:
    """Peak tensor memory of one train step (after a warm-up step has created AdamW's state)."""
    with torch.profiler.profile(profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for frees
        peak = max(peak, live)
    persistent = 3 * 4 * sum(p.numel() for p in params)  # fp32 parameter + 2 AdamW moments
    return (persistent + peak) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()

    built = {name: make_step(name, args.batch) for name in MODELS}
    times = median_ms({name: step for name, (_, _, step, _) in built.items()}, args.reps, warmup=2)
    print(machine_info())
    print(
        f"train step: batch {args.batch}, 224 px, fwd+bwd+AdamW, eager float32, "
        f"median of {args.reps} reps after 2 warm-up\n"
    )
    print("| model | params | step ms | vs vit_small | saved for backward (MiB) | peak step memory (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    base = times[MODELS[0]]
    for name, (model, images, step, _) in built.items():
        params = list(model.parameters())
        saved = saved_activation_bytes(partial(model, images), exclude=params) / 2**20
        peak = peak_step_mib(step, params)
        print(
            f"| `{name}` | {sum(p.numel() for p in params):,} | {times[name]:.0f} | "
            f"{times[name] / base:.2f}x | {saved:.0f} | {peak:.0f} |"
        )


if __name__ == "__main__":
    main()
