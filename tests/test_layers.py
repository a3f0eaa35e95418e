"""The package's layers: every import, at module level or inside a function, points down or
sideways, never up, and no set of modules imports itself in a circle."""

import ast
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "kan_vit"

# Lowest first. A module may import modules of its own layer or of lower ones.
LAYERS = {
    "kan_vit.utils": 0,
    "kan_vit.models": 1,
    "kan_vit.flax": 2,
    "kan_vit.training": 3,
    "kan_vit.analysis": 4,
    "kan_vit": 5,  # the package itself and the commands: kan_vit.commands, kan_vit.convert
}


def layer_of(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module} belongs to no layer")


def module_names(root: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules `module` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import name` imports pkg.name when that is a module, else pkg itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != module)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    names = module_names(root)
    return {m: imported_modules(m, p, set(names)) for m, p in names.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in graph.items()
        for t in targets
        if layer_of(t) > layer_of(m)
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                return stack[stack.index(t) :] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_every_module_belongs_to_a_layer():
    for module in module_names(PACKAGE_ROOT):
        layer_of(module)


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports(import_graph(PACKAGE_ROOT)) == []


def test_no_modules_import_one_another_in_a_circle():
    assert find_cycle(import_graph(PACKAGE_ROOT)) is None


def test_the_models_need_only_torch_timm_and_the_standard_library():
    allowed = {"torch", "timm", "safetensors", "torch_xla", "__future__"}  # safetensors comes with timm
    for module, path in module_names(PACKAGE_ROOT).items():
        if layer_of(module) > LAYERS["kan_vit.models"]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                assert top in allowed or top == "kan_vit" or top in sys.stdlib_module_names, f"{module} imports {top}"


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / "kan_vit" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root / "kan_vit"


@pytest.mark.parametrize(
    "files, expected",
    [
        # a deferred import inside a function is an import all the same
        (
            {
                "__init__.py": "",
                "models/__init__.py": "",
                "models/vit.py": "def load():\n    from kan_vit.training import checkpoint\n",
                "training/__init__.py": "",
                "training/checkpoint.py": "",
            },
            ["kan_vit.models.vit (layer 1) imports kan_vit.training.checkpoint (layer 3)"],
        ),
        # a relative import is resolved against its package
        (
            {
                "__init__.py": "",
                "flax/__init__.py": "",
                "flax/layout.py": "from ..analysis import plots\n",
                "analysis/__init__.py": "",
                "analysis/plots.py": "",
            },
            ["kan_vit.flax.layout (layer 2) imports kan_vit.analysis.plots (layer 4)"],
        ),
    ],
)
def test_the_checker_sees_upward_imports(tmp_path, files, expected):
    assert upward_imports(import_graph(_write_package(tmp_path, files))) == expected


def test_the_checker_sees_a_circle_within_a_layer(tmp_path):
    root = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "training/__init__.py": "",
            "training/backend.py": "from kan_vit.training.data import Loader\n",
            "training/data.py": "from . import config\n",
            "training/config.py": "def names():\n    import kan_vit.training.backend\n",
        },
    )
    assert find_cycle(import_graph(root)) == [
        "kan_vit.training.backend",
        "kan_vit.training.data",
        "kan_vit.training.config",
        "kan_vit.training.backend",
    ]
