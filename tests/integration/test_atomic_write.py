"""Atomic writes survive a writer process that dies mid-write."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rayft.trainers.storage import atomic_write


def test_atomic_write_never_leaves_a_torn_file(tmp_path: Path) -> None:
    target = tmp_path / "d" / "record.json"
    atomic_write(target, '{"a": 1}')
    # A writer killed mid-write leaves the previous file whole and at most a stray temp.
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "import rayft.trainers.storage as s\n"
        "real = os.replace\n"
        "os.replace = lambda *a: os._exit(9)\n"
        f"s.atomic_write(Path({str(target)!r}), b'{{\"a\": 2' * 1000)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert done.returncode == 9
    assert json.loads(target.read_text()) == {"a": 1}
    atomic_write(target, b'{"a": 3}')
    assert json.loads(target.read_text()) == {"a": 3}
