"""The package's structure: a one-way pipeline with no import cycle, and methods as registered units."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tncompress"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every tncompress module ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("tncompress"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("tncompress"):
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = {d for d in _imports(path, name) if d in modules and d != name}
        # importing a.b.c also runs a and a.b; only the package __init__ files matter here
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    """Counting imports inside functions too: a deferred import is still a cycle in the design."""
    cycle = find_cycle(import_graph())
    assert cycle is None, " → ".join(cycle or [])


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("step, later", [
    ("tncompress.recipe", ["tncompress.planner", "tncompress.budget", "tncompress.apply", "tncompress.compress"]),
    ("tncompress.planner", ["tncompress.budget", "tncompress.apply", "tncompress.compress"]),
    ("tncompress.budget", ["tncompress.apply", "tncompress.compress"]),
    ("tncompress.apply", ["tncompress.compress", "tncompress.checkpoint"]),
])
def test_each_pipeline_step_imports_only_earlier_steps(step, later):
    graph = import_graph()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    assert not reachable(step) & set(later), f"{step} reaches {sorted(reachable(step) & set(later))}"


def test_methods_do_not_import_the_pipeline():
    graph = import_graph()
    pipeline = {"tncompress.recipe", "tncompress.planner", "tncompress.budget", "tncompress.apply",
                "tncompress.compress", "tncompress.cli"}
    for name, deps in graph.items():
        if name.startswith("tncompress.methods") or name.startswith("tncompress.layers"):
            assert not deps & pipeline, f"{name} imports {sorted(deps & pipeline)}"
