"""The trainer's XLA train step: KAN-ViT-S/16 and DeiT-S/16 on torch_xla (PJRT: a TPU chip, or the
CPU here), float32 and bf16 autocast; optionally the original JAX/Flax step beside it.

    PJRT_DEVICE=CPU python benchmarks/xla_step.py [--batch 8] [--reps 10] [--original PATH]

One update = `kan_vit.training.loop.train_step` on a fixed device batch (uint8 images, soft targets), the
configs/kan_s16.yaml and configs/deit_s16.yaml recipes: normalisation, forward, loss, backward,
AdamW, interval metrics, then xm.wait_device_ops() so the time covers execution. Every setup
lives in its own worker process and runs its warm-up updates there (the first update's graph
creates the optimizer state, the second is the steady step) while the others wait; then this
process times the workers round-robin, one update at a time, so load from other processes hits
each alike. `--turn N` gives each setup N consecutive updates per turn instead and reports each
turn's first update apart: on this project's VM a step right after another process's update can
run slower than the steps after it (docs/performance.md). One model's setups are alive at a time: the
original's step takes ~750k page faults per update, ran 3.0-7.6 s in one process shared with
torch_xla setups, and slower with all six setups' workers alive than with its own model's only
(docs/performance.md). Each update's minor page faults are counted: the XLA:CPU runtime maps its temporary
buffer afresh for every execution (on a TPU that is device memory). Compilations during timing
must be 0. Each run also shows every setup's fastest and slowest quarter of timed updates with
their CPU time (user + system, all threads) and voluntary context switches: whether a slow update
did more work or the same work more slowly (docs/performance.md).

--keep-memory runs every worker, this project's and the original's alike, with glibc's allocator
told to keep freed memory (`KEEP_MEMORY`: one arena, no mmap, no trimming), so no update maps
memory afresh and none takes page faults: on a TPU the runtime holds device memory for good, and
the CPU's page faults (the original's KAN step maps ~2.9 GB per update) are not part of a graph's
speed there. The price: one arena serialises the runtimes' allocations from several threads
(more voluntary context switches). `--keep-memory original` does so in the original's workers
only: whether the ~3 GB that the original's KAN step frees per update slows the next process's
update, on a VM whose kernel reports freed memory to its host (docs/performance.md).

--solo N times no comparison: each setup runs in N fresh processes, one after another, each alone
on the machine, and every timed update's seconds are printed, a row per process. A setup that is
slow in some of its processes and fast in others, while other setups show the same spells, is
seeing the machine, not its graph (docs/performance.md). `--steps` picks which steps to time, in any mode.

--original PATH (the `src` folder of a KAN-ViT checkout; needs flax, optax and chex) adds the
original's own `training_step` (jax.pmap over one device, donated state) on the same batch, with
the same recipe, in a worker of its own, twice: as JAX runs it by default, and with
--xla_cpu_experimental_ynn_fusion_type= ("original-eigen"). JAX's newer XLA:CPU hands dots and
the element-wise work around them to YNNPACK; the XLA that torch_xla 2.9 bundles runs dots with
Eigen, so "original-eigen" compares the two graphs on the same kind of CPU kernels. That step
also draws mixup and label smoothing on the device, which this project does on the host. The
original calls `jax.tree_map`, which JAX 0.6 removed: it is aliased to `jax.tree_util.tree_map`
for newer JAX.

--changes also times each model's fp32 step with this project's XLA changes reverted,
cumulatively (`UNDO`), as a group of its own after the main comparisons: at most one group's
workers are alive at once (~2 GB each; the original's KAN step 5 GB).

Each torch_xla update also reports the part of it XLA spent executing the graph (torch_xla's
ExecuteTime metric); the rest is the host's: tracing the step in Python (the lazy tensor graph)
and handing it over. JAX traces its jitted step once, so its update is nearly all execution.

With --original it also times one more array in each runtime: the same element-wise update over
22M floats as one array and as 152 (ViT-S's parameters), in torch_xla written in place and out of
place.

HLO: instruction counts of the steady step graph before XLA's optimisation passes (what torch_xla
or JAX hands to XLA) and after (what the CPU runs); each setup is compiled once more in a worker
with XLA_FLAGS=--xla_dump_to, since dumping slows compilation.
"""

import argparse
import contextlib
import functools
import glob
import io
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import machine_info, median_ms  # noqa: E402

MODELS = {"KAN-ViT-S/16": "kan_s16.yaml", "DeiT-S/16": "deit_s16.yaml"}
PRECISIONS = ("fp32", "bf16")
# the original's step: its table label, and the XLA_FLAGS added to its worker's
ORIGINAL_STEPS = {
    "original": ("original (JAX, fp32)", ""),
    "original-eigen": ("original, Eigen dots", "--xla_cpu_experimental_ynn_fusion_type="),
}
# this project's XLA step changes, oldest first: the names torch_xla_update's `undo` takes, labels
CHANGES = {
    "attention": "explicit attention",
    "adamw": "GroupStepAdamW",
    "kan_rows": "KAN row blocks",
    "key_padding": "key padding",
    "kan_recompute": "KAN recompute",
}
# --changes: the step with the changes reverted cumulatively, from all of them to the newest alone
UNDO = {"before the changes": tuple(CHANGES)} | {
    "without " + ", ".join(list(CHANGES.values())[first:]): tuple(CHANGES)[first:] for first in range(1, len(CHANGES))
}
# --keep-memory: glibc keeps what the step frees (one arena that grows by brk, never trimmed)
KEEP_MEMORY = {
    "GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
}
WARMUP_UPDATES = 2
# untimed round-robin rounds once all of a group's workers are up: the original's KAN step (~750k
# page faults per update) ran up to 2x slower in its first updates than in later ones, and after
# 3 rounds still up to 1.4x in the first five timed ones (docs/performance.md, "The XLA step beside the
# original JAX step")
WARMUP_ROUNDS = 6


def load_config(model: str, precision: str, batch: int):
    from kan_vit.training.config import load

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
    of the explicit attention), "adamw" (torch's capturable AdamW instead of GroupStepAdamW),
    "kan_rows" (the KAN basis as column blocks of an (N, K * D) matrix instead of row blocks),
    "key_padding" (attention over the 197 keys instead of keys padded to 200), "kan_recompute" (the
    KAN backward reads x directly, so XLA's CSE keeps each layer's basis from the forward)."""
    import torch_xla
    import torch_xla.core.xla_model as xm

    from kan_vit.models import chebykan
    from kan_vit.training import loop

    device = torch_xla.device()
    state = loop.build_state(cfg, device)
    for module in state.model.modules():
        if "attention" in undo and hasattr(module, "fused_attn"):
            module.fused_attn = True
        if "key_padding" in undo and hasattr(module, "key_multiple"):
            module.key_multiple = None
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

    basis, after_gradient = chebykan._chebyshev_basis_t, chebykan._after_gradient
    layout = functools.partial(basis, rows=False) if "kan_rows" in undo else basis
    backward_input = (lambda x, grad: x) if "kan_recompute" in undo else after_gradient

    def update():
        # read when the step is traced, every update
        chebykan._chebyshev_basis_t, chebykan._after_gradient = layout, backward_input
        try:
            loop.train_step(state, [micro_batch], cfg)
        finally:
            chebykan._chebyshev_basis_t, chebykan._after_gradient = basis, after_gradient
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


def execute_seconds() -> float:
    """Seconds torch_xla's runtime has spent executing compiled graphs in this process so far."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("ExecuteTime")
    return data[1] / 1e9 if data else 0.0


def array_overhead(reps: int) -> dict:
    """Median ms of p = 0.9 p + 0.1 g over 22M floats as one array and as 152 arrays (ViT-S's
    parameter count and number of tensors): in torch_xla written in place (mul_, add_) and out of
    place (one copy_ per array), with the part of it XLA spent executing; and in JAX. The
    difference per array is what one more array costs each runtime, and the torch_xla host part of it
    is tracing."""
    import jax
    import jax.numpy as jnp
    import torch_xla
    import torch_xla.core.xla_model as xm

    device, total, fns, executed = torch_xla.device(), 22_000_000, {}, {}
    for arrays in (1, 152):
        shape = (total // arrays,)
        params = [torch.randn(shape).to(device) for _ in range(arrays)]
        grads = [torch.randn(shape).to(device) for _ in range(arrays)]
        for form in ("in place", "out of place"):
            seconds = executed[form, arrays] = []

            def torch_axpy(params=params, grads=grads, form=form, seconds=seconds):
                start = execute_seconds()
                for param, grad in zip(params, grads):
                    if form == "in place":
                        param.mul_(0.9).add_(grad, alpha=0.1)
                    else:
                        param.copy_(param * 0.9 + grad * 0.1)
                torch_xla.sync()
                xm.wait_device_ops()
                seconds.append(execute_seconds() - start)

            fns[f"torch_xla, {form}", arrays] = torch_axpy

        jax_state = [[jnp.ones(shape) for _ in range(arrays)], [jnp.ones(shape) for _ in range(arrays)]]
        step = jax.jit(lambda ps, gs: [0.9 * p + 0.1 * g for p, g in zip(ps, gs)], donate_argnums=0)

        def jax_axpy(jax_state=jax_state, step=step):
            jax_state[0] = step(*jax_state)
            jax.block_until_ready(jax_state[0])

        fns["JAX", arrays] = jax_axpy
    medians = median_ms(fns, reps=reps, warmup=2)
    for (form, arrays), seconds in executed.items():
        medians[f"torch_xla, {form} (XLA execution)", arrays] = 1e3 * statistics.median(seconds[-reps:])
    return medians


def compile_stats():
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return (data[0], data[1] / 1e9) if data else (0, 0.0)


def serve(model: str, precision: str, batch: int, original: str | None) -> None:
    """The worker: builds one setup, runs its warm-up updates, reports them, then runs one update
    per "step" line on stdin and answers each command with one JSON line on stdout."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (the original's model table, library notices) go to stderr
    is_original = precision in ORIGINAL_STEPS
    base, _, change = precision.partition(" ")
    cfg = load_config(model, "fp32" if is_original else base, batch)
    update = original_update(cfg, original) if is_original else torch_xla_update(cfg, UNDO.get(change, ()))
    stats = (lambda: (0, 0.0)) if is_original else compile_stats
    executed = (lambda: 0.0) if is_original else execute_seconds
    count, seconds = stats()
    start = time.perf_counter()
    for _ in range(WARMUP_UPDATES):
        update()
    warm_count, warm_seconds = stats()
    report = dict(warmup_s=time.perf_counter() - start, compiles=warm_count - count, compile_s=warm_seconds - seconds)
    channel.write(json.dumps(report) + "\n")
    for command in sys.stdin:
        if command.strip() == "step":
            before, execute = resource.getrusage(resource.RUSAGE_SELF), executed()
            start = time.perf_counter()
            update()
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_SELF)
            reply = dict(
                seconds=seconds,
                faults=after.ru_minflt - before.ru_minflt,
                execute=executed() - execute,
                cpu=after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
                switches=after.ru_nvcsw - before.ru_nvcsw,
            )
            channel.write(json.dumps(reply) + "\n")
        else:  # "compiles"
            channel.write(json.dumps(dict(compiles=stats()[0])) + "\n")


class Worker:
    """One setup in its own process (`serve`); `env` adds environment variables."""

    def __init__(self, model: str, precision: str, batch: int, original: str | None, env: dict | None = None):
        self.name = f"{model} {precision}"
        cmd = [sys.executable, __file__, "--worker", model, precision, "--batch", str(batch)]
        if original:
            cmd += ["--original", original]
        env = {**os.environ, **(env or {})}
        _, flags = ORIGINAL_STEPS.get(precision, ("", ""))
        if flags:
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}"
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.warmup = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            tail = self.log.read()[-3000:]
            raise RuntimeError(f"worker {self.name!r} exited with code {self.proc.wait()}; its last output:\n{tail}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def hlo_counts(dump_dir: str, original: bool) -> dict:
    """Instruction counts of the steady step graph, before and after XLA's optimisation passes,
    and the size of the temporary buffer XLA assigned it (MiB): torch_xla's last-compiled graph
    (the first update's graph also creates the optimizer state), or JAX's largest module (the
    training step; the others set up the state), and the GFLOP of its dots after the passes."""
    before = sorted(glob.glob(os.path.join(dump_dir, "module_*.before_optimizations.txt")))
    if original:
        before = sorted((path for path in before if ".jit_" in path), key=os.path.getsize)
    else:
        before = [path for path in before if ".SyncTensorsGraph." in path]
    if not before:
        raise RuntimeError(f"no HLO dump of the step in {dump_dir}")
    after = before[-1].replace("before_optimizations", "cpu_after_optimizations")
    counts, texts = {}, {}
    for stage, path in (("before", before[-1]), ("after", after)):
        with open(path) as f:
            texts[stage] = f.read()
        lines = texts[stage].splitlines()
        counts[stage] = sum(1 for line in lines if " = " in line and not line.lstrip().startswith(("//", "HloModule")))
    with open(after.replace(".txt", "-buffer-assignment.txt")) as f:
        temp = re.search(r"^allocation \d+: size (\d+), preallocated-temp:", f.read(), re.MULTILINE)
    counts["temp_mib"] = int(temp.group(1)) / 2**20 if temp else 0.0
    counts["dot_gflop"] = dot_flops(texts["after"]) / 1e9
    return counts


def dot_flops(hlo: str) -> int:
    """Multiply-adds x 2 of every dot in an HLO module's text: 2 * output elements * the product
    of the lhs contracting dimensions (batch dimensions are part of the output)."""
    dims = {
        name: [int(d) for d in shape.split(",") if d]
        for name, shape in re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo)
    }
    total = 0
    for out, lhs, contracting in re.findall(
        r"= \w+\[([\d,]*)\]\S* dot\((?:\S+ )?%([\w.\-]+), (?:\S+ )?%[\w.\-]+\), "
        r"[^\n]*?lhs_contracting_dims=\{([\d,]*)\}",
        hlo,
    ):
        size = 2 * np.prod([int(d) for d in out.split(",") if d], dtype=np.int64)
        total += int(size * np.prod([dims[lhs][int(i)] for i in contracting.split(",") if i], dtype=np.int64))
    return total


def gemm_gflops(reps: int) -> float:
    """GFLOPS of one plain float32 GEMM on torch_xla at the KAN-ViT-S feed-forward's shape
    (1,576 tokens x 3,072 basis columns x 384 outputs, batch 8), execution only: a ceiling for
    the step's dots on this machine."""
    import torch_xla
    import torch_xla.core.xla_model as xm

    device = torch_xla.device()
    a, b = torch.randn(1576, 3072).to(device), torch.randn(3072, 384).to(device)
    seconds = []
    for _ in range(reps + 3):
        start = execute_seconds()
        product = torch.mm(a, b)
        torch_xla.sync()  # computes `product`, a live tensor
        xm.wait_device_ops()
        del product
        seconds.append(execute_seconds() - start)
    return 2 * 1576 * 3072 * 384 / statistics.median(seconds[3:]) / 1e9


def hlo_child(model: str, precision: str, batch: int, original: str | None) -> dict:
    """Compiles one setup again in a worker that dumps XLA's HLO during its warm-up updates."""
    with tempfile.TemporaryDirectory() as dump_dir:
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
        Worker(model, precision, batch, original, env=dict(XLA_FLAGS=flags)).close()
        return hlo_counts(dump_dir, original=precision in ORIGINAL_STEPS)


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
        help="also time fp32 with the explicit attention, GroupStepAdamW, KAN row blocks, key padding, KAN "
        "recompute reverted (what each bought)",
    )
    parser.add_argument(
        "--turn",
        type=int,
        default=1,
        help="consecutive updates per setup and turn (default 1: strict round-robin); above 1 each turn's first "
        "update, the one right after another process's, is reported apart and left out of the medians",
    )
    parser.add_argument(
        "--keep-memory",
        nargs="?",
        const="all",
        choices=("all", "original"),
        help="run every worker (`all`, the default) or only the original's with glibc keeping freed memory (no page "
        "faults per update; see below)",
    )
    parser.add_argument("--no-hlo", action="store_true", help="skip the HLO counts (two compilations less per setup)")
    parser.add_argument(
        "--steps",
        help=f"comma-separated steps to time, in that order, from {list(PRECISIONS + tuple(ORIGINAL_STEPS))} "
        "(default: all; the original's need --original)",
    )
    parser.add_argument(
        "--solo",
        type=int,
        default=0,
        metavar="N",
        help="instead of the comparison, run each setup in N fresh processes, one after another, each alone on the "
        "machine, and print every update's time (see below)",
    )
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.original and not os.path.isfile(os.path.join(args.original, "training.py")):
        parser.error(f"--original {args.original}: no training.py there; pass the src folder of a KAN-ViT checkout")
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")

    if args.turn < 1:
        parser.error(f"--turn {args.turn}: give at least 1 update per turn")
    steps = PRECISIONS + (tuple(ORIGINAL_STEPS) if args.original else ())
    if args.steps:
        chosen = args.steps.split(",")
        unknown = sorted(set(chosen) - set(steps))
        if unknown:
            without = "" if args.original else " (the original's steps need --original)"
            parser.error(f"--steps: unknown {unknown}{without}; choose from {list(steps)}")
        steps = tuple(dict.fromkeys(chosen))  # in the order given: --solo times them in that order
    if args.keep_memory == "original" and not args.original:
        parser.error("--keep-memory original: keeps memory in the original's workers only; add --original PATH")
    if args.solo < 0 or (args.solo and (args.changes or args.turn > 1)):
        parser.error(f"--solo {args.solo}: give a number of processes >= 1, without --changes or --turn")
    if args.worker:
        serve(*args.worker, args.batch, args.original)
        return

    if args.solo:
        report_solo([(model, step) for model in models for step in steps], args)
        return
    # one group's workers alive at a time: each model's main comparison, then its reverted changes
    main_groups = [[(model, step) for step in steps] for model in models]
    change_groups = [[(model, "fp32")] + [(model, f"fp32 {name}") for name in UNDO] for model in models]
    main_results = [time_round_robin(group, args) for group in main_groups]
    change_results = [time_round_robin(group, args) for group in change_groups] if args.changes else []
    load_average = os.getloadavg()
    setups = [setup for group in main_groups for setup in group]
    hlo = {} if args.no_hlo else {setup: hlo_child(*setup, args.batch, args.original) for setup in setups}
    main_result = GroupResult.joined(main_results)
    times, faults, execute = main_result.times, main_result.field("faults"), main_result.field("execute")
    warmup = main_result.warmup
    results = main_results + change_results

    print(machine_info())
    print(
        f"load average (1, 5, 15 min) after timing: {load_average[0]:.2f}, {load_average[1]:.2f}, {load_average[2]:.2f}"
    )
    kept = _kept_note(args.keep_memory)
    print(
        f"batch {args.batch}, {args.reps} round-robin turns of {args.turn} update(s) after {WARMUP_UPDATES} warm-up "
        f"updates and {WARMUP_ROUNDS} untimed rounds, each setup in its own process, one model's setups alive at a "
        f"time{kept}; torch_xla compilations during timing: {sum(result.compiles for result in results)}\n"
    )
    print(
        "| model | step | median s | of which XLA execution s | min s | warm-up s | graphs compiled (s) | vs "
        "original / original with Eigen dots (medians) | page faults / update | temp buffer MiB | HLO instr. before / "
        "after opt |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model, precision in setups:
        ratio = _vs_original(times, model, precision, digits=2)
        counts = hlo.get((model, precision))
        sizes = f"{counts['temp_mib']:,.0f} | {counts['before']:,} / {counts['after']:,}" if counts else "- | -"
        step = _step_label(precision)
        executed = None if precision in ORIGINAL_STEPS else execute[model, precision]
        cells = _timing_cells(times[model, precision], executed, warmup[model, precision])
        page_faults = f"{statistics.median(faults[model, precision]):,.0f}"
        print(f"| {model} | {step} | {cells} | {ratio or '-'} | {page_faults} | {sizes} |")
    print()
    if hlo:
        flops = ", ".join(
            f"{model} {_step_label(precision)} {counts['dot_gflop']:.1f}" for (model, precision), counts in hlo.items()
        )
        print(f"dots in each step graph after XLA's passes, GFLOP per update: {flops}")
    print(
        f"one plain float32 GEMM (1576 x 3072 @ 3072 x 384, the KAN-ViT-S feed-forward's) on torch_xla: "
        f"{gemm_gflops(args.reps):.0f} GFLOPS, XLA execution, median of {args.reps}"
    )
    if args.turn > 1:
        first = main_result.first
        print("\neach turn's first update (right after another process's update), left out above\n")
        print("| model | step | first update of a turn, median s | the turn's other updates, median s |")
        print("|---|---|---:|---:|")
        for model, precision in setups:
            step = _step_label(precision)
            firsts, rest = statistics.median(first[model, precision]), statistics.median(times[model, precision])
            print(f"| {model} | {step} | {firsts:.3f} | {rest:.3f} |")
    updates = main_result.updates
    print(
        "\nthe fastest and the slowest quarter of each setup's timed updates: median s, CPU s (user + system, all "
        "threads), voluntary context switches\n"
    )
    print("| model | step | fastest quarter | slowest quarter |")
    print("|---|---|---:|---:|")
    for model, precision in setups:
        fast, slow = _quarters(updates[model, precision])
        print(f"| {model} | {_step_label(precision)} | {fast} | {slow} |")
    for result in change_results:
        (model, _), *_ = result.times
        print(f"\n{model}, fp32, with this project's XLA changes reverted (timed round-robin on their own)\n")
        print(
            "| step | median s | of which XLA execution s | min s | warm-up s | graphs compiled (s) | vs the step "
            "with all changes |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        reference = statistics.median(result.times[model, "fp32"])
        for (_, precision), ts in result.times.items():
            ratio = f"{statistics.median(ts) / reference:.2f}x"
            cells = _timing_cells(ts, result.field("execute")[model, precision], result.warmup[model, precision])
            print(f"| torch_xla {precision} | {cells} | {ratio} |")
    if args.original:
        overhead = array_overhead(max(args.reps, 10))
        print("\none more array per update: p = 0.9 p + 0.1 g over 22M floats, median ms\n")
        print("| runtime | 1 array | 152 arrays | per extra array | of which XLA execution (1 / 152 arrays) |")
        print("|---|---:|---:|---:|---:|")
        for runtime in ("torch_xla, in place", "torch_xla, out of place", "JAX"):
            one, split = overhead[runtime, 1], overhead[runtime, 152]
            executed = [overhead.get((f"{runtime} (XLA execution)", arrays)) for arrays in (1, 152)]
            executed = " / ".join(f"{ms:.1f}" for ms in executed) if executed[0] is not None else "-"
            print(f"| {runtime} | {one:.1f} | {split:.1f} | {1e3 * (split - one) / 151:.0f} us | {executed} |")
    raw = [{f"{m} {p}": [round(t, 3) for t in ts] for (m, p), ts in result.times.items()} for result in results]
    print("\nraw times (s), one object per group: " + json.dumps(raw))


def _kept_note(keep_memory: str | None) -> str:
    """The run description's note on --keep-memory ("" without it)."""
    if not keep_memory:
        return ""
    workers = "every worker keeps its" if keep_memory == "all" else "the original's workers keep their"
    return f"; {workers} freed memory ({KEEP_MEMORY['GLIBC_TUNABLES']})"


def _vs_original(times: dict, model: str, step: str, digits: int) -> str:
    """One step's median over each timed original step's median, as "0.48x / 0.47x" ("" if none)."""
    median = statistics.median(times[model, step])
    return " / ".join(
        f"{median / statistics.median(times[model, o]):.{digits}f}x" for o in ORIGINAL_STEPS if (model, o) in times
    )


def _step_label(precision: str) -> str:
    """A main table's "step" cell: the original's label, or torch_xla and the precision."""
    return ORIGINAL_STEPS[precision][0] if precision in ORIGINAL_STEPS else f"torch_xla {precision}"


def _quarters(replies: list) -> tuple[str, str]:
    """The fastest and the slowest quarter of one setup's updates (at least one each): median
    seconds, CPU seconds and voluntary context switches, as two "s / CPU s / switches" cells."""
    ordered = sorted(replies, key=lambda reply: reply["seconds"])
    size = max(1, len(ordered) // 4)

    def cell(part):
        seconds, cpu, switches = (statistics.median(r[key] for r in part) for key in ("seconds", "cpu", "switches"))
        return f"{seconds:.3f} / {cpu:.2f} / {switches:,.0f}"

    return cell(ordered[:size]), cell(ordered[-size:])


def _timing_cells(times: list, executed: list | None, report: dict) -> str:
    """median | of which XLA execution (median; "-" for JAX) | min | warm-up | graphs compiled
    (compile seconds) cells of one setup's row."""
    compiled = f"{report['compiles']} ({report['compile_s']:.1f})" if report["compiles"] else "-"
    execution = f"{statistics.median(executed):.3f}" if executed is not None else "-"
    return f"{statistics.median(times):.3f} | {execution} | {min(times):.3f} | {report['warmup_s']:.1f} | {compiled}"


@dataclass
class GroupResult:
    updates: dict  # setup -> the worker's reply per timed update (`serve`)
    warmup: dict  # setup -> the worker's warm-up report
    compiles: int  # torch_xla compilations during timing, all setups
    first: dict  # setup -> seconds of each turn's first update (empty with one update per turn)

    @classmethod
    def joined(cls, results: list) -> "GroupResult":
        """Groups of different setups as one result."""
        return cls(
            {setup: replies for result in results for setup, replies in result.updates.items()},
            {setup: report for result in results for setup, report in result.warmup.items()},
            sum(result.compiles for result in results),
            {setup: seconds for result in results for setup, seconds in result.first.items()},
        )

    @property
    def times(self) -> dict:
        return self.field("seconds")

    def field(self, name: str) -> dict:
        """setup -> one field of the worker's reply, per timed update."""
        return {setup: [reply[name] for reply in replies] for setup, replies in self.updates.items()}


def time_round_robin(setups: list, args) -> GroupResult:
    """Each setup's warm-up in its own worker, one after another, then WARMUP_ROUNDS untimed and
    `args.reps` timed round-robin turns of `args.turn` updates; with more than one update per
    turn, each turn's first update is kept apart (`GroupResult.first`)."""
    workers = {}
    try:
        for setup in setups:
            keeps = args.keep_memory == "all" or (args.keep_memory == "original" and setup[1] in ORIGINAL_STEPS)
            workers[setup] = Worker(*setup, args.batch, args.original, env=KEEP_MEMORY if keeps else None)
        compiles_before = {setup: worker.ask("compiles")["compiles"] for setup, worker in workers.items()}
        updates, first = {setup: [] for setup in setups}, {setup: [] for setup in setups}
        for rep in range(WARMUP_ROUNDS + args.reps):
            for setup, worker in workers.items():
                for update in range(args.turn):
                    reply = worker.ask("step")
                    if rep < WARMUP_ROUNDS:
                        continue
                    if update == 0 and args.turn > 1:
                        first[setup].append(reply["seconds"])
                        continue
                    updates[setup].append(reply)
        compiles = sum(worker.ask("compiles")["compiles"] - compiles_before[setup] for setup, worker in workers.items())
    finally:
        for worker in workers.values():
            worker.close()
    warmup = {setup: worker.warmup for setup, worker in workers.items()}
    return GroupResult(updates, warmup, compiles, first)


def report_solo(setups: list, args) -> None:
    """--solo: each setup in `args.solo` fresh worker processes, one after another, each alone on the
    machine, then one table row per process with every timed update's seconds: a slow spell of the
    machine shows in every setup's rows, a slow step in its own only."""
    kept = _kept_note(args.keep_memory)
    print(machine_info())
    print(
        f"batch {args.batch}; each setup in {args.solo} fresh processes one after another, each alone on the machine: "
        f"{WARMUP_UPDATES} warm-up updates, {WARMUP_ROUNDS} untimed, {args.reps} timed{kept}\n"
    )
    print("| model | step | process | median s | fastest quarter | slowest quarter | every timed update, s |")
    print("|---|---|---:|---:|---:|---:|---|")
    times, compiles = {}, 0
    for model, step in setups:
        for process in range(1, args.solo + 1):
            result = time_round_robin([(model, step)], args)
            compiles += result.compiles
            seconds = result.times[model, step]
            times.setdefault((model, step), []).extend(seconds)
            fast, slow = _quarters(result.updates[model, step])
            every = " ".join(f"{s:.2f}" for s in seconds)
            cells = f"{statistics.median(seconds):.3f} | {fast} | {slow} | {every}"
            print(f"| {model} | {_step_label(step)} | {process} | {cells} |", flush=True)
    load_average = ", ".join(f"{load:.2f}" for load in os.getloadavg())
    print(f"\nquarters: median s / CPU s / voluntary context switches; load average (1, 5, 15 min): {load_average}")
    print(f"torch_xla compilations during timing: {compiles}\n")
    print("| model | step | median of all processes' updates, s | vs original / original with Eigen dots (if timed) |")
    print("|---|---|---:|---:|")
    for (model, step), seconds in times.items():
        ratio = _vs_original(times, model, step, digits=3)
        print(f"| {model} | {_step_label(step)} | {statistics.median(seconds):.3f} | {ratio or '-'} |")


if __name__ == "__main__":
    main()
