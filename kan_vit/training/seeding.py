"""Deterministic use of the host's global RNGs (python `random`, numpy, the torch CPU generator).

timm's model init and timm/torchvision augmentations draw from these process-wide generators.
Every such use in the project runs inside `seeded_host_rngs`, which seeds them, runs the body
and restores them, all under one lock: replicas that are threads of one process (XLA on CPU)
would otherwise interleave their draws, and nothing else in the training loop draws from them.
"""

from __future__ import annotations

import random
import threading
from contextlib import contextmanager

import numpy as np
import torch

_HOST_RNG_LOCK = threading.RLock()


def derive_seed(*words: int) -> int:
    """One 32-bit seed from a tuple of integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(words).generate_state(1)[0])


@contextmanager
def seeded_host_rngs(seed: int):
    """Seed python/numpy/torch-CPU global RNGs for the body, restore them after."""
    with _HOST_RNG_LOCK:
        state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
            torch.set_rng_state(state[2])
