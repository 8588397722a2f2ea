"""The objective seam stays clean: the data pipeline, the driver, the loop and the methods name
no objective, and the spec's checks, which ask every objective, load no torch.

An objective is one module and one line in ``OBJECTIVES`` (``trainers/objectives.py``); what
differs between objectives is asked of its hooks (``trainers/objective.py``). A name of an
objective in one of the modules below (an identifier, a string, a comment) is a branch the
next objective would have to edit.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OBJECTIVE_FREE = (
    "trainers/data.py",
    "trainers/driver.py",
    "trainers/loop.py",
    "trainers/methods.py",
)
OBJECTIVE_NAME = re.compile(r"sft|dpo|classif", re.IGNORECASE)
HEAVY = ("torch", "numpy", "transformers", "peft", "deepspeed", "ray", "sklearn", "pyarrow")


def objective_mentions(text: str, name: str) -> list[str]:
    """``name:line: text`` of every line of ``text`` that names an objective."""
    return [
        f"{name}:{number}: {line.strip()}"
        for number, line in enumerate(text.splitlines(), start=1)
        if OBJECTIVE_NAME.search(line)
    ]


def test_the_pipeline_driver_loop_and_methods_name_no_objective():
    found = [
        mention
        for relpath in OBJECTIVE_FREE
        for mention in objective_mentions((ROOT / relpath).read_text(), relpath)
    ]
    assert not found, (
        "these lines name an objective; ask the objective's hook instead "
        "(trainers/objective.py):\n" + "\n".join(found)
    )


def test_the_mention_check_can_fail():
    source = 'x = 1\nif spec.objective == "dpo":\n    pass  # Classification too\n'
    assert objective_mentions(source, "probe.py") == [
        'probe.py:2: if spec.objective == "dpo":',
        "probe.py:3: pass  # Classification too",
    ]
    assert objective_mentions("scan_source(path, fmt, rows)\n", "probe.py") == []


def _module_path(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != "rayft" or len(parts) < 3:
        return None
    path = ROOT.joinpath(*parts[1:]).with_suffix(".py")
    return path if path.is_file() else None


def load_time_imports(path: Path) -> list[str]:
    """Modules ``path`` imports when it is imported: its top-level imports, those under
    ``if TYPE_CHECKING:`` and inside functions left out."""
    names: list[str] = []
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def heavy_imports_on_load(start: str) -> list[str]:
    """``module -> heavy library`` for every heavy library importing ``start`` loads."""
    seen: set[str] = set()
    todo = [start]
    heavy: list[str] = []
    while todo:
        module = todo.pop()
        path = _module_path(module)
        if path is None or module in seen:
            continue
        seen.add(module)
        for name in load_time_imports(path):
            if name.split(".")[0] in HEAVY:
                heavy.append(f"{module} -> {name}")
            todo.append(name)
    return sorted(set(heavy))


def test_the_spec_checks_ask_every_objective_without_loading_torch():
    # `rayft validate` and every JobSpec validation import trainers.config, which asks the
    # objectives' hooks through trainers.objectives: that chain stays light.
    assert heavy_imports_on_load("rayft.trainers.config") == []
    assert "rayft.trainers.loss -> torch" in heavy_imports_on_load("rayft.trainers.loss")
