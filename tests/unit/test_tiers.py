"""The unit tier stays fast: its modules import none of Ray's distributed libraries or
DeepSpeed, start no training run, no Ray and no subprocess. Read from the source with ``ast``,
imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

UNIT = Path(__file__).parent

FORBIDDEN_MODULES = ("ray.train", "ray.serve", "ray.tune", "deepspeed", "subprocess")
# Calls that start a training run (by any qualified name), a Ray cluster or another process.
TRAINING_ENTRY_POINTS = ("run_training", "TorchTrainer")
FORBIDDEN_CALLS = ("ray.init", "subprocess", "os.system", "os.popen", "os.fork", "os.spawnv")


def _is_under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a name or an attribute chain, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level or not node.module:
        return []
    # ``from ray import tune`` imports ray.tune as surely as ``import ray.tune``.
    return [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]


def tier_problems(source: str, filename: str) -> list[str]:
    """``file:line: what`` for every forbidden import or call in one module's source."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            bad = [name for name in _imported(node) if _is_under(name, FORBIDDEN_MODULES)]
            if bad:
                found.append(f"{filename}:{node.lineno}: imports {bad[0]}")
        elif isinstance(node, ast.Call) and (name := _dotted(node.func)):
            if _is_under(name, FORBIDDEN_CALLS) or name.split(".")[-1] in TRAINING_ENTRY_POINTS:
                found.append(f"{filename}:{node.lineno}: calls {name}")
    return sorted(set(found), key=lambda line: int(line.split(":")[1]))


def test_unit_modules_start_no_ray_deepspeed_training_or_subprocess():
    found = [
        problem
        for path in sorted(UNIT.glob("*.py"))
        for problem in tier_problems(path.read_text(), f"tests/unit/{path.name}")
    ]
    assert found == [], "move these tests to tests/integration:\n" + "\n".join(found)


def test_every_forbidden_form_is_found_with_its_line():
    source = "\n".join(
        [
            "import ray",
            "import ray.tune",
            "from ray.train import ScalingConfig",
            "from ray import serve",
            "def f():",
            "    import deepspeed.ops",
            "    from subprocess import run",
            "    ray.init()",
            "    trainers.driver.run_training(spec)",
            "    TorchTrainer(loop)",
            "    subprocess.Popen(['x'])",
            "    os.system('x')",
            "import rayft.raytune.search_space",
            "ray.is_initialized()",
        ]
    )
    assert tier_problems(source, "t.py") == [
        "t.py:2: imports ray.tune",
        "t.py:3: imports ray.train",
        "t.py:4: imports ray.serve",
        "t.py:6: imports deepspeed.ops",
        "t.py:7: imports subprocess",
        "t.py:8: calls ray.init",
        "t.py:9: calls trainers.driver.run_training",
        "t.py:10: calls TorchTrainer",
        "t.py:11: calls subprocess.Popen",
        "t.py:12: calls os.system",
    ]


def test_every_test_module_has_a_name_of_its_own():
    # pytest imports test modules by their base name (rootdir-relative "prepend" mode), so
    # two tiers' modules of one name stop the whole suite at collection.
    seen: dict[str, list[str]] = {}
    for path in sorted(UNIT.parent.rglob("test_*.py")):
        seen.setdefault(path.name, []).append(str(path.relative_to(UNIT.parent)))
    clashes = {name: where for name, where in seen.items() if len(where) > 1}
    assert not clashes, f"rename one of each: {clashes}"
