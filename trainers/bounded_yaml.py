"""YAML for job specs, loaded within bounds: size, nesting, alias expansion, number length.

PyYAML's ``safe_load`` builds nothing dangerous, but a few hundred bytes of nested
aliases describe a document of millions of nodes (each alias shares its anchor's
object, so loading is quick; everything that walks the result, validation or
``rayft validate --print``, is not), a deep ``[[[[...`` exhausts the recursion limit,
and an integer of thousands of digits trips Python's int-parsing limit with a
``ValueError`` no YAML caller expects. ``load`` refuses each of these up front, with
a ``SpecBoundsError`` that names the dotted key (or the line) at fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

MAX_BYTES = 1024 * 1024
"""Largest spec document; a job spec is a few kilobytes."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and lists (a spec's deepest key is about six levels)."""
MAX_NODES = 100_000
"""Most nodes the document may hold with every alias expanded."""
MAX_DIGITS = 100
"""Longest integer, in digits."""

_INT = re.compile(r"[-+]?[0-9_]+")


class SpecBoundsError(ValueError):
    """A YAML document past one of the bounds; ``key`` is the dotted key (or ``""``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


@dataclass(frozen=True)
class _LongNumber:
    """An integer too long to parse, kept as text until its key is known."""

    digits: int


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that tracks each composed node's expanded size and depth."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        alias = self.check_event(yaml.AliasEvent)
        if alias:
            event = self.peek_event()
            anchored = self.anchors.get(event.anchor)
            if anchored is not None and id(anchored) not in self._sizes:
                raise SpecBoundsError(
                    "", f"line {event.start_mark.line + 1}: alias *{event.anchor} refers to itself"
                )
        self._depth += 1
        if self._depth > MAX_DEPTH:
            mark = self.peek_event().start_mark
            raise SpecBoundsError(
                "", f"line {mark.line + 1}: nested deeper than {MAX_DEPTH} levels"
            )
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if not alias:
            self._sizes[id(node)] = self._size(node)
        return node

    def _size(self, node: Any) -> int:
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            return 1
        size = 1 + sum(self._sizes.get(id(child), 1) for child in children)
        if size > MAX_NODES:
            raise SpecBoundsError(
                "",
                f"line {node.start_mark.line + 1}: the document expands to more than "
                f"{MAX_NODES} nodes (aliases included); write the spec out plainly",
            )
        return size


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    digits = sum(c.isdigit() for c in node.value)
    if _INT.fullmatch(node.value) and digits > MAX_DIGITS:
        return _LongNumber(digits)
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def load(text: str | bytes) -> Any:
    """The YAML document ``text``, refused past any of the module's bounds.

    Raises:
        SpecBoundsError: A bound is passed (the key or line is named).
        yaml.YAMLError: The text is not YAML.
    """
    if len(text) > MAX_BYTES:
        raise SpecBoundsError("", f"the document is {len(text)} bytes; at most {MAX_BYTES}")
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    loader = _BoundedLoader(text)
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    _check_numbers(data, "")
    return data


def _check_numbers(value: Any, key: str) -> None:
    # Depth is bounded and aliases are sized, so this walk is short.
    if isinstance(value, _LongNumber):
        raise SpecBoundsError(
            key, f"a number of {value.digits} digits; numbers have at most {MAX_DIGITS}"
        )
    if isinstance(value, dict):
        for k, v in value.items():
            _check_numbers(k, key)
            _check_numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_numbers(v, f"{key}.{i}" if key else str(i))
