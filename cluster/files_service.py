"""Uploaded training files: OpenAI's ``/v1/files`` objects kept in the rayft root.

A file's bytes live at ``datasets/<file-id><suffix>`` (``StorageRoot.files``), next to the
registry's datasets, so every node, a restarted server and ``/v1/evaluations``
(``dataset: <file-id>``) find it; its record (the OpenAI file object) lives at
``datasets/.files/<file-id>.json``. Both are written atomically, and under a URI root
they are uploaded there, which is the source of truth.

A file is checked when it is uploaded with the checks ``rayft train`` makes
(``trainers.data.scan_source``: JSON per line, one row format throughout, required
fields), so a bad row is refused at once with its line number.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from rayft.serving.errors import BadRequest, NotFound
from rayft.trainers.storage import (
    DATASETS_DIR,
    FILE_RECORDS_DIR,
    StorageRoot,
    dataset_relpath,
    file_record_relpath,
)

FILES_DIR = DATASETS_DIR
RECORDS_DIR = FILE_RECORDS_DIR
UPLOAD_SUFFIXES = (".jsonl", ".json")
PURPOSE = "fine-tune"
MAX_FILENAME_CHARS = 256


def new_file_id() -> str:
    """A fresh file id in OpenAI's shape, ``file-<24 hex digits>``."""
    return f"file-{secrets.token_hex(12)}"


def upload_suffix(filename: str) -> str:
    """The stored suffix of an uploaded file: its own ``.jsonl``/``.json``, else ``.jsonl``.

    Raises:
        BadRequest: The name says the file is of another kind (csv, parquet, ...).
    """
    suffix = Path(filename).suffix.lower()
    if suffix in UPLOAD_SUFFIXES:
        return suffix
    if suffix in (".csv", ".parquet", ".txt", ".zip", ".gz"):
        raise BadRequest(
            f"{filename!r}: fine-tuning files are JSON lines (.jsonl, one row per line) or a "
            "JSON array (.json); convert the file and upload it again",
            code="invalid_file_format",
            param="file",
        )
    return ".jsonl"


def _checked_id(file_id: str) -> str:
    # Ids become file names: only the shape new_file_id makes is looked up.
    if not (file_id.startswith("file-") and file_id[5:].isalnum() and len(file_id) <= 64):
        raise NotFound(f"no file {file_id!r}", code="file_not_found", param="file_id")
    return file_id


def list_names(root: StorageRoot, relpath: str, suffix: str) -> list[str]:
    """Names (without ``suffix``) of the files directly under ``relpath`` ending in ``suffix``.

    Under a URI root the URI is listed, so records written by any node are seen.
    """
    target = root.remote(relpath)
    if target is None:
        folder = root.path(relpath)
        if not folder.is_dir():
            return []
        names = [p.name for p in folder.iterdir() if p.is_file()]
    else:
        import pyarrow.fs as pafs

        fs, path = target
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        names = [i.base_name for i in infos if i.type == pafs.FileType.File]
    return sorted(n[: -len(suffix)] for n in names if n.endswith(suffix) and not n.startswith("."))


def read_json(root: StorageRoot, relpath: str) -> dict[str, Any] | None:
    """A JSON object stored at ``relpath`` (``None`` when absent or torn)."""
    raw = root.read(relpath)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def page(
    items: list[dict[str, Any]], after: str | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """OpenAI's cursor pagination over ``items`` (already in list order).

    Returns:
        The up to ``limit`` items after the one whose id is ``after``, and whether more follow.

    Raises:
        BadRequest: ``limit`` outside 1..10000.
    """
    if not 1 <= limit <= 10000:
        raise BadRequest(f"limit is {limit}; ask for 1 to 10000 items", param="limit")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return items[:limit], len(items) > limit


class FileStore:
    """The uploaded files of one rayft root.

    Args:
        root: The rayft root.
        max_bytes: Largest file accepted.
    """

    def __init__(self, root: StorageRoot, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def _record_path(self, file_id: str) -> str:
        return file_record_relpath(file_id)

    def create(self, filename: str, purpose: str, source: Any) -> dict[str, Any]:
        """Check an uploaded file and store it; returns its OpenAI file object.

        Args:
            filename: The name the client gave.
            purpose: Must be ``fine-tune``.
            source: A binary file object holding the upload.

        Raises:
            BadRequest: Wrong purpose, a name of another format, or a row that
                ``rayft train`` would refuse (the message names the line).
        """
        from rayft.trainers.data import DataError, scan_source

        if purpose != PURPOSE:
            raise BadRequest(
                f"purpose is {purpose!r}; this server stores files with purpose 'fine-tune'",
                code="invalid_purpose",
                param="purpose",
            )
        filename = (filename or "upload.jsonl").strip()[:MAX_FILENAME_CHARS]
        suffix = upload_suffix(filename)
        file_id = new_file_id()
        relpath = dataset_relpath(f"{file_id}{suffix}")
        final = self.root.path(relpath)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Checked as a hidden sibling, then renamed: a half-checked file is never visible.
        staging = final.with_name(f".upload-{file_id}{suffix}")
        try:
            size = _copy_limited(source, staging, self.max_bytes)
            try:
                report = scan_source(str(staging), "auto")
            except DataError as err:
                raise BadRequest(
                    str(err).replace(str(staging), filename),
                    code="invalid_file",
                    param="file",
                ) from None
            os.replace(staging, final)
        finally:
            staging.unlink(missing_ok=True)
        self.root.mirror(relpath)
        record = {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": PURPOSE,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
            "rayft": {
                "path": relpath,
                "rows": report.rows,
                "format": report.format,
                "sha256": report.sha256,
            },
        }
        self.root.write(self._record_path(file_id), json.dumps(record, indent=2))
        return record

    def get(self, file_id: str) -> dict[str, Any]:
        """The file object of ``file_id``.

        Raises:
            NotFound: No such file.
        """
        record = read_json(self.root, self._record_path(_checked_id(file_id)))
        if record is None:
            raise NotFound(
                f"no file {file_id!r}; GET /v1/files lists the uploaded files",
                code="file_not_found",
                param="file_id",
            )
        return record

    def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        """Every file (of ``purpose``, when given), newest first."""
        records = [read_json(self.root, self._record_path(n)) for n in self._ids()]
        found = [r for r in records if r and (purpose is None or r.get("purpose") == purpose)]
        return sorted(found, key=lambda r: (r.get("created_at", 0), r["id"]), reverse=True)

    def _ids(self) -> list[str]:
        return list_names(self.root, RECORDS_DIR, ".json")

    def url(self, file_id: str) -> str:
        """Where the file's bytes live for every machine (a job spec's ``data.train``)."""
        return self.root.url(self.get(file_id)["rayft"]["path"])

    def content(self, file_id: str) -> Path:
        """The local path of the file's bytes (fetched into the mirror under a URI root)."""
        return self.root.sync_file(self.get(file_id)["rayft"]["path"])

    def delete(self, file_id: str) -> dict[str, Any]:
        """Remove the file and its record; returns OpenAI's deletion object."""
        record = self.get(file_id)
        relpath = record["rayft"]["path"]
        for rel in (relpath, self._record_path(file_id)):
            self.root.path(rel).unlink(missing_ok=True)
            self.root.delete(rel)
        return {"id": file_id, "object": "file", "deleted": True}


def _copy_limited(source: Any, target: Path, limit: int) -> int:
    """Copy ``source`` to ``target`` in chunks; refuse it (413) once past ``limit`` bytes."""
    from rayft.serving.errors import TooLarge

    size = 0
    with open(target, "wb") as out:
        while chunk := source.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise TooLarge(
                    f"the file is over the upload limit of {limit} bytes; split it, or start "
                    "the server with a larger max_file_bytes",
                    code="file_too_large",
                    param="file",
                )
            out.write(chunk)
    if size == 0:
        raise BadRequest("the uploaded file is empty", code="invalid_file", param="file")
    return size
