"""Training-step throughput and peak memory on a GPU: what `launch/train_gpu.py` runs per update.

    python benchmarks/gpu_step.py                          # the GPU table: batch 256, bf16, 224 px
    python benchmarks/gpu_step.py --device cpu --batch 2 --steps 2 --warmup 1   # a smoke run anywhere

For kan_vit_small_patch16_224, deit_jax_small_patch16_224 and timm's vit_small_patch16_224, eager and
torch.compile'd (run.compile): one step is uint8 images normalised on the device, forward + loss
under bf16 autocast (run.bf16), backward, AdamW. images/s is the batch over the median step time
(the device synchronised around each step); peak memory is torch.cuda.max_memory_allocated over
the timed steps, parameters and AdamW state included (not measured on CPU).
"""

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from common import machine_info

import kan_vit  # noqa: F401  registers the KAN-ViT / DeiT-JAX models with timm

MODELS = ("kan_vit_small_patch16_224", "deit_jax_small_patch16_224", "vit_small_patch16_224")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, compiled: bool, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000, img_size=args.image_size).to(device).train()
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(forward((images.float() / 255 - mean) / std).float(), labels)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    for _ in range(args.warmup):  # the first compiles (and creates AdamW's state)
        step()
    _sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"img/s": args.batch / statistics.median(times), "peak GiB": peak, "warm-up s": warmup_s}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 instead of bf16 autocast")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    device = torch.device(args.device)
    print(machine_info())
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    print(
        f"batch {args.batch}, {args.image_size} px, {'bf16 autocast' if args.bf16 else 'float32'}, "
        f"median of {args.steps} steps after {args.warmup}\n"
    )
    print("| model | run.compile | images/s | peak memory GiB | warm-up s |")
    print("|---|---|---|---|---|")
    for name in args.models:
        for compiled in (False, True):
            r = measure(name, compiled, args, device)
            print(
                f"| {name} | {str(compiled).lower()} | {r['img/s']:.1f} | {r['peak GiB']:.2f} | {r['warm-up s']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
