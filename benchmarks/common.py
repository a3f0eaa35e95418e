"""Shared benchmark helpers: machine info, median wall time, bytes saved for backward."""

import os
import platform
import statistics
import time

import torch


def machine_info() -> str:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}"
    )


def median_ms(fns: dict, reps: int = 10, warmup: int = 3) -> dict:
    """Median wall time (ms) of each `fns[name]()` over `reps` runs after `warmup` runs.

    The functions run round-robin, one call each per repetition, so that load from other
    processes on a shared machine hits every side alike and the ratios stay meaningful.
    """
    times = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def saved_activation_bytes(fn, exclude=()) -> int:
    """Bytes autograd saves for backward while `fn()` runs: distinct storages, `exclude` tensors
    (the parameters) not counted. What a forward keeps alive until its backward."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    del out
    return sum(seen.values())
