"""The package reads as the pipeline: no import circles, and no module imports a floor above its own.

The import graph is built from the source with ``ast`` (nothing is executed), counting
imports inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
PACKAGE = SRC / "chattune"

# Floors, lowest first: a module may import its own floor and those below it.
FLOORS = [
    {"chattune", "chattune.errors", "chattune.config", "chattune.files"},
    {"chattune.models"},
    {"chattune.data"},
    {"chattune.methods"},
    {"chattune.training"},
    {"chattune.engine"},
    {"chattune.generate"},
    {"chattune.evaluate"},
    {"chattune.compare"},
    {"chattune.serve"},
    {"chattune.api", "chattune.config_reference"},
    {"chattune.cli", "chattune.demo", "chattune.__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The chattune modules ``path`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("chattune"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chattune") and not node.level:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out.update(subs or {node.module})
    return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def floor_of(module: str) -> int:
    for level, roots in enumerate(FLOORS):
        if any(module == r or module.startswith(r + ".") for r in roots if r != "chattune") or module in roots:
            return level
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in {__file__}")


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_graph_sees_lazy_and_aliased_imports():
    edges = graph()
    assert "chattune.training.loop" in edges["chattune.cli"] or "chattune.api" in edges["chattune.cli"]
    assert "chattune.engine.cache" in edges["chattune.engine.core"]  # `from chattune.engine import cache as kv`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_floor():
    upward = [f"{m} (floor {floor_of(m)}) imports {d} (floor {floor_of(d)})"
              for m, deps in sorted(graph().items()) for d in sorted(deps) if floor_of(d) > floor_of(m)]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("limit", [400])
def test_modules_stay_readable(limit):
    long = [f"{name}: {len(p.read_text().splitlines())} lines" for name, p in sorted(modules().items())
            if len(p.read_text().splitlines()) > limit * 1.1]
    assert not long, "split by responsibility: " + ", ".join(long)
