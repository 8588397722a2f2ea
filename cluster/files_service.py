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

from rayft.serving.auth import DEFAULT_PROJECT, Principal
from rayft.serving.errors import BadRequest, NotFound, TooLarge
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
EVALS_PURPOSE = "evals"
PURPOSES = (PURPOSE, EVALS_PURPOSE)
"""What a file may be uploaded for: training data, or an eval's data source rows."""
MAX_FILENAME_CHARS = 256
MAX_ROW_BYTES = 4 * 1024 * 1024
"""Longest line of an uploaded file: one row, parsed on its own by the check."""
MAX_JSON_ARRAY_BYTES = 4 * 1024 * 1024
"""Largest ``.json`` array upload: the check parses an array whole (several times its
size in memory), so larger data comes as JSON lines, which it reads a line at a time."""


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


def limit_param(raw: str | None, default: int) -> int:
    """A list route's ``limit`` query parameter (``default`` when absent).

    Raises:
        BadRequest: Not a whole number.
    """
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()):  # '²'.isdigit(), but int('²') fails
        raise BadRequest(f"limit is {raw!r}; give a whole number from 1", param="limit")
    return int(raw)


def id_page(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's list object of one page of ``items``, with its first and last ids."""
    data, more = page(items, after, limit)
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


class FileStore:
    """The uploaded files of one rayft root.

    Args:
        root: The rayft root.
        max_bytes: Largest file accepted.
        principal: Who uses the store (``serving.auth``): new files belong to its
            project, and another project's files are not found (unless it is an admin).
            ``None``: project ``default``, every file visible (the CLI and Python).
    """

    def __init__(
        self, root: StorageRoot, max_bytes: int, principal: Principal | None = None
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.principal = principal
        self.project = principal.project if principal is not None else DEFAULT_PROJECT

    def _visible(self, record: dict[str, Any]) -> bool:
        project = record.get("rayft", {}).get("project")
        return self.principal is None or self.principal.owns(project)

    def _record_path(self, file_id: str) -> str:
        return file_record_relpath(file_id)

    def create(self, filename: str, purpose: str, source: Any) -> dict[str, Any]:
        """Check an uploaded file and store it; returns its OpenAI file object.

        Args:
            filename: The name the client gave.
            purpose: ``fine-tune`` (training data) or ``evals`` (an eval run's rows).
            source: A binary file object holding the upload (read in chunks).

        Raises:
            BadRequest: Wrong purpose, a name of another format, or a row that
                ``rayft train`` would refuse (the message names the line).
            TooLarge: The file is over ``max_bytes``.
        """
        check_purpose(purpose)
        file_id, suffix, staging = self.begin(filename)
        try:
            size = _copy_limited(source, staging, self.max_bytes)
            return self.accept(file_id, filename, suffix, staging, size, purpose)
        finally:
            staging.unlink(missing_ok=True)

    def begin(self, filename: str) -> tuple[str, str, Path]:
        """A new upload of ``filename``: its file id, stored suffix and staging path.

        The bytes go to the staging path (a hidden sibling of the final file, so a
        half-received or half-checked file is never visible); ``accept`` checks and
        stores them. Whoever wrote the staging file removes it in the end.

        Raises:
            BadRequest: The name says the file is of another format.
        """
        suffix = upload_suffix(_clean_name(filename))
        file_id = new_file_id()
        final = self.root.path(dataset_relpath(f"{file_id}{suffix}"))
        final.parent.mkdir(parents=True, exist_ok=True)
        return file_id, suffix, final.with_name(f".upload-{file_id}{suffix}")

    def too_large(self) -> TooLarge:
        """The 413 of a file over ``max_bytes``."""
        return too_large(self.max_bytes)

    def accept(
        self,
        file_id: str,
        filename: str,
        suffix: str,
        staging: Path,
        size: int,
        purpose: str = PURPOSE,
    ) -> dict[str, Any]:
        """Check the received bytes at ``staging`` row by row and store them as ``file_id``.

        A ``fine-tune`` file is checked as ``rayft train`` checks data; an ``evals`` file
        as an eval's data source (``cluster.eval_data.scan_eval_rows``: one JSON object
        per line holding an ``item`` object and maybe a ``sample`` object).

        Raises:
            BadRequest: An empty file, a ``.json`` array over ``MAX_JSON_ARRAY_BYTES``
                (it is parsed whole; JSON lines are read a line at a time), or a row
                that ``rayft train`` would refuse (the message names the line).
        """
        from rayft.cluster.eval_data import scan_eval_rows
        from rayft.trainers.data import DataError

        filename = _clean_name(filename)
        if size == 0 or not staging.is_file():
            raise BadRequest("the uploaded file is empty", code="invalid_file", param="file")
        if suffix == ".json" and size > MAX_JSON_ARRAY_BYTES and _starts_array(staging):
            raise BadRequest(
                f"{filename}: a JSON array file is read whole to check it, so it may be at most "
                f"{MAX_JSON_ARRAY_BYTES} bytes; send larger data as JSON lines (.jsonl, one "
                "row object per line)",
                code="invalid_file",
                param="file",
            )
        relpath = dataset_relpath(f"{file_id}{suffix}")
        try:
            if purpose == EVALS_PURPOSE:
                report = scan_eval_rows(staging, suffix)
            else:
                report = _scan_training_rows(staging)
        except DataError as err:
            raise BadRequest(
                str(err).replace(str(staging), filename), code="invalid_file", param="file"
            ) from None
        os.replace(staging, self.root.path(relpath))
        self.root.mirror(relpath)
        record = {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
            "rayft": {
                "path": relpath,
                "rows": report.rows,
                "format": report.format,
                "sha256": report.sha256,
                "project": self.project,
                "key_id": self.principal.key_id if self.principal is not None else None,
            },
        }
        self.root.write(self._record_path(file_id), json.dumps(record, indent=2))
        return record

    def get(self, file_id: str) -> dict[str, Any]:
        """The file object of ``file_id``.

        Raises:
            NotFound: No such file (or another project's, answered alike).
        """
        record = read_json(self.root, self._record_path(_checked_id(file_id)))
        if record is None or not self._visible(record):
            raise NotFound(
                f"no file {file_id!r}; GET /v1/files lists the uploaded files",
                code="file_not_found",
                param="file_id",
            )
        return record

    def list(self, purpose: str | None = None) -> list[dict[str, Any]]:
        """Every visible file (of ``purpose``, when given), newest first."""
        records = [read_json(self.root, self._record_path(n)) for n in self._ids()]
        found = [
            r
            for r in records
            if r and self._visible(r) and (purpose is None or r.get("purpose") == purpose)
        ]
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
        # The source of truth first, the record before the bytes: a failure leaves the
        # file listed and whole (delete again), or unlisted; never listed without bytes.
        for rel in (self._record_path(file_id), relpath):
            self.root.delete(rel)
        for rel in (self._record_path(file_id), relpath):
            self.root.path(rel).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}


def too_large(limit: int) -> TooLarge:
    """The 413 of an upload over ``limit`` bytes."""
    return TooLarge(
        f"the file is over the upload limit of {limit} bytes; split it, or start "
        "the server with a larger max_file_bytes",
        code="file_too_large",
        param="file",
    )


def check_purpose(purpose: Any) -> None:
    """Refuse a ``purpose`` other than ``fine-tune`` or ``evals`` (400 naming the field)."""
    if purpose is None:
        raise BadRequest("purpose is required; send purpose=fine-tune", param="purpose")
    if purpose not in PURPOSES:
        raise BadRequest(
            f"purpose is {purpose!r}; this server stores files with purpose 'fine-tune' "
            "(training data) or 'evals' (an eval run's rows)",
            code="invalid_purpose",
            param="purpose",
        )


def _clean_name(filename: str) -> str:
    return (filename or "upload.jsonl").strip()[:MAX_FILENAME_CHARS] or "upload.jsonl"


def _starts_array(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(64).decode("utf-8", errors="replace")
    return head.lstrip("\ufeff \t\r\n").startswith("[")


def _copy_limited(source: Any, target: Path, limit: int) -> int:
    """Copy ``source`` to ``target`` in chunks; refuse it (413) once past ``limit`` bytes."""
    size = 0
    with open(target, "wb") as out:
        while chunk := source.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            out.write(chunk)
    return size


def _scan_training_rows(path: Path) -> Any:
    """A ``fine-tune`` file's scan: rows of a training format, or else GRPO's prompt rows
    (OpenAI's reinforcement data: chat messages ending with the user's, plus the grader's
    fields). The first refusal is the one reported when neither fits."""
    from rayft.trainers.data import DataError, scan_source
    from rayft.trainers.grpo import PromptRows

    try:
        return scan_source(str(path), "auto")
    except DataError as err:
        try:
            return scan_source(str(path), "auto", row_check=PromptRows())
        except DataError:
            raise err from None
