"""The package's layers call one way: every module imports only its own layer and the layers
below it (as each package's ``__init__`` docstring says), and a Ray scoring actor's modules
pull in neither the report nor scikit-learn."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ezmia

PACKAGE = Path(ezmia.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    path = PACKAGE.parent / dotted.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").exists()


def imported(path: Path) -> set[str]:
    """Every ezmia module ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ezmia"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ezmia"):
            for alias in node.names:
                member = f"{node.module}.{alias.name}"
                found.add(member if is_module(member) else node.module)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
LAYERS = (  # lowest first
    ("ezmia", "ezmia.errors"),
    ("ezmia.stats",),
    ("ezmia.data",),
    ("ezmia.config",),
    ("ezmia.plan",),
    ("ezmia.backends",),
    ("ezmia.engines",),
    ("ezmia.report",),
    ("ezmia.audit",),
    ("ezmia.fleet",),
    ("ezmia.cli", "ezmia.__main__", "ezmia.demo"),
)


def layer_of(module: str) -> int:
    """The index in ``LAYERS`` of the package or module holding ``module``."""
    for index, members in reversed(list(enumerate(LAYERS))):
        if any(module == m or module.startswith(m + ".") for m in members if m != "ezmia"):
            return index
    if module == "ezmia":
        return 0
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_its_layer_and_those_below(name):
    mine = layer_of(name)
    above = sorted(m for m in imported(MODULES[name]) if layer_of(m) > mine)
    assert not above, f"{name} (layer {LAYERS[mine][0]}) imports {above} from above it"


def test_every_module_belongs_to_a_layer():
    for name in MODULES:
        layer_of(name)  # raises for a module no layer claims


def test_a_scoring_actor_loads_neither_the_report_nor_scikit_learn():
    code = (
        "import sys; import ezmia.engines.pipeline, ezmia.engines.scoring, ezmia.backends.torch;"
        "print(sorted(m for m in sys.modules if m.startswith(('sklearn', 'ezmia.report', "
        "'ezmia.audit', 'ezmia.fleet', 'jinja2'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
