"""The pure parts of ``serving.http_guard``: JSON nesting counted in chunks, Host names."""

from __future__ import annotations

import json

import pytest

from rayft.serving.http_guard import JsonDepth, bind_host_names, host_allow_list


def _too_deep(text: str, limit: int, chunk: int) -> bool:
    depth = JsonDepth(limit)
    raw = text.encode()
    return any(depth.feed(raw[i : i + chunk]) for i in range(0, len(raw), chunk))


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_nesting_is_counted_across_chunk_boundaries_and_never_inside_strings(chunk):
    nested = json.dumps({"a": [[[{"b": [1]}]]]})  # 6 levels
    assert not _too_deep(nested, 6, chunk)
    assert _too_deep(nested, 5, chunk)
    # Brackets, escaped quotes and backslashes inside strings are text.
    tricky = json.dumps({"s": '[[[[{{{{ \\" \\\\" ]]]]', "t": ["\\", '"[[[']})
    assert json.loads(tricky)["t"] == ["\\", '"[[[']
    assert not _too_deep(tricky, 2, chunk)
    assert _too_deep(tricky, 1, chunk)


def test_host_names_drop_ports_and_brackets_and_always_include_loopback():
    allowed = host_allow_list(["Api.Example:8443", "[fd00::1]", "*"])
    assert {"127.0.0.1", "localhost", "::1", "api.example", "fd00::1", "*"} == allowed
    assert bind_host_names("127.0.0.1") == [] and bind_host_names("localhost") == []
    assert bind_host_names("10.0.0.7") == ["10.0.0.7"]
    assert all(name not in ("127.0.0.1", "::1") for name in bind_host_names("0.0.0.0"))
