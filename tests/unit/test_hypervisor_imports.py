"""The modules of each hypervisor driver package form a DAG: no import cycle among them, no
import hidden in a function or behind TYPE_CHECKING to dodge one, and the drivers do not
import each other (shared code lives in ``drsite.imagefile`` / ``drsite.fsutil``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import drsite.hypervisors

ROOT = Path(drsite.hypervisors.__file__).parent
PACKAGES = ("file", "qemu", "testing")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported drsite module, hidden) for every import in ``path``; hidden = inside a
    function or an ``if TYPE_CHECKING`` block. ``from pkg import name`` counts as
    ``pkg.name`` (a submodule or the package itself)."""
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, hidden: bool) -> None:
        for child in ast.iter_child_nodes(node):
            in_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            type_only = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            h = hidden or in_function or type_only
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.startswith("drsite"):
                    out.append((child.module, h))
                    out.extend((f"{child.module}.{a.name}", h) for a in child.names)
            elif isinstance(child, ast.Import):
                out.extend((a.name, h) for a in child.names if a.name.startswith("drsite"))
            visit(child, h)

    visit(ast.parse(path.read_text()), False)
    return out


@pytest.mark.parametrize("pkg", PACKAGES)
def test_driver_package_is_a_dag(pkg: str) -> None:
    prefix = f"drsite.hypervisors.{pkg}"
    modules = {p.stem: p for p in (ROOT / pkg).glob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for mod, hidden in _imports(path):
            if mod == prefix and name != "__init__":
                deps.add("__init__")  # `from drsite.hypervisors.file import x` runs __init__
            elif mod.startswith(prefix + "."):
                target = mod[len(prefix) + 1:].split(".")[0]
                if target in modules and target != name:
                    assert not hidden, f"{pkg}/{name}.py hides its import of {target}"
                    deps.add(target)
            for other in PACKAGES:
                assert other == pkg or not mod.startswith(f"drsite.hypervisors.{other}"), \
                    f"{pkg}/{name}.py imports the {other} package"
        edges[name] = deps
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> None:
        assert node not in path, f"import cycle: {' -> '.join([*path, node])}"
        if node in done:
            return
        for dep in sorted(edges[node]):
            walk(dep, [*path, node])
        done.add(node)

    for name in sorted(edges):
        walk(name, [])
