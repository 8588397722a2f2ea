"""The private APIs rayft relies on exist in the installed Ray, DeepSpeed and torch.

Every ``(module, attribute)`` of ``trainers.compat.PRIVATE_SYMBOLS`` is looked up in the
installed dependency's source: importing ``deepspeed`` or Ray Train's internals costs
seconds each, so the module's file is found with ``importlib.util.find_spec`` on the top
package (which imports nothing) and parsed. Modules without a Python source (compiled,
or a namespace such as ``torch.ops.aten``) are imported instead.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
from functools import cache
from pathlib import Path

import pytest

from rayft.trainers import compat

PACKAGE_ROOT = Path(compat.__file__).resolve().parents[1]
PACKAGES = ("cluster", "trainers", "raytune", "serving")


def _version(top: str) -> str:
    try:
        return f"{top} {importlib.metadata.version(top)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{top} (version unknown)"


def _source_file(module: str) -> Path | None:
    """The ``.py`` file of ``module`` in the installed package, without importing it."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(next(iter(spec.submodule_search_locations))).joinpath(*rest)
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _module_level(body: list[ast.stmt]):
    """Statements at module level, including those under ``if``/``try``/``with``."""
    for node in body:
        yield node
        if isinstance(node, ast.If | ast.Try | ast.With):
            for block in ("body", "orelse", "finalbody"):
                yield from _module_level(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _module_level(handler.body)


def _names(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.Import | ast.ImportFrom):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return {t.id for t in targets if isinstance(t, ast.Name)}


def _class_has(cls: ast.ClassDef, member: str) -> bool:
    """A method, a class-level field, or an attribute some method sets on ``self``."""
    if any(member in _names(node) for node in cls.body):
        return True
    for node in ast.walk(cls):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        for t in targets:
            if isinstance(t, ast.Attribute) and t.attr == member:
                if isinstance(t.value, ast.Name) and t.value.id == "self":
                    return True
    return False


def _function_reads(fn: ast.FunctionDef | ast.AsyncFunctionDef, member: str) -> bool:
    """A parameter named ``member``, or ``member`` as a string key (``kwargs.pop("...")``)."""
    args = fn.args
    params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
    if member in params:
        return True
    return any(isinstance(n, ast.Constant) and n.value == member for n in ast.walk(fn))


def defined_in_source(path: Path, attribute: str) -> bool:
    """Whether the source at ``path`` defines ``attribute`` (``Name`` or ``Owner.member``)."""
    owner, _, member = attribute.partition(".")
    found = [n for n in _module_level(_tree(path).body) if owner in _names(n)]
    if not member:
        return bool(found)
    for node in found:
        if isinstance(node, ast.ClassDef) and _class_has(node, member):
            return True
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _function_reads(
            node, member
        ):
            return True
    return False


def defined_by_import(module: str, attribute: str) -> bool:
    """Whether importing ``module`` (walked attribute by attribute) yields ``attribute``."""
    try:  # a real module; else an object reached from its package (torch.ops.aten)
        value, names = importlib.import_module(module), attribute.split(".")
    except ImportError:
        top, *rest = module.split(".")
        value, names = importlib.import_module(top), [*rest, *attribute.split(".")]
    for name in names:
        if name in _message_fields(value):
            return True  # a protobuf message's field: nothing further to walk
        if not hasattr(value, name):
            return False
        value = getattr(value, name)
    return True


def _message_fields(value: object) -> set[str]:
    """A protobuf message class's field names (not class attributes under upb)."""
    descriptor = getattr(value, "DESCRIPTOR", None)
    return set(getattr(descriptor, "fields_by_name", None) or ())


def symbol_exists(module: str, attribute: str) -> bool:
    path = _source_file(module)
    # Generated protobuf modules build their classes from a serialized descriptor.
    if path is not None and not path.name.endswith("_pb2.py"):
        return defined_in_source(path, attribute)
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return False
    return defined_by_import(module, attribute)


@pytest.mark.parametrize(
    ("module", "attribute"),
    compat.PRIVATE_SYMBOLS,
    ids=[f"{m}:{a}" for m, a in compat.PRIVATE_SYMBOLS],
)
def test_the_private_symbol_exists_in_the_installed_dependency(module: str, attribute: str):
    where = _source_file(module) or "(imported)"
    assert symbol_exists(module, attribute), (
        f"{module}.{attribute} is gone from {_version(module.split('.')[0])} ({where}); "
        "rayft.trainers.compat relies on it: adapt the compat entry that names it, or pin "
        "the dependency below this version in pyproject.toml"
    )


def test_the_lookup_fails_for_a_symbol_that_is_not_there():
    # The table-driven test above would pass vacuously if the lookup always said yes.
    engine = "deepspeed.runtime.engine"
    assert symbol_exists(engine, "DeepSpeedEngine._zero3_consolidated_16bit_state_dict")
    assert not symbol_exists(engine, "DeepSpeedEngine._no_such_gather")
    assert not symbol_exists(engine, "NoSuchEngine")
    assert not symbol_exists("ray._private.worker", "init._no_such_keyword")
    assert not symbol_exists("ray.train.v2._internal.no_such_module", "Anything")
    pb2 = "ray.core.generated.gcs_pb2"
    assert symbol_exists(pb2, "PlacementGroupTableData.is_detached")
    assert not symbol_exists(pb2, "PlacementGroupTableData.no_such_field")
    assert not symbol_exists("no_such_dependency.module", "Anything")
    assert symbol_exists("ray.tune.result_grid", "ResultGrid._experiment_analysis")
    assert not symbol_exists("ray.tune.result_grid", "ResultGrid._no_such_field")


def test_no_module_outside_compat_imports_a_private_name_of_a_dependency():
    offenders = []
    for package in PACKAGES:
        for path in sorted((PACKAGE_ROOT / package).rglob("*.py")):
            if path.name == "compat.py" and package == "trainers":
                continue
            for node in ast.walk(_tree(path)):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module + "." + a.name for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                for name in names:
                    parts = name.split(".")
                    if parts[0] != "rayft" and any(p.startswith("_") for p in parts[1:]):
                        offenders.append(f"{path.relative_to(PACKAGE_ROOT)}:{node.lineno} {name}")
    assert not offenders, "private imports outside trainers/compat.py: " + ", ".join(offenders)


def test_the_head_node_resource_is_the_one_ray_defines():
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    assert compat.HEAD_NODE_RESOURCE == HEAD_NODE_RESOURCE_NAME
    assert compat.is_head_node({"CPU": 2.0, HEAD_NODE_RESOURCE_NAME: 1.0})
    assert not compat.is_head_node({"CPU": 2.0, "node:10.0.0.2": 1.0})


def test_the_scheduler_reports_the_learning_rate_set_on_it():
    import torch

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert scheduler.get_last_lr() == [0.05]
    compat.set_scheduler_last_lr(scheduler, [0.02])
    assert scheduler.get_last_lr() == [0.02]


def test_every_attention_kernel_of_this_torch_is_found():
    import torch

    ops = compat.sdpa_kernel_ops()
    assert len(ops) == len(compat.SDPA_KERNELS)
    assert torch.ops.aten._scaled_dot_product_attention_math.default in ops


def test_the_metrics_port_option_is_a_ray_init_keyword():
    assert compat.metrics_export_port_option(9123) == {"_metrics_export_port": 9123}
