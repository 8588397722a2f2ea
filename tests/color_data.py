"""The "name a <color> thing" chats that the tests train on (imported as ``color_data``;
``tests/`` is on ``sys.path`` because ``tests/conftest.py`` lives there)."""

from __future__ import annotations

import json
from pathlib import Path

COLOR_THINGS = [
    ("red", "apple"),
    ("blue", "sky"),
    ("green", "grass"),
    ("white", "snow"),
    ("black", "night"),
    ("yellow", "sun"),
    ("gray", "stone"),
    ("pink", "rose"),
]


def color_chat_rows(
    count: int, colors: int = len(COLOR_THINGS), first: int = 0, offset: int = 0
) -> list[dict]:
    """``count`` chat rows over ``colors`` colours starting at colour ``first`` of
    ``COLOR_THINGS``; row ``i`` uses pair ``(offset + i) % colors``."""
    pairs = COLOR_THINGS[first : first + colors]
    rows = []
    for i in range(offset, offset + count):
        color, thing = pairs[i % len(pairs)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"name a {color} thing"},
                    {"role": "assistant", "content": f"the {thing} is {color}"},
                ]
            }
        )
    return rows


def write_color_chats(
    path: Path, rows: int, colors: int = len(COLOR_THINGS), first: int = 0
) -> Path:
    """A chat JSONL file of ``rows`` "name a <color> thing" exchanges over ``colors`` colours,
    starting at colour ``first`` of ``COLOR_THINGS``."""
    with open(path, "w") as handle:
        for row in color_chat_rows(rows, colors=colors, first=first):
            handle.write(json.dumps(row) + "\n")
    return path
