import os

# torch_xla runs on the host CPU in tests (the real XLA path: lazy tensors, compilation).
os.environ.setdefault("PJRT_DEVICE", "CPU")


def pytest_configure(config):
    # The autograd engine sizes its per-device queues at its first backward pass: the XLA device
    # must exist before any CPU backward, or a later XLA backward hits an internal assert.
    # (Tests that need SPMD or xmp.spawn run them in subprocesses.)
    import torch_xla

    torch_xla.device()
