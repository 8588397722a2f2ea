"""rayft's modules import each other without a cycle, and its packages in one direction.

The graph is built with ``ast`` from every module of the package, imports inside functions
included: an import inside a function is for a heavy library, never a way around a cycle.
Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "trainers", "raytune", "serving")
# Which packages each package may import (``cluster -> raytune -> trainers <- serving``,
# ``cluster -> serving``); a package may always import itself.
MAY_IMPORT = {
    "trainers": set(),
    "raytune": {"trainers"},
    "serving": {"trainers"},
    "cluster": {"trainers", "raytune", "serving"},
}
ACROSS = {
    ("rayft.trainers.rollout", "rayft.serving.engine"),
    ("rayft.trainers.rollout", "rayft.serving.vllm_engine"),
}
"""The imports against the layering: a GRPO run's rollout engines are the serving
engines themselves (batched decoding on the policy, natively or on vLLM), started inside
the training run."""


def module_files() -> dict[str, Path]:
    files = {"rayft": ROOT / "__init__.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = f"rayft.{package}" if path.stem == "__init__" else f"rayft.{package}.{path.stem}"
            files[name] = path
    return files


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def imported_modules(path: Path, modules: set[str]) -> dict[str, int]:
    """Every rayft module ``path`` imports at run time, with the line of the first import."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_nodes(tree)
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name in modules:
                found.setdefault(name, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    files = module_files()
    names = set(files)
    return {
        name: {t: line for t, line in imported_modules(path, names).items() if t != name}
        for name, path in files.items()
    }


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = _pop_component(stack, on_stack, node)
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def _pop_component(stack: list[str], on_stack: set[str], root: str) -> list[str]:
    component: list[str] = []
    while not component or component[-1] != root:
        component.append(stack.pop())
        on_stack.discard(component[-1])
    return component


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    files = module_files()
    edges = [
        f"  {source} -> {target} ({files[source].relative_to(ROOT)}:{line})"
        for source in cycle
        for target, line in graph[source].items()
        if target in cycle
    ]
    return "\n".join([f"import cycle among {', '.join(cycle)}:", *edges])


def test_no_import_cycle_among_rayft_modules():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(_describe(c, graph) for c in cycles)


def test_packages_import_in_one_direction():
    wrong = []
    for source, targets in import_graph().items():
        if source == "rayft":
            continue
        package = source.split(".")[1]
        for target, line in targets.items():
            if target == "rayft":
                # The root re-exports the API of rayft.cluster: only the control plane's
                # scripts (the quick start) may use it.
                if package != "cluster":
                    wrong.append(f"{source} imports the package root (line {line})")
                continue
            other = target.split(".")[1]
            if (source, target) in ACROSS:
                continue
            if other != package and other not in MAY_IMPORT[package]:
                wrong.append(f"{source} -> {target} (line {line})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_checks_can_fail():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []
    # A function-level import counts; one under TYPE_CHECKING does not.
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from rayft.trainers.loop import Worker\n"
        "def f():\n    from rayft.trainers.data import read_rows\n"
    )
    path = ROOT / "tests" / "unit" / ".import_graph_probe.py"
    try:
        path.write_text(source)
        found = imported_modules(path, {"rayft.trainers.loop", "rayft.trainers.data"})
    finally:
        path.unlink()
    assert found == {"rayft.trainers.data": 5}
