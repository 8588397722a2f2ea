"""Rows of a JSON lines or JSON array file, read one at a time.

An evaluation reads at most its row limit from a dataset, so neither reader loads a
file whole: JSON lines are read a line at a time, and a JSON array is decoded element
by element from a sliding window of the file. Either refuses a row over
``MAX_ROW_BYTES`` (a line, or an array element) instead of buffering it, and names
the line or row index of every problem (not UTF-8, not JSON, nested too deeply).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from rayft.serving.errors import BadRequest

MAX_ROW_BYTES = 4 * 1024 * 1024
CHUNK = 64 * 1024
_SPACE = " \t\r\n\ufeff"
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def iter_rows(path: Path) -> Iterator[Any]:
    """The rows of ``path``: a JSON array for ``.json`` files that hold one, else JSON lines.

    Raises:
        BadRequest: A row that is not UTF-8, not JSON, nested too deeply or over
            ``MAX_ROW_BYTES``, naming the file and the line or row index.
    """
    with open(path, "rb") as handle:
        head = handle.read(64).decode("utf-8", errors="replace").lstrip(_SPACE)
        handle.seek(0)
        if path.suffix == ".json" and head.startswith("["):
            yield from iter_json_array(handle, path.name)
        else:
            yield from iter_json_lines(handle, path.name)


def iter_json_lines(handle: IO[bytes], name: str) -> Iterator[Any]:
    """One JSON value per non-blank line of ``handle``."""
    number = 0
    while raw := handle.readline(MAX_ROW_BYTES + 1):
        number += 1
        if len(raw) > MAX_ROW_BYTES:
            raise _bad(name, f"{number}", f"the line is over {MAX_ROW_BYTES} bytes")
        try:
            line = raw.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError as err:
            raise _bad(name, f"{number}", f"not UTF-8 text ({err.reason})") from None
        if line.strip():
            yield _loads(line, name, f"{number}")


def _loads(text: str, name: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _bad(name, where, f"not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise _bad(name, where, "JSON nested too deeply") from None


def _bad(name: str, where: str, problem: str) -> BadRequest:
    return BadRequest(f"{name}:{where}: {problem}", code="invalid_row", param="dataset")


class _Window:
    """The undecoded rest of a file as text, refilled from the file on demand."""

    def __init__(self, handle: IO[bytes], name: str) -> None:
        self.handle = handle
        self.name = name
        # Bytes that are not UTF-8 become lone surrogates here and are refused in the row
        # that holds them, so the rows before them (and up to a limit) read normally.
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.text = ""
        self.pos = 0
        self.eof = False
        self.row = 0

    def more(self) -> bool:
        """Read more of the file (as much again as is buffered); False at its end."""
        if self.eof:
            return False
        pending = len(self.text) - self.pos
        if pending > MAX_ROW_BYTES:
            raise _bad(self.name, f"row index {self.row}", f"the row is over {MAX_ROW_BYTES} bytes")
        raw = self.handle.read(max(CHUNK, pending))
        self.eof = not raw
        fresh = self.decoder.decode(raw, final=self.eof)
        self.text = self.text[self.pos :] + fresh
        self.pos = 0
        return not self.eof or bool(fresh)

    def peek(self) -> str:
        """The next character that is not white space ("" at the end of the file)."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _SPACE:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def expect(self, char: str, what: str) -> None:
        if self.peek() != char:
            raise _bad(self.name, f"row index {self.row}", f"expected {what}")
        self.pos += 1


def iter_json_array(handle: IO[bytes], name: str) -> Iterator[Any]:
    """The elements of the JSON array in ``handle``, decoded one at a time."""
    decoder = json.JSONDecoder()
    window = _Window(handle, name)
    window.expect("[", "'[' (a .json dataset is an array of row objects)")
    while True:
        if window.peek() == "]":
            window.pos += 1
            if window.peek():
                raise _bad(name, f"row index {window.row}", "data after the array's end")
            return
        if window.row:
            window.expect(",", "',' or ']' after a row")
        if window.peek() != "{":
            raise _bad(name, f"row index {window.row}", "a row is a JSON object")
        yield _next_row(decoder, window)


def _next_row(decoder: json.JSONDecoder, window: _Window) -> Any:
    """Decode the row object at the window's position, reading more of the file as needed."""
    where = f"row index {window.row}"
    while True:
        try:
            row, end = decoder.raw_decode(window.text, window.pos)
            break
        except json.JSONDecodeError as err:
            if not window.more():  # the whole rest of the file does not decode
                raise _bad(window.name, where, f"not valid JSON ({err.msg})") from None
        except RecursionError:
            raise _bad(window.name, where, "JSON nested too deeply") from None
    if end - window.pos > MAX_ROW_BYTES:
        raise _bad(window.name, where, f"the row is over {MAX_ROW_BYTES} bytes")
    if _NOT_UTF8.search(window.text, window.pos, end):
        raise _bad(window.name, where, "not UTF-8 text")
    window.pos = end
    window.row += 1
    return row
