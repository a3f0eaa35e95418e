"""Commands and environments for tests that run the accelerate path in real CPU processes."""

import os
import sys


def without_torch_xla_env(tmp_path) -> dict:
    """The environment of a process in which `import torch_xla` fails (a package of that name that
    raises ImportError comes first on PYTHONPATH): what a GPU user without torch_xla has."""
    blocker = tmp_path / "no_torch_xla"
    (blocker / "torch_xla").mkdir(parents=True, exist_ok=True)
    (blocker / "torch_xla" / "__init__.py").write_text("raise ImportError('torch_xla is not installed here')\n")
    path = os.pathsep.join([str(blocker)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return dict(os.environ, PYTHONPATH=path)


def torchrun(num_processes: int, script: str, *args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node=N script args...` (CPU processes over gloo)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={num_processes}",
        script,
        *args,
    ]
