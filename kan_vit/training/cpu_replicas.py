"""Several XLA replicas on a CPU-only machine: `PJRT_DEVICE=CPU CPU_NUM_DEVICES=N` with N > 1.

There `xmp.spawn` runs the N replicas as threads of one process, one XLA:CPU device each, and
XLA:CPU runs their collectives in-process. Three things would make those collectives hang:
- every thread compiles its own copy of a step graph, the copies get different HLO module ids,
  and so their all-reduces wait in different rendezvous (XLA aborts after 10 s). Compiling under
  one process-wide lock lets the second thread find the first one's executable in the graph
  cache (whose key holds no device), so every replica runs the very same executable;
- XLA:CPU's thread pool needs at least one thread per replica, or a replica waiting in a
  collective can starve the others;
- with input buffers donated to outputs (torch_xla's default), launching a graph blocks until it
  has run, so the lock above would be held while the graph waits for the other replicas.
None of this applies on TPU, where each replica is a process with its own chip: nothing here runs there.
Replicas as threads also share the host RNGs and Python globals; the trainer keeps no
per-replica state in them (`kan_vit.training.seeding` serialises every use of the host RNGs).
"""

from __future__ import annotations

import os
import threading

import torch_xla

_COMPILE_LOCK = threading.Lock()


def threaded_replicas(device_type: str, num_replicas: int) -> bool:
    """Whether xmp.spawn will run these replicas as threads of one process."""
    return device_type == "CPU" and num_replicas > 1


def prepare_spawn(num_replicas: int) -> None:
    """In the launching process, before xmp.spawn (the replicas' process inherits the variables)."""
    if int(os.environ.get("XLA_THREAD_POOL_SIZE", "0")) < num_replicas:
        os.environ["XLA_THREAD_POOL_SIZE"] = str(max(num_replicas, os.cpu_count() or 1))
    # A graph that donates its input buffers to its outputs (parameters updated in place) makes
    # the step marker wait for the graph's execution before it returns, inside the compile lock:
    # the other replicas could then never launch their part of its collectives.
    os.environ["XLA_ENABLE_PARAM_ALIASING"] = "0"


def serialize_compilations() -> None:
    """In every replica thread, before its first graph: idempotent and thread-safe."""
    with _COMPILE_LOCK:
        step_marker = torch_xla._XLAC._xla_step_marker
        if getattr(step_marker, "serialized", False):
            return
        xlac = torch_xla._XLAC

        def serialized_step_marker(device="", devices=(), wait=True, reset_scope=True):
            real = xlac._xla_real_devices([device or xlac._xla_get_default_device()])
            with _COMPILE_LOCK:  # compile (or find in the cache) and enqueue; never wait under it
                step_marker(device, devices, wait=False, reset_scope=reset_scope)
            # Wait for the graph here, where the wait releases the GIL: the graph may sit in a
            # collective until the other replicas launch theirs, and torch_xla's next calls (it
            # drops the graph's collective token) would block on it while holding the GIL.
            xlac._xla_wait_device_ops(real)

        serialized_step_marker.serialized = True
        xlac._xla_step_marker = serialized_step_marker
