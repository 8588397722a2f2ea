"""The one tiny job-spec factory of the suite (imported as ``specs``; ``tests/`` is on
``sys.path``). Light: it imports nothing of rayft, so every tier may use it."""

from __future__ import annotations

from pathlib import Path


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in key by key (nested mappings merge too)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def tiny_spec(train: Path | str, **sections: object) -> dict:
    """A job spec (a plain dict) for the builtin ``tiny-llama`` training on ``train``.

    The spec is ``{"model": {"name": "tiny-llama"}, "data": {"train": train}}`` with each
    keyword merged in as a top-level section: mappings merge key by key, so
    ``data={"max_seq_len": 64}`` keeps the train file and ``model={"dtype": "float32"}``
    keeps the model's name.
    """
    base = {"model": {"name": "tiny-llama"}, "data": {"train": str(train)}}
    return merged(base, sections)
