"""The storage root is resolved at rayft's edges only; everything inside is handed a ``StorageRoot``.

A ``storage:`` string (or ``None``, meaning ``$RAYFT_HOME``) becomes a ``StorageRoot`` where it
enters: the CLI, the Python API, the HTTP app's engine and key store, the start of a run or a
sweep, a Ray worker that receives a location. The check is built with ``ast`` from every module
of the package: a call to ``StorageRoot.resolve`` anywhere else fails it, naming the file, line
and function, so a library function takes ``root: StorageRoot`` instead of re-resolving.
"""

from __future__ import annotations

import ast
from pathlib import Path

from test_import_graph import ROOT, module_files

EDGES = {
    # A run's driver and its in-cluster start, each given a JobSpec whose storage: is a string.
    ("rayft.trainers.driver", "run_training"),
    ("rayft.trainers.runs", "start_run"),
    # A sweep's start, and each Tune trial (a worker given the sweep's location).
    ("rayft.raytune.sweep", "run_sweep"),
    ("rayft.raytune.sweep", "train_trial"),
    # A GRPO run's grading actor: a model grader's registry arrives as the spec's location.
    ("rayft.trainers.rollout", "local_judge"),
    # The HTTP app: its engine (built in each Serve replica) and its key store.
    ("rayft.serving.engine", "ModelEngine.__init__"),
    ("rayft.serving.auth", "KeyStore.__init__"),
    ("rayft.serving.client", "serve_and_ask"),
    # The Python API: arguments from users and the storage a submitted job recorded.
    ("rayft.cluster.api", "_train_spec"),
    ("rayft.cluster.api", "train"),
    ("rayft.cluster.api", "_sweep_spec"),
    ("rayft.cluster.api", "tune"),
    ("rayft.cluster.api", "RunHandle.events"),
    ("rayft.cluster.api", "load_adapter"),
    # The CLI, and a submitted job's entry point (reading its own spec file).
    ("rayft.cluster.serve_cli", "print_monitoring"),
    ("rayft.cluster.serve_cli", "cmd_eval"),
    ("rayft.cluster.jobs_cli", "_run_from_storage"),
    ("rayft.cluster.models_cli", "cmd_models"),
    ("rayft.cluster.jobs", "job_status"),
    ("rayft.cluster.job_start", "_ship_data_to_storage"),
}
"""Where ``StorageRoot.resolve`` may be called: (module, function) pairs."""


def resolve_calls(path: Path) -> list[tuple[str, int]]:
    """``(function, line)`` of every ``StorageRoot.resolve(...)`` call in ``path``."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, [*scope, child.name])
                continue
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr == "resolve"
                and isinstance(child.func.value, ast.Name)
                and child.func.value.id == "StorageRoot"
            ):
                found.append((".".join(scope) or "<module>", child.lineno))
            visit(child, scope)

    visit(ast.parse(path.read_text(), str(path)), [])
    return found


def test_the_storage_root_is_resolved_only_at_the_edges():
    inside = []
    used = set()
    for module, path in module_files().items():
        if module == "rayft.trainers.storage":
            continue  # where StorageRoot.resolve is defined (and unpickles a root)
        for function, line in resolve_calls(path):
            if (module, function) in EDGES:
                used.add((module, function))
                continue
            inside.append(f"  {path.relative_to(ROOT)}:{line} in {function}")
    assert not inside, (
        "StorageRoot.resolve called inside rayft; take a `root: StorageRoot` argument "
        "from the caller (or add the function to EDGES if it is where a root enters):\n"
        + "\n".join(inside)
    )
    assert used == EDGES, f"EDGES lists functions that no longer resolve: {sorted(EDGES - used)}"


def test_the_check_finds_calls_in_nested_functions_and_methods(tmp_path: Path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f(storage):\n"
        "    def inner():\n"
        "        return StorageRoot.resolve(storage)\n"
        "class C:\n"
        "    def m(self):\n"
        "        self.root = StorageRoot.resolve()\n"
        "x = (StorageRoot.resolve, ('loc',))\n"
    )
    assert resolve_calls(probe) == [("f.inner", 3), ("C.m", 6)]
