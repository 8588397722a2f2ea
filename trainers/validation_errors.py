"""The dotted key a pydantic validation error is about, for every schema rayft validates.

Pydantic's error locations mix the path a user wrote (``data.train``) with the tags it
gives union members (``data.train.str``, ``prompt.list[int].0``, ``dataset.LogDataset.x``)
and, behind FastAPI, the request part (``body.stream``). :func:`error_key` keeps the path:
the job spec (``trainers.config``), the fine-tuning jobs body, the inference bodies and the
serve arguments all name the key to change the same way.
"""

from __future__ import annotations

import functools
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

# Tags pydantic-core gives union members that are not models: the bare scalar types, their
# constrained forms (``constrained-int`` for ``Field(ge=1)``), and the bracketed forms
# (``list[str]``, ``dict[str,float]``, ``literal['all-linear']``, ``function-after[f(), str]``).
# Whole-part matches only: a field named ``strategy`` or ``string_x`` is a key, not a tag.
_SCALAR_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "none", "any"})
_TAG = re.compile(
    r"constrained-[a-z]+"
    r"|(?:list|dict|set|frozenset|tuple|literal|is-instance|is-subclass|nullable"
    r"|function-(?:after|before|wrap|plain))\[.*\]",
    re.DOTALL,
)
HTTP_PARTS = ("body", "query")
"""Where FastAPI says an error is (its first location part); not part of the key."""


def is_type_tag(part: Any) -> bool:
    """True when ``part`` of an error location is one of the tags pydantic-core gives a
    union member that is not a model (``str``, ``list[str]``, ``function-after[...]``)."""
    return isinstance(part, str) and (part in _SCALAR_TAGS or _TAG.fullmatch(part) is not None)


def error_key(
    loc: Sequence[Any],
    model: type[BaseModel] | tuple[type[BaseModel], ...] = (),
    *,
    http: bool = False,
) -> str:
    """The dotted key of a pydantic error location, union tags dropped (``""`` for the root).

    Args:
        loc: The error's ``loc``.
        model: The model that was validated (or every model it may have been), so the
            tags of its model unions and tagged unions are dropped too, where they occur.
        http: The location comes from FastAPI: drop its leading ``body``/``query``.
    """
    parts = list(loc)
    if http and parts and parts[0] in HTTP_PARTS:
        parts = parts[1:]
    models = model if isinstance(model, tuple) else (model,)
    kept: list[Any] = []
    for part in parts:
        where = tuple(ITEM if isinstance(p, int) else p for p in kept)
        if is_type_tag(part) or any(part in union_tags(m).get(where, ()) for m in models):
            continue
        kept.append(part)
    return ".".join(str(p) for p in kept)


ITEM = "*"
"""A list item's place in :func:`union_tags` paths (its index in a location)."""


@functools.cache
def union_tags(model: type[BaseModel]) -> dict[tuple[str, ...], frozenset[str]]:
    """The location tags only ``model``'s schema knows, by the key path they follow.

    A model inside a union is tagged with its class name; a tagged (discriminated) union's
    members with their discriminator values. Paths hold field names, and :data:`ITEM` for
    an item of a list.
    """
    tags: dict[tuple[str, ...], set[str]] = {}
    _visit_model(model, (), tags, ())
    return {path: frozenset(found) for path, found in tags.items()}


Tags = dict[tuple[str, ...], set[str]]


def _visit_model(
    model: type[BaseModel], path: tuple[str, ...], tags: Tags, stack: tuple[type, ...]
) -> None:
    if model in stack:  # a recursive model: its tags are already where it first occurs
        return
    for name, field in model.model_fields.items():
        if isinstance(field.discriminator, str):
            tags.setdefault(path + (name,), set()).update(
                _discriminator_values(field.annotation, field.discriminator)
            )
        _visit(field.annotation, path + (name,), False, tags, stack + (model,))


def _visit(
    ann: Any, path: tuple[str, ...], in_union: bool, tags: Tags, stack: tuple[type, ...]
) -> None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        if in_union:
            tags.setdefault(path, set()).add(ann.__name__)
        _visit_model(ann, path, tags, stack)
        return
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        for meta in args[1:]:
            if isinstance(meta, FieldInfo) and isinstance(meta.discriminator, str):
                tags.setdefault(path, set()).update(
                    _discriminator_values(args[0], meta.discriminator)
                )
        _visit(args[0], path, in_union, tags, stack)
    elif origin is typing.Union or origin is types.UnionType:
        for arg in args:
            _visit(arg, path, True, tags, stack)
    else:
        # List, set and tuple items, dict keys and values: past a list index in the
        # location (a dict key is a name no schema knows, so tags past one stay generic).
        for arg in args:
            _visit(arg, path + (ITEM,), False, tags, stack)


def _discriminator_values(ann: Any, name: str) -> set[str]:
    """The values of discriminator ``name`` over the models of union ``ann``."""
    values: set[str] = set()
    for member in typing.get_args(ann):
        if typing.get_origin(member) is typing.Annotated:
            member = typing.get_args(member)[0]
        if (
            isinstance(member, type)
            and issubclass(member, BaseModel)
            and name in member.model_fields
        ):
            literal = member.model_fields[name].annotation
            values.update(str(v) for v in typing.get_args(literal))
        elif typing.get_args(member):
            values.update(_discriminator_values(member, name))
    return values


class ConfigError(ValueError):
    """A job spec that cannot run; ``problems`` holds ``(dotted_key, message)`` pairs.

    It lives here, beside :func:`error_key`, so that a module the spec's checks ask (an
    objective) can raise it without importing ``trainers.config``; that module re-exports it.
    """

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        head = f"invalid job spec {source}" if source else "invalid job spec"
        lines = [f"{head}: {len(problems)} problem(s)"]
        lines += [f"  {key or '<root>'}: {message}" for key, message in problems]
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Raised inside Ray workers and re-raised on the driver: rebuild from the pairs.
        return type(self), (self.problems, self.source)
