"""The trainer's XLA train step: KAN-ViT-S/16 and DeiT-S/16 on torch_xla (PJRT: a TPU chip, or the
CPU here), float32 and bf16 autocast; optionally the original JAX/Flax step beside it.

    PJRT_DEVICE=CPU python benchmarks/xla_step.py [--batch 8] [--reps 10] [--original PATH]

One update = `kan_vit.train.train_step` on a fixed device batch (uint8 images, soft targets), the
configs/kan_s16.yaml and configs/deit_s16.yaml recipes: normalisation, forward, loss, backward,
AdamW, interval metrics, then xm.wait_device_ops() so the time covers execution. Every setup
runs its warm-up updates (the first update's graph creates the optimizer state, the second is
the steady step), then all setups are timed round-robin in one process, so load from other
processes hits each alike; compilations during timing must be 0.

--original PATH (the `src` folder of a KAN-ViT checkout; needs flax, optax and chex) adds the
original's own `training_step` (jax.pmap over one device, donated state) on the same batch, with
the same recipe; JAX and torch_xla then run in one process. That step also draws mixup and label
smoothing on the device, which this project does on the host. The original calls `jax.tree_map`,
which JAX 0.6 removed: it is aliased to `jax.tree_util.tree_map` for newer JAX.

With --original it also times one more kernel in each runtime: the same element-wise update over
22M floats as one array and as 152 (ViT-S's parameters).

HLO: instruction counts of the steady step graph before XLA's optimisation passes (what torch_xla
or JAX hands to XLA) and after (what the CPU runs); each setup is compiled once more in a child
process with XLA_FLAGS=--xla_dump_to, since dumping slows compilation.
"""

import argparse
import contextlib
import glob
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import machine_info  # noqa: E402

MODELS = {"KAN-ViT-S/16": "kan_s16.yaml", "DeiT-S/16": "deit_s16.yaml"}
PRECISIONS = ("fp32", "bf16")
# --changes: the step with this project's XLA changes reverted, cumulatively
UNDO = {"before both changes": ("attention", "adamw"), "without GroupStepAdamW": ("adamw",)}
WARMUP_UPDATES = 2


def load_config(model: str, precision: str, batch: int):
    from kan_vit.config import load

    return load(
        os.path.join(ROOT, "configs", MODELS[model]),
        [
            f"data.train_batch_size={batch}",
            "schedule.log_interval=1000000",
            f"run.bf16={str(precision == 'bf16').lower()}",
        ],
    )


def fixed_batch(cfg):
    rng = np.random.default_rng(0)
    size, labels, batch = cfg.model.image_size, cfg.model.labels, cfg.data.train_batch_size
    return rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8), rng.integers(0, labels, batch)


def torch_xla_update(cfg, undo: tuple = ()):
    """The trainer's update on the XLA device, as a function that waits for its execution. `undo`
    reverts this project's XLA step changes, to measure what each bought: "attention" (SDPA instead
    of the explicit attention), "adamw" (torch's capturable AdamW instead of GroupStepAdamW)."""
    import torch_xla
    import torch_xla.core.xla_model as xm

    from kan_vit import train

    device = torch_xla.device()
    state = train.build_state(cfg, device)
    if "attention" in undo:
        for module in state.model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = True
    if "adamw" in undo:
        state.optimizer = torch.optim.AdamW(state.optimizer.param_groups, capturable=True)
    images, labels = fixed_batch(cfg)
    targets = torch.nn.functional.one_hot(torch.from_numpy(labels), cfg.model.labels).float()
    micro_batch = (
        torch.from_numpy(images).to(device),
        targets.to(device),
        torch.zeros(1, dtype=torch.int64, device=device),
    )
    torch_xla.sync()  # device data, as the loader's batches: the first update traces the steady graph

    def update():
        train.train_step(state, [micro_batch], cfg)
        xm.wait_device_ops()

    return update


def original_update(cfg, source: str):
    """The original's pmapped training_step on one device, with the config's recipe."""
    sys.path.insert(0, source)
    import jax
    import jax.numpy as jnp

    if not hasattr(jax, "tree_map"):
        jax.tree_map = jax.tree_util.tree_map
    import training  # the original's module

    sections = (cfg.data, cfg.augment, cfg.model, cfg.optim, cfg.schedule)
    args = argparse.Namespace(**{key: value for section in sections for key, value in asdict(section).items()})
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the model's table
        state = [training.create_train_state(args).replicate()]
    images, labels = fixed_batch(cfg)
    batch = (jnp.asarray(images[None]), jnp.asarray(labels[None].astype(np.int32)))

    def update():
        state[0], metrics = training.training_step(state[0], batch)
        jax.block_until_ready((state[0].params, metrics))

    return update


def kernel_overhead(reps: int) -> dict:
    """Median ms of p = 0.9 p + 0.1 g over 22M floats as one array and as 152 arrays (ViT-S's
    parameter count and number of tensors), torch_xla and JAX: the difference per array is what one
    more kernel costs each runtime."""
    import jax
    import jax.numpy as jnp
    import torch_xla
    import torch_xla.core.xla_model as xm

    device, total, fns = torch_xla.device(), 22_000_000, {}
    for arrays in (1, 152):
        shape = (total // arrays,)
        params = [torch.randn(shape).to(device) for _ in range(arrays)]
        grads = [torch.randn(shape).to(device) for _ in range(arrays)]

        def torch_axpy(params=params, grads=grads):
            for param, grad in zip(params, grads):
                param.mul_(0.9).add_(grad, alpha=0.1)
            torch_xla.sync()
            xm.wait_device_ops()

        jax_state = [[jnp.ones(shape) for _ in range(arrays)], [jnp.ones(shape) for _ in range(arrays)]]
        step = jax.jit(lambda ps, gs: [0.9 * p + 0.1 * g for p, g in zip(ps, gs)], donate_argnums=0)

        def jax_axpy(jax_state=jax_state, step=step):
            jax_state[0] = step(*jax_state)
            jax.block_until_ready(jax_state[0])

        fns["torch_xla", arrays], fns["JAX", arrays] = torch_axpy, jax_axpy
    for fn in fns.values():
        fn(), fn()
    times = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: 1e3 * statistics.median(ts) for key, ts in times.items()}


def compile_stats():
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return (data[0], data[1] / 1e9) if data else (0, 0.0)


def hlo_counts(dump_dir: str, original: bool) -> dict:
    """Instruction counts of the steady step graph, before and after XLA's optimisation passes:
    torch_xla's last-compiled graph (the first update's graph also creates the optimizer state),
    or JAX's largest module (the training step; the others set up the state)."""
    before = sorted(glob.glob(os.path.join(dump_dir, "module_*.before_optimizations.txt")))
    if original:
        before = sorted((path for path in before if ".jit_" in path), key=os.path.getsize)
    else:
        before = [path for path in before if ".SyncTensorsGraph." in path]
    if not before:
        raise RuntimeError(f"no HLO dump of the step in {dump_dir}")
    counts = {}
    for stage, path in (
        ("before", before[-1]),
        ("after", before[-1].replace("before_optimizations", "cpu_after_optimizations")),
    ):
        with open(path) as f:
            counts[stage] = sum(1 for line in f if " = " in line and not line.lstrip().startswith(("//", "HloModule")))
    return counts


def hlo_child(model: str, precision: str, batch: int, original: str | None) -> dict:
    """Runs the warm-up updates of one setup in a child process that dumps XLA's HLO."""
    with tempfile.TemporaryDirectory() as dump_dir:
        env = dict(
            os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
        )
        cmd = [sys.executable, __file__, "--hlo-child", model, precision, "--batch", str(batch)]
        if original:
            cmd += ["--original", original]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        return hlo_counts(dump_dir, original=precision == "original")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--original", help="the src folder of a KAN-ViT (original JAX) checkout")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    parser.add_argument(
        "--changes",
        action="store_true",
        help="also time fp32 with the explicit attention and GroupStepAdamW reverted (what each bought)",
    )
    parser.add_argument("--no-hlo", action="store_true", help="skip the HLO counts (two compilations less per setup)")
    parser.add_argument("--hlo-child", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.original and not os.path.isfile(os.path.join(args.original, "training.py")):
        parser.error(f"--original {args.original}: no training.py there; pass the src folder of a KAN-ViT checkout")
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")

    if args.hlo_child:  # the child: warm-up updates only, while XLA dumps the graphs
        model, precision = args.hlo_child
        cfg = load_config(model, "fp32" if precision == "original" else precision, args.batch)
        update = original_update(cfg, args.original) if precision == "original" else torch_xla_update(cfg)
        for _ in range(WARMUP_UPDATES):
            update()
        return

    setups = [(model, precision) for model in models for precision in PRECISIONS]
    if args.changes:
        setups += [(model, f"fp32 {name}") for model in models for name in UNDO]
    if args.original:
        setups += [(model, "original") for model in models]
    updates, warmup = {}, {}
    for model, precision in setups:
        cfg = load_config(model, "fp32" if precision == "original" else precision.split()[0], args.batch)
        updates[model, precision] = (
            original_update(cfg, args.original)
            if precision == "original"
            else torch_xla_update(cfg, UNDO.get(precision[5:], ()))
        )
        count, seconds = compile_stats()
        start = time.perf_counter()
        for _ in range(WARMUP_UPDATES):
            updates[model, precision]()
        warm_count, warm_seconds = compile_stats()
        warmup[model, precision] = (time.perf_counter() - start, warm_count - count, warm_seconds - seconds)

    count_before_timing = compile_stats()[0]
    times = {setup: [] for setup in setups}
    for _ in range(args.reps):
        for setup, update in updates.items():
            start = time.perf_counter()
            update()
            times[setup].append(time.perf_counter() - start)
    compiles_during_timing = compile_stats()[0] - count_before_timing
    load_average = os.getloadavg()
    hlo = (
        {}
        if args.no_hlo
        else {
            setup: hlo_child(*setup, args.batch, args.original)
            for setup in setups
            if setup[1] in PRECISIONS or setup[1] == "original"
        }
    )

    print(machine_info())
    print(
        f"load average (1, 5, 15 min) after timing: {load_average[0]:.2f}, {load_average[1]:.2f}, {load_average[2]:.2f}"
    )
    print(
        f"batch {args.batch}, {args.reps} round-robin reps after {WARMUP_UPDATES} warm-up updates; torch_xla "
        f"compilations during timing: {compiles_during_timing}\n"
    )
    print(
        "| model | step | median s | min s | vs original (median) | warm-up s | graphs compiled (s) "
        "| HLO instr. before / after opt |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for model, precision in setups:
        median = statistics.median(times[model, precision])
        original = times.get((model, "original"))
        ratio = f"{median / statistics.median(original):.2f}x" if original else "-"
        wall, count, seconds = warmup[model, precision]
        compiled = "-" if precision == "original" else f"{count} ({seconds:.1f})"
        counts = hlo.get((model, precision))
        sizes = f"{counts['before']:,} / {counts['after']:,}" if counts else "-"
        step = "original (JAX, fp32)" if precision == "original" else f"torch_xla {precision}"
        print(
            f"| {model} | {step} | {median:.3f} | {min(times[model, precision]):.3f} | {ratio} | {wall:.1f} "
            f"| {compiled} | {sizes} |"
        )
    if args.original:
        overhead = kernel_overhead(max(args.reps, 10))
        print("\nper-kernel cost: p = 0.9 p + 0.1 g over 22M floats, median ms\n")
        print("| runtime | 1 array | 152 arrays | per extra array |")
        print("|---|---:|---:|---:|")
        for runtime in ("torch_xla", "JAX"):
            one, split = overhead[runtime, 1], overhead[runtime, 152]
            print(f"| {runtime} | {one:.1f} | {split:.1f} | {1e3 * (split - one) / 151:.0f} us |")
    print("\nraw times (s): " + json.dumps({f"{m} {p}": [round(t, 3) for t in ts] for (m, p), ts in times.items()}))


if __name__ == "__main__":
    main()
