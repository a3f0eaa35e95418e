import os

# torch_xla runs on the host CPU in tests (the real XLA path: lazy tensors, compilation).
os.environ.setdefault("PJRT_DEVICE", "CPU")
