"""Where the trainer runs: torch_xla (TPU chips, XLA:CPU in tests) or accelerate (GPUs, CPU processes).

kan_vit.training.loop holds the one training loop; everything that differs between the two runtimes is a
method here: the device, the collectives, gradient reduction, autocast, sync points, the device
RNG, the device data loader and how processes start. Only the backend in use imports its
runtime, so a GPU user needs no torch_xla and a TPU user no accelerate.

    XlaBackend          one process per XLA device (xmp.spawn); the loop's graphs are compiled,
                        so nothing reads a device value inside a step (log values are read in step
                        closures) and gradients are all-reduced explicitly after the micro-batches.
    AccelerateBackend   one process per GPU (or CPU process) started by `accelerate launch` or
                        torchrun; DDP (accelerator.prepare) averages gradients during backward.
"""

from __future__ import annotations

import contextlib
import os

import torch

from kan_vit.training import preemption
from kan_vit.training.config import ACCELERATE, XLA


class XlaBackend:
    name = XLA

    def __init__(self):
        # Imported here, not at module level: the accelerate path must run without torch_xla.
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr

        self._torch_xla, self._xm, self._xr = torch_xla, xm, xr

    # --- Processes ---
    def expected_world_size(self) -> int:
        """The number of replicas `spawn` will run, without touching the XLA runtime (which must
        not start before spawning): all chips of all hosts on TPU, CPU_NUM_DEVICES on CPU."""
        device = self._xr.device_type()
        if device == "TPU":
            from torch_xla._internal import tpu

            return tpu.num_expected_global_devices()
        if device == "CPU":
            return int(os.environ.get("CPU_NUM_DEVICES", "1"))
        raise RuntimeError(f"PJRT_DEVICE={device}: this trainer supports TPU (and CPU for tests)")

    def spawn(self, fn, args: tuple, stop_on_signal: bool = False) -> None:
        """fn(index, *args) on every device of this host through xmp.spawn (one process per TPU chip;
        on CPU one process whose replicas are threads); `fn` must be a module-level function.
        `stop_on_signal`: SIGTERM / SIGINT reach the replicas as a note (`kan_vit.training.preemption`)."""
        import torch_xla.distributed.xla_multiprocessing as xmp

        from kan_vit.training import cpu_replicas

        if cpu_replicas.threaded_replicas(self._xr.device_type(), self.expected_world_size()):
            cpu_replicas.prepare_spawn(self.expected_world_size())
        if stop_on_signal:
            preemption.install_forwarding()  # a signal to this launcher reaches the replicas
        installer = preemption.InstallInWorker() if stop_on_signal else None
        xmp.spawn(_run_xla_replica, args=(installer, fn, *args))

    @staticmethod
    def initialize_compile_cache(directory: str, index: int) -> None:
        """Before any computation; one directory per process."""
        import torch_xla.runtime as xr

        xr.initialize_cache(os.path.join(directory, str(index)))

    @property
    def device(self) -> torch.device:
        return self._torch_xla.device()  # per replica thread on CPU: not cached

    @property
    def world_size(self) -> int:
        return self._xr.world_size()

    @property
    def rank(self) -> int:
        return self._xr.global_ordinal()

    @property
    def local_process_count(self) -> int:
        return self._xr.local_process_count()

    # --- Model and step ---
    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """timm's attention in its explicit form (q k^T, softmax, @ v, as the original): on XLA,
        scaled_dot_product_attention lowers to the same ops plus a check of every attention row for
        all-masked scores; on the TPU compiler's measure the DeiT-S/16 update then moves 1.105x the
        bytes and needs 1.069x the peak memory (benchmarks/tpu_changes.py, docs/performance.md)."""
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
        return model

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def micro_batch(self, model: torch.nn.Module, last: bool):
        """Context of one micro-batch's forward and backward: gradients are reduced after all of them."""
        return contextlib.nullcontext()

    def autocast(self, bf16: bool):
        return torch.autocast("xla", dtype=torch.bfloat16, enabled=bf16)

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Mean of the gradients over replicas (no-op on one). torch_xla's in-place all-reduce leaves a
        gradient unchanged when it aliases part of another lazy tensor (the KAN coefficients' gradient
        is a reshaped slice of a GEMM output), and autograd does not mark such a gradient as a view:
        every gradient is re-bound to a clone first, which costs nothing in the compiled graph."""
        if self.world_size == 1:
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad = param.grad.clone()
        self._xm.reduce_gradients(optimizer)

    def after_step(self, fn, args: tuple) -> None:
        """fn(*args) once the step's graph ran: reading its tensors then is a copy, not a sync."""
        self._xm.add_step_closure(fn, args=args)

    def sync(self) -> None:
        """End the graph traced so far and run it."""
        self._torch_xla.sync()

    def compile_count(self) -> int:
        """Graphs XLA compiled in this process so far (all replica threads on CPU)."""
        import torch_xla.debug.metrics as met

        compile_time = met.metric_data("CompileTime")
        return compile_time[0] if compile_time else 0

    def device_loader(self, loader):
        """uint8 batches moved to the device by a background thread, ahead of the step."""
        import torch_xla.distributed.parallel_loader as pl

        from kan_vit.training.data import LazyStart

        return pl.MpDeviceLoader(LazyStart(loader), self.device)

    # --- Collectives ---
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._xm.all_reduce(self._xm.REDUCE_SUM, tensor) if self.world_size > 1 else tensor

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every replica's `values` (ints in [0, 2**63)), in replica order. A collective that syncs:
        every replica must call it at the same point."""
        local = torch.tensor(values, dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            # pin_layout=False: the pinned-layout all-gather pads by ordinal, a graph that differs per replica
            local = self._xm.all_gather(local, pin_layout=False)
        self.sync()  # read the result only after its graph ran
        return local.cpu().view(self.world_size, len(values)).tolist()

    # --- Device RNG (dropout, drop-path): the only RNG the loop draws from ---
    def seed_rng(self, seed: int) -> None:
        self._xm.set_rng_state(seed, self.device)

    def gather_rng_states(self) -> list[dict]:
        """Every replica's device RNG state, in replica order (a collective)."""
        seed = int(self._xm.get_rng_state(self.device))
        halves = self.all_gather_ints([seed >> 32, seed & 0xFFFFFFFF])  # a uint64 does not fit an int64
        return [{XLA: high << 32 | low} for high, low in halves]

    def set_rng_state(self, state: dict) -> None:
        self._xm.set_rng_state(state[XLA], self.device)


def _run_xla_replica(index: int, _installed, fn, *args) -> None:
    """`_installed`: what `preemption.InstallInWorker` became on its way here (None), or None."""
    import torch_xla.runtime as xr

    from kan_vit.training import cpu_replicas

    if cpu_replicas.threaded_replicas(xr.device_type(), xr.world_size()):
        cpu_replicas.serialize_compilations()
    fn(index, *args)


class AccelerateBackend:
    """This process's share of an `accelerate launch` / torchrun job (or a single process)."""

    name = ACCELERATE

    def __init__(self, bf16: bool = False, compile: bool = False):
        # With torch_xla installed, accelerate would otherwise pick its XLA mode (each process alone);
        # it reads this variable once, when it is first imported.
        os.environ["USE_TORCH_XLA"] = "0"
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        # cpu=True without CUDA: accelerate makes CPU processes a process group (gloo) only when told so
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision="bf16" if bf16 else "no",
            dynamo_backend="inductor" if compile else "no",
        )
        if self.accelerator.distributed_type == DistributedType.XLA:
            raise RuntimeError(
                "accelerate was imported before USE_TORCH_XLA=0 was set: import kan_vit.training.backend first"
            )

    def expected_world_size(self) -> int:
        return self.accelerator.num_processes

    def spawn(self, fn, args: tuple, stop_on_signal: bool = False) -> None:
        """fn(rank, *args) in this process (`accelerate launch` / torchrun started one per device),
        then the process group ends: gloo threads still running when the interpreter exits can
        abort a process whose work succeeded (SIGABRT). `stop_on_signal`: as XlaBackend's."""
        if stop_on_signal:
            preemption.install()
        try:
            fn(self.rank, *args)
        finally:
            self.accelerator.end_training()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def local_process_count(self) -> int:
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun and accelerate launch

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP-wrapped (several processes) and compiled when run.compile; the optimizer keeps the
        same parameters, so it is created from the plain model."""
        return self.accelerator.prepare_model(model)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model, keep_fp32_wrapper=False, keep_torch_compile=False)

    def micro_batch(self, model: torch.nn.Module, last: bool):
        """DDP all-reduces the gradients in the last micro-batch's backward only."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def autocast(self, bf16: bool):
        return self.accelerator.autocast() if bf16 else contextlib.nullcontext()

    def reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """DDP averaged them during backward."""

    def after_step(self, fn, args: tuple) -> None:
        fn(*args)

    def sync(self) -> None:
        """Eager execution: nothing to end."""

    def compile_count(self) -> int | None:
        """Graphs torch.compile (run.compile) built so far; None when the model runs eagerly."""
        if self.accelerator.state.dynamo_plugin.backend.value.lower() == "no":
            return None
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]

    def device_loader(self, loader):
        from kan_vit.training.data import DeviceLoader

        return DeviceLoader(loader, self.device)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        local = torch.tensor([values], dtype=torch.int64, device=self.device)
        return self.accelerator.gather(local).cpu().tolist()

    def seed_rng(self, seed: int) -> None:
        torch.manual_seed(seed)  # the CPU generator and every CUDA device's

    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def gather_rng_states(self) -> list[dict]:
        from accelerate.utils import gather_object

        return gather_object([self._rng_state()])

    def set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)


def rng_backend(state: dict) -> str:
    """The backend that wrote a checkpoint's per-process RNG entry."""
    return XLA if XLA in state else ACCELERATE


_current = None


def current():
    """The backend of this process: XLA unless a launcher chose another with `use`."""
    global _current
    if _current is None:
        _current = XlaBackend()
    return _current


def use(backend) -> None:
    global _current
    _current = backend
