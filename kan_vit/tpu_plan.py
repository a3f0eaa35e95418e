"""`kan-vit-tpu-plan`: what the trainer's update needs on a TPU, on any machine, before renting one.

    kan-vit-tpu-plan --config configs/kan_s16.yaml --tpu v4 [--set k=v ...] [--batch N] [--max-batch]

The trainer's own `train_step` (optimizer, loss, soft targets, bf16 autocast, gradient accumulation) runs
on PJRT CPU with device tensors for one batch, as the trainer runs it on a TPU, up to the step's sync:
torch_xla builds the step's graph (HLO) with its buffer donors (the inputs updated in place:
parameters, optimizer moments, step counts), XLA dumps it, and the run stops there. libtpu compiles
that graph for a TPU topology without a TPU (deviceless ahead-of-time compilation, the donors
marked as torch_xla's TPU runtime marks them); XLA's TPU compiler then reports, per device, the
executable's memory (arguments, outputs, the inputs aliased to outputs, temporaries) and cost
(FLOPs, bytes accessed). The same for one evaluation batch (`eval_batch_sums`).

Not in the graph: the all-reduce of gradients over replicas (a one-device trace), the host's data loader.
Needs the `tpu-plan` extra (jax[tpu]: jax and libtpu).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from kan_vit.models.chebykan import XLA_TARGET
from kan_vit.training.config import ConfigError, launcher_parser, load


@dataclass(frozen=True)
class Chip:
    """A TPU generation: the deviceless topology compiled for, and the chip's published peak
    bf16 FLOP/s and HBM bandwidth (Google Cloud TPU documentation, each generation's page)."""

    topology: str
    peak_tflops: float  # per chip, bf16 (fp32 matmuls at default precision run as bf16 passes)
    hbm_gbps: float  # per chip, GB/s
    source: str


DOCS = "https://cloud.google.com/tpu/docs/"
TPUS = {
    "v3": Chip("v3:2x2", 123.0, 900.0, DOCS + "v3"),
    "v4": Chip("v4:2x2x1", 275.0, 1200.0, DOCS + "v4"),
    "v5e": Chip("v5e:2x2", 197.0, 819.0, DOCS + "v5e"),
    "v6e": Chip("v6e:2x2", 918.0, 1640.0, DOCS + "v6e"),
    "v5p": Chip("v5p:2x2x1", 459.0, 2765.0, DOCS + "v5p"),
}


class MissingExtra(RuntimeError):
    """jax / libtpu are not installed."""


class OutOfMemory(RuntimeError):
    """The graph does not fit a device's HBM (the compiler's RESOURCE_EXHAUSTED, or peak > HBM)."""


# --- The TPU compiler -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One device of a TPU topology, with the share of its chip's peak figures."""

    name: str
    chip: Chip
    device: object  # a jax Device of the deviceless topology
    devices: int  # in the topology
    devices_per_chip: int
    hbm_bytes: int  # available to one device, as the compiler reports it


_targets: dict[str, Target] = {}


def target(tpu: str) -> Target:
    """The first device of `tpu`'s topology (cached: libtpu starts once per process)."""
    if tpu not in TPUS:
        raise ValueError(f"unknown TPU {tpu!r}: choose one of {', '.join(TPUS)}")
    if tpu not in _targets:
        if importlib.util.find_spec("jax") is None or importlib.util.find_spec("libtpu") is None:
            raise MissingExtra("kan-vit-tpu-plan needs jax and libtpu: pip install 'kan-vit[tpu-plan]'")
        # deviceless compilation touches no chip: other processes may load libtpu at the same time
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        from jax.experimental import topologies

        chip = TPUS[tpu]
        topology = topologies.get_topology_desc(platform="tpu", topology_name=chip.topology)
        device = topology.devices[0]
        per_chip = sum(1 for d in topology.devices if d.coords == device.coords)
        _targets[tpu] = Target(tpu, chip, device, len(topology.devices), per_chip, _available_hbm(device))
    return _targets[tpu]


def _available_hbm(device) -> int:
    """The HBM one device offers a program, as the compiler counts it: read from its
    RESOURCE_EXHAUSTED message for a probe that needs far more (deviceless devices report no
    memory stats)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    probe = jax.jit(lambda x: jnp.sort(jnp.outer(x, x), axis=0)[::2].sum())
    try:
        probe.lower(jax.ShapeDtypeStruct((1 << 19,), jnp.float32, sharding=SingleDeviceSharding(device))).compile()
    except Exception as error:
        found = re.search(r"available HBM \(([\d.]+)([KMGT])\)", str(error))
        if found:
            return int(float(found[1]) * 1024 ** " KMGT".index(found[2]))
    raise RuntimeError("the TPU compiler did not report its available HBM for a 1 TiB probe")


@dataclass(frozen=True)
class Measure:
    """One compiled executable on one device: the compiler's memory and cost figures."""

    flops: float
    bytes_accessed: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Live at once: inputs and outputs (an aliased buffer once) and the temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def measure(compiled) -> Measure:
    """A compiled executable's figures (jax's `Compiled` or the client's executable)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis() if hasattr(compiled, "memory_analysis") else None
    memory = memory or compiled.get_compiled_memory_stats()
    return Measure(
        flops=cost["flops"],
        bytes_accessed=cost["bytes accessed"],
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
    )


def compile_hlo(hlo_module: bytes, donated: list[int], tgt: Target) -> Measure:
    """Compile a serialized HloModuleProto for one device of the topology, with parameters
    `donated` marked as buffer donors (XLA then aliases each to an output of its shape)."""
    from jax._src.interpreters import mlir
    from jax._src.lib import xla_client
    from jax._src.lib.mlir import ir

    stablehlo = xla_client._xla.mlir.hlo_to_stablehlo(hlo_module)
    with mlir.make_ir_context():
        module = ir.Module.parse(stablehlo)
        main = next(op for op in module.body.operations if ir.StringAttr(op.attributes["sym_name"]).value == "main")
        inputs = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value).inputs
        attrs = list(main.attributes["arg_attrs"]) if "arg_attrs" in main.attributes else [None] * len(inputs)
        marked = []
        for index, attr in enumerate(attrs):
            entries = {named.name: named.attr for named in ir.DictAttr(attr)} if attr is not None else {}
            if index in donated:
                entries["jax.buffer_donor"] = ir.BoolAttr.get(True)
            marked.append(ir.DictAttr.get(entries))
        main.attributes["arg_attrs"] = ir.ArrayAttr.get(marked)
        return measure_within_hbm(
            lambda: tgt.device.client.compile(
                module,
                executable_devices=xla_client.DeviceList((tgt.device,)),
                compile_options=xla_client.CompileOptions(),
            ),
            tgt,
        )


def measure_within_hbm(compile_executable, tgt: Target) -> Measure:
    """`measure` of what `compile_executable()` compiles for one device of `tgt`; OutOfMemory when
    the compiler finds it too big (RESOURCE_EXHAUSTED) or its peak exceeds the device's HBM."""
    try:
        executable = compile_executable()
    except Exception as error:
        if "RESOURCE_EXHAUSTED" in str(error):
            raise OutOfMemory(str(error).splitlines()[0]) from None
        raise
    result = measure(executable)
    if result.peak_bytes > tgt.hbm_bytes:
        raise OutOfMemory(f"peak {result.peak_bytes / 2**30:.2f} GiB > {tgt.hbm_bytes / 2**30:.2f} GiB of HBM")
    return result


# --- The trainer's graphs, as torch_xla's sync builds them on PJRT CPU ---------------------------
#
# A step's graph is what torch_xla's sync writes: every live tensor with pending work (parameters,
# gradients and the buffers they are views of, optimizer state, metrics, the step's locals), and
# the buffer donors it marks. Only torch_xla sees all of those, so the trainer's real step runs in a
# child process on PJRT CPU with XLA's dump on; the dump of the step's graph is written when the CPU
# compilation starts, and the child is stopped then, before anything is compiled or run.

STEP_MARK = "kan-vit-tpu-plan: step"


def _trace(kind: str, cfg_json: str, batch: int) -> None:
    """The child: one steady training update (`kind` "train") or evaluation batch ("eval")."""
    import torch_xla

    from kan_vit.training import loop
    from kan_vit.training.backend import current
    from kan_vit.training.config import from_dict
    from kan_vit.training.model_factory import build_model

    cfg, device = from_dict(json.loads(cfg_json)), torch_xla.device()
    size = cfg.model.image_size
    images = lambda n: torch.zeros(n, 3, size, size, dtype=torch.uint8, device=device)  # noqa: E731
    skipped = lambda: torch.zeros(1, dtype=torch.int64, device=device)  # noqa: E731
    if kind == "train":
        state = loop.build_state(cfg, device)  # synced: parameters and moments are device data, as in a run
        micro = batch // cfg.optim.grad_accum  # then the loader's batches
        micro_batches = [
            (images(micro), torch.zeros(micro, cfg.model.labels, device=device), skipped())
            for _ in range(cfg.optim.grad_accum)
        ]
        torch_xla.sync()  # the loader's batches arrive as device data
        print(STEP_MARK, flush=True)
        loop.train_step(state, micro_batches, cfg)  # ends with the step's sync
    else:
        model = current().prepare(build_model(cfg).to(device)).eval()
        labels, sums = torch.zeros(batch, dtype=torch.int64, device=device), torch.zeros(loop.EVAL_SUMS, device=device)
        pixels, num_skipped = images(batch), skipped()
        torch_xla.sync()
        print(STEP_MARK, flush=True)
        with torch.no_grad():  # `evaluate`'s loop body after its first batch
            batch_sums = loop.eval_batch_sums(model, pixels, labels, num_skipped, cfg)
            sums = sums + batch_sums
            torch_xla.sync()


def step_graph(kind: str, cfg, batch: int, setup: str = "") -> tuple[bytes, list[int]]:
    """The serialized HloModuleProto of the trainer's steady training update ("train") or evaluation
    batch ("eval") at a per-device `batch`, and the parameters torch_xla's sync donates. `setup`:
    Python statements the child runs first (benchmarks/tpu_changes.py swaps a part of the step so)."""
    from kan_vit.training.config import to_dict

    with tempfile.TemporaryDirectory() as dump, tempfile.TemporaryFile("w+") as log:
        env = {**os.environ, "PJRT_DEVICE": "CPU", "PYTHONPATH": os.pathsep.join(sys.path)}
        env[XLA_TARGET] = "TPU"  # the KAN layer builds the graph a TPU runs, not XLA:CPU's
        env.pop("CPU_NUM_DEVICES", None)  # one device
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_as_proto"
        trace = "import sys; from kan_vit.tpu_plan import _trace; _trace(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
        code = f"{setup}\n{trace}"
        config = json.dumps(to_dict(cfg))
        child = subprocess.Popen(
            [sys.executable, "-c", code, kind, config, str(batch)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        try:

            def failure(what: str) -> RuntimeError:
                log.seek(0)
                return RuntimeError(f"tracing the {kind} step failed: {what}: {log.read()[-2000:]}")

            if not any(line.strip() == STEP_MARK for line in child.stdout):
                raise failure("the child stopped before the step")
            before = set(glob.glob(os.path.join(dump, "*before_optimizations.hlo.pb")))
            new_files = lambda: set(glob.glob(os.path.join(dump, "*before_optimizations.hlo.pb"))) - before  # noqa: E731
            path = _written(new_files, lambda: child.poll() is not None, failure)
        finally:
            child.kill()
            child.wait()
        with open(path, "rb") as file:
            module = _proto_field(file.read(), 1)  # HloProto.hlo_module
    return module, _buffer_donors(module)


def _written(new_files, exited, failure, poll: float = 0.2, still: int = 3) -> str:
    """The one new dump file once its size has stopped changing (XLA writes it in one go). A child
    that exits first failed within the step; a second graph means the step ran one before its sync
    (a host sync inside the update)."""
    sizes = []
    while True:
        time.sleep(poll)
        files = new_files()
        if len(files) > 1:
            raise failure("the update compiled more than one graph (something in it reads a device value)")
        if not files and exited():
            raise failure("the child exited within the step")
        if files:
            (path,) = files
            sizes.append(os.path.getsize(path))
            if len(sizes) > still and sizes[-1] > 0 and len(set(sizes[-still:])) == 1:
                return path


def _proto_fields(message: bytes):
    """(field number, value) of a serialized protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(message):
        key, i = _varint(message, i)
        if key & 7 == 0:
            value, i = _varint(message, i)
        elif key & 7 == 2:
            size, i = _varint(message, i)
            value, i = message[i : i + size], i + size
        else:
            raise ValueError(f"unexpected protobuf wire type {key & 7}")
        yield key >> 3, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _proto_field(message: bytes, number: int) -> bytes:
    return next(value for field, value in _proto_fields(message) if field == number)


def _buffer_donors(module: bytes) -> list[int]:
    """Parameter numbers in HloModuleProto.buffer_donor (field 18; entries: parameter_number = 1)."""
    donors = []
    for field, value in _proto_fields(module):
        if field == 18:
            for _, entry in _proto_fields(value):
                donors += [number for key, number in _proto_fields(entry) if key == 1]
    return sorted(donors)


# --- The plan ---------------------------------------------------------------------------------


def roofline(m: Measure, tgt: Target) -> tuple[float, str]:
    """A lower bound on the step's seconds on one device, and what sets it."""
    flops_s = tgt.chip.peak_tflops * 1e12 / tgt.devices_per_chip
    bytes_s = tgt.chip.hbm_gbps * 1e9 / tgt.devices_per_chip
    compute, memory = m.flops / flops_s, m.bytes_accessed / bytes_s
    return (compute, "compute") if compute >= memory else (memory, "HBM bandwidth")


def plan_step(kind: str, cfg, batch: int, tgt: Target) -> Measure:
    return compile_hlo(*step_graph(kind, cfg, batch), tgt)


def fits(kind: str, cfg, batch: int, tgt: Target) -> bool:
    try:
        plan_step(kind, cfg, batch, tgt)
    except OutOfMemory:
        return False
    return True


def max_batch(kind: str, cfg, tgt: Target, start: int, multiple: int, known: dict[int, bool] | None = None) -> int:
    """The largest per-device batch, a multiple of `multiple`, whose graph fits one device: from
    `start`, doubling up to the first that does not fit (or halving down to the first that does),
    then bisection on the compiler's answer. 0 when not even `multiple` fits. `known`: batches
    already compiled, whether each fits (each probe is a trace and a TPU compile: minutes); every
    probe's answer is added to it."""
    answers = {} if known is None else known

    def ok(batch: int) -> bool:
        if batch not in answers:
            answers[batch] = fits(kind, cfg, batch, tgt)
        return answers[batch]

    low = high = max(multiple, start // multiple * multiple)
    if ok(low):
        while ok(high := high * 2):
            low = high
    else:
        while (low := low // 2 // multiple * multiple) and not ok(low):
            high = low
    while high - low > multiple:
        middle = (low + high) // 2 // multiple * multiple
        low, high = (middle, high) if ok(middle) else (low, middle)
    return low


def _row(name: str, batch: int, m: Measure | None, tgt: Target, error: str | None = None) -> dict:
    row = {"step": name, "batch_per_device": batch, "fits": m is not None}
    if m is None:
        return {**row, "error": error}
    bound, by = roofline(m, tgt)
    return {**row, **dataclasses.asdict(m), "peak_bytes": m.peak_bytes, "bound_s": bound, "bound_by": by}


def _print_row(row: dict, tgt: Target) -> None:
    head = f"{row['step']}, {row['batch_per_device']} per device:"
    if not row["fits"]:
        print(f"{head} does not fit one device ({row['error']})")
        return
    gib = 2**30
    print(
        f"{head} fits\n"
        f"  peak HBM        {row['peak_bytes'] / gib:8.2f} GiB of {tgt.hbm_bytes / gib:.2f} "
        f"(arguments {row['argument_bytes'] / gib:.2f} + outputs {row['output_bytes'] / gib:.2f} "
        f"- aliased {row['alias_bytes'] / gib:.2f} + temporaries {row['temp_bytes'] / gib:.2f})\n"
        f"  FLOPs           {row['flops'] / 1e9:8.1f} GFLOP\n"
        f"  bytes accessed  {row['bytes_accessed'] / 1e9:8.2f} GB\n"
        f"  roofline bound  {row['bound_s'] * 1e3:8.2f} ms ({row['bound_by']})"
    )


DOC = """What the trainer's update and evaluation step need on one TPU device: peak HBM, FLOPs, bytes
accessed and a roofline bound, from XLA's TPU compiler, without a TPU.

    kan-vit-tpu-plan --config configs/kan_s16.yaml --tpu v3 --batch 128 [--max-batch]
"""


def main(argv=None) -> int:
    parser = launcher_parser(DOC, "the training config (model, optim, run.bf16)")
    parser.add_argument("--tpu", required=True, help=f"TPU generation: {', '.join(TPUS)}")
    parser.add_argument("--batch", type=int, help="training batch per device and update (default: the config's over 8)")
    parser.add_argument("--eval-batch", type=int, help="evaluation batch per device (default: the config's over 8)")
    parser.add_argument("--max-batch", action="store_true", help="also find the largest training batch that fits")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.set)
        tgt = target(args.tpu)
    except (ConfigError, ValueError, MissingExtra) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    batch = args.batch or max(1, cfg.data.train_batch_size // 8)
    eval_batch = args.eval_batch or max(1, cfg.data.valid_batch_size // 8)
    if batch % cfg.optim.grad_accum:
        print(f"error: --batch {batch} is not a multiple of optim.grad_accum={cfg.optim.grad_accum}", file=sys.stderr)
        return 2
    rows = []
    for kind, size in (("train", batch), ("eval", eval_batch)):
        name = f"{kind} step"
        try:
            rows.append(_row(name, size, plan_step(kind, cfg, size, tgt), tgt))
        except OutOfMemory as error:
            rows.append(_row(name, size, None, tgt, str(error)))
    result = {
        "tpu": args.tpu,
        "topology": tgt.chip.topology,
        "device": f"{tgt.device.device_kind}, {tgt.devices_per_chip} per chip",
        "hbm_bytes": tgt.hbm_bytes,
        "peak_tflops_per_device": tgt.chip.peak_tflops / tgt.devices_per_chip,
        "hbm_gbps_per_device": tgt.chip.hbm_gbps / tgt.devices_per_chip,
        "figures_source": tgt.chip.source,
        "steps": rows,
    }
    if args.max_batch:
        # TPU tiles are 8 rows: a batch per device that is not a multiple of 8 pads its matmuls
        known = {batch: rows[0]["fits"]}  # planned above
        result["max_train_batch"] = max_batch("train", cfg, tgt, batch, math.lcm(8, cfg.optim.grad_accum), known)
        result["train_batches_compiled"] = {str(size): fits for size, fits in sorted(known.items())}
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.config} on {args.tpu} ({result['device']}; per device {result['peak_tflops_per_device']:.1f} "
            f"TFLOP/s bf16, {result['hbm_gbps_per_device']:.0f} GB/s HBM: {tgt.chip.source})"
        )
        for row in rows:
            _print_row(row, tgt)
        if args.max_batch:
            compiled = result["train_batches_compiled"].items()
            probes = ", ".join(f"{size} {'fits' if fits else 'no'}" for size, fits in compiled)
            print(f"largest training batch per device that fits (a multiple of 8): {result['max_train_batch']}")
            print(f"  training batches compiled: {probes}")
    if not rows[0]["fits"] and not args.max_batch:
        print("the training step does not fit: lower --batch (--max-batch finds the largest)", file=sys.stderr)
    return 0 if all(row["fits"] for row in rows) else 1
