"""The package's metadata and its split into core dependencies and extras."""

import importlib
import subprocess
import sys
from pathlib import Path

import tomllib
from numpy_reference import random_params

import kan_vit

ROOT = Path(__file__).resolve().parent.parent
TRAINING_ONLY = ("torch_xla", "webdataset", "wandb", "accelerate", "sklearn", "tqdm", "matplotlib")

# Makes importing the training-only modules fail as if they were not installed. The finder
# claims them (with no origin, so probes such as torch._dynamo's find_spec skip them) and its
# loader raises, so every `import` of them fails.
CORE_ONLY_SCRIPT = """
import importlib.abc, importlib.util, sys

BLOCKED = set(sys.argv[1].split(","))


class NotInstalled(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name.split(".")[0] in BLOCKED else None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (blocked)", name=spec.name)

    def exec_module(self, module):
        raise AssertionError("unreachable")


sys.meta_path.insert(0, NotInstalled())
try:
    import torch_xla
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the import blocker does not work")

import timm, torch
import kan_vit
from kan_vit.convert import main

model = timm.create_model("kan_vit_small_patch16_224", depth=1, num_classes=3)
assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 3)
assert main([sys.argv[2], sys.argv[3]]) == 0
assert main([sys.argv[3], sys.argv[4]]) == 0
print("core ok:", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_model_and_converter_need_only_the_core_dependencies(tmp_path):
    from flax.serialization import msgpack_serialize

    src = tmp_path / "tiny.msgpack"
    src.write_bytes(msgpack_serialize(random_params(seed=1)))
    paths = [str(src), str(tmp_path / "tiny.safetensors"), str(tmp_path / "back.msgpack")]
    result = subprocess.run(
        [sys.executable, "-c", CORE_ONLY_SCRIPT, ",".join(TRAINING_ONLY), *paths],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "core ok: []" in result.stdout
    assert (tmp_path / "back.msgpack").read_bytes() == src.read_bytes()


def test_core_dependencies_leave_training_to_the_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {req.split("=")[0].split(">")[0].split("<")[0].strip() for req in project["dependencies"]}
    assert core == {"torch", "timm", "numpy", "msgpack", "safetensors", "pyyaml"}
    extras = project["optional-dependencies"]
    assert "torch_xla==2.9.0" in extras["xla"] and "torch==2.9.0" in extras["xla"]
    assert "accelerate" in extras["gpu"]
    assert {"webdataset>=0.2.86", "wandb", "scikit-learn"} <= set(extras["train"])


def test_version_is_written_once():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "kan_vit.__version__"' in pyproject
    assert kan_vit.__version__ not in pyproject
    assert not (ROOT / "setup.py").exists()


def test_sources_cite_only_documents_in_the_repository():
    """Comments point at docs/original.md, never at outside documents or issue numbers."""
    import re

    outside = re.compile("original" + r"-semantics|\u00a7\d|\bissue\s*#?\d+", re.IGNORECASE)
    sources = [p for folder in ("kan_vit", "tests", "launch", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    cited = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sources
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if outside.search(line)
    ]
    assert not cited
    for path in sources:
        for section in re.findall(r'docs/original\.md, "([^"]+)"', path.read_text()):
            assert f"\n## {section}\n" in (ROOT / "docs" / "original.md").read_text(), (path, section)


def test_every_installed_command_points_at_a_function():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts, "pyproject.toml declares no commands"
    for command, target in scripts.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function, None)), f"{command} -> {target}"
