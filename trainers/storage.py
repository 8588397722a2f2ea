"""Where rayft keeps things: one root for models, runs, adapters and sweeps.

The root is ``storage:`` from the job spec, else ``$RAYFT_HOME``, else ``./.rayft``.
A root may be a local/shared directory or a pyarrow-filesystem URI (``s3://``, ``gs://``).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = ".rayft"


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def home(storage: str | None = None) -> str:
    """The artifact root as an absolute local path or a URI."""
    root = storage or os.environ.get("RAYFT_HOME") or DEFAULT_HOME
    if root.startswith("file://"):
        root = root[len("file://") :]
    if is_uri(root):
        return root.rstrip("/")
    return str(Path(root).expanduser().resolve())


def local_home(storage: str | None = None) -> Path:
    """The artifact root as a local path; URIs are mirrored under ``$RAYFT_HOME``."""
    root = home(storage)
    if is_uri(root):
        return Path(home(None))
    return Path(root)


def subdir(kind: str, storage: str | None = None) -> str:
    root = home(storage)
    return f"{root}/{kind}"


def models_dir(storage: str | None = None) -> Path:
    # Base models are always cached on local disk: every node converts or copies its own.
    path = Path(os.environ.get("RAYFT_MODEL_CACHE") or (local_home(storage) / "models"))
    return path


def runs_dir(storage: str | None = None) -> str:
    return subdir("runs", storage)


def adapters_dir(storage: str | None = None) -> Path:
    return local_home(storage) / "adapters"


def sweeps_dir(storage: str | None = None) -> Path:
    return local_home(storage) / "sweeps"
