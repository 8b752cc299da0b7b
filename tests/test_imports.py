"""The package has no import cycle: every module of ``cmp_hf`` imports, and the graph of its imports (read with
``ast``, function-level imports included, so that a cycle hidden behind a lazy import counts too) is acyclic.
Imports under ``if TYPE_CHECKING:`` are left out: they are for type checkers and never run."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import cmp_hf

PACKAGE_ROOT = Path(cmp_hf.__file__).resolve().parent
# the evaluate module's Space entry point: importing it launches a Gradio widget (gradio is not a dependency)
ENTRY_POINTS = {"cmp_hf.evaluation.calibration.app"}


def module_names(root: Path) -> dict[str, Path]:
    """{dotted name: file} of every module of the package at ``root`` (a package is named by its __init__)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports: ``from a import b`` is an edge to ``a.b`` when that is a
    module, to ``a`` otherwise; imports of other packages are left out."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only = {id(node) for block in ast.walk(tree) if _is_type_checking_block(block) for node in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in known else base)
    return {target for target in targets if target in known and target != name}


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        isinstance(test, ast.Name)
        and test.id == "TYPE_CHECKING"
        or isinstance(test, ast.Attribute)
        and test.attr == "TYPE_CHECKING"
    )


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_package_has_no_import_cycle():
    cycle = find_cycle(import_graph(PACKAGE_ROOT))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_an_injected_cycle_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import A\n")
    (package / "a.py").write_text("from .sub import helper\nA = 1\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "helper.py").write_text("def f():\n    from ..a import A  # a lazy import still closes it\n")
    (package / "b.py").write_text("import pkg.a\n")
    assert find_cycle(import_graph(package)) == ["pkg.a", "pkg.sub.helper", "pkg.a"]
    (package / "sub" / "helper.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(package)) is None
    # an import for type checkers only never runs: no cycle
    (package / "sub" / "helper.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import A\n"
    )
    assert find_cycle(import_graph(package)) is None


@pytest.mark.parametrize("name", sorted(set(module_names(PACKAGE_ROOT)) - ENTRY_POINTS))
def test_every_module_imports(name):
    importlib.import_module(name)
