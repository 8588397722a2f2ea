"""The request log: one JSON line per served request, kept in the storage root.

Opt-in (``ServeArgs.request_log``). Each replica appends to its own file,
``<root>/request_logs/<YYYY-MM-DD>/<replica>.jsonl`` (dates in UTC), so lines of
different replicas never interleave and a torn last line can only be the last line of
one file. A line holds what monitoring needs::

    {"time": "2026-12-01T23:59:01.123Z", "ts": 1796169541.123, "request_id": "...",
     "route": "/v1/chat/completions", "model": "my-adapter", "status": 200,
     "stream": false, "prompt_tokens": 31, "completion_tokens": 12,
     "latency_s": 0.412, "ttft_s": 0.051, "error": null,
     "project": "team-a", "key_id": "3f9c0a7d1e2b4c5d"}

(``project`` and ``key_id`` say which project and key asked: ``serving.auth``; the key's
id only, never the key),

and, only with ``log_payloads``, what was asked and answered: ``messages`` (chat) or
``prompt`` (completions), ``n``, and ``outputs`` (one text per choice).

``read_log`` reads lines back (by model and time) and ``log_rows`` turns logged
requests into evaluation rows, so ``POST /v1/evaluations`` can score an adapter on the
traffic it served (``{"dataset": {"request_log": {"model": ..., "since": ...}}}``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field

from rayft.serving.errors import BadRequest, NotFound
from rayft.trainers.compat import serve_request_id
from rayft.trainers.storage import (
    REQUEST_LOGS_DIR,
    StorageRoot,
    request_log_part_relpath,
    request_log_relpath,
)

LOG_DIR = REQUEST_LOGS_DIR
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
"""Routes whose requests are served traffic: these are logged."""
PAYLOAD_KEYS = ("messages", "prompt", "n")
UPLOAD_EVERY_S = 30.0
RETENTION_DAYS = 30
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the record


@dataclass
class RequestRecord:
    """What one HTTP request did, filled in while it runs (``serving.metrics.RequestMonitor``).

    Attributes:
        request_id: Ray Serve's request id, else a fresh one.
        method: HTTP method.
        path: Request path as sent.
        started: Wall-clock start (epoch seconds).
        route: The route template that answered (``/v1/models/{model:path}``), or
            ``other`` for paths no route serves.
        model: The served model (base name or adapter) once the request named a servable one.
        status: HTTP status of the answer (499 when the client left before it).
        stream: Answered as server-sent events.
        prompt_tokens: Prompt tokens over all rows.
        completion_tokens: Generated tokens over all rows.
        ttft_s: Seconds from arrival to the first generated token.
        latency_s: Seconds from arrival to the end of the answer.
        error: The error ``code`` of a refused request.
        outputs: Generated text per choice.
        body: The request body as received (read only for payload logging).
        project: The project the request acted in, once its key was accepted.
        key_id: The id of the key it was made with (never the key itself).
    """

    request_id: str
    method: str = "GET"
    path: str = ""
    started: float = field(default_factory=time.time)
    route: str = "other"
    model: str | None = None
    status: int = 0
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    error: str | None = None
    outputs: list[str] | None = None
    body: bytes = b""
    project: str | None = None
    key_id: str | None = None
    _clock: float = field(default_factory=time.perf_counter, repr=False)

    def elapsed(self) -> float:
        """Seconds since the request arrived."""
        return time.perf_counter() - self._clock


_CURRENT: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "rayft_request", default=None
)


def current_request() -> RequestRecord | None:
    """The record of the HTTP request being handled in this context, if any."""
    return _CURRENT.get()


def note_model(model: str) -> None:
    """The request is served by ``model`` (a base model name or a resolved adapter)."""
    record = _CURRENT.get()
    if record is not None:
        record.model = model


def note_principal(project: str, key_id: str | None) -> None:
    """The request acts in ``project`` with the key ``key_id`` (``serving.auth``)."""
    record = _CURRENT.get()
    if record is not None:
        record.project = project
        record.key_id = key_id


def note_first_token() -> None:
    """A first token was generated for the request (the first call counts)."""
    record = _CURRENT.get()
    if record is not None and record.ttft_s is None:
        record.ttft_s = record.elapsed()


def note_usage(
    prompt_tokens: int, completion_tokens: int, outputs: list[str] | None, stream: bool
) -> None:
    """Token counts and generated texts of the request (so far, for a stream)."""
    record = _CURRENT.get()
    if record is not None:
        record.prompt_tokens = prompt_tokens
        record.completion_tokens = completion_tokens
        record.outputs = outputs
        record.stream = stream


def note_error(code: str) -> None:
    """The request failed with error ``code`` after its answer began (a stream)."""
    record = _CURRENT.get()
    if record is not None:
        record.error = code


def bind(record: RequestRecord) -> contextvars.Token:
    """Make ``record`` the current request; reset with ``unbind``."""
    return _CURRENT.set(record)


def unbind(token: contextvars.Token) -> None:
    _CURRENT.reset(token)


# ------------------------------------------------------------------ the line


def _iso(ts: float) -> str:
    moment = datetime.fromtimestamp(ts, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def log_line(record: RequestRecord, log_payloads: bool = False) -> dict[str, Any]:
    """The JSON object logged for ``record``; payload fields only with ``log_payloads``."""
    line: dict[str, Any] = {
        "time": _iso(record.started),
        "ts": round(record.started, 3),
        "request_id": record.request_id,
        "route": record.route,
        "model": record.model,
        "status": record.status,
        "stream": record.stream,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "latency_s": None if record.latency_s is None else round(record.latency_s, 6),
        "ttft_s": None if record.ttft_s is None else round(record.ttft_s, 6),
        "error": record.error,
        "project": record.project,
        "key_id": record.key_id,
    }
    if log_payloads:
        line.update(_payload(record))
    return line


def _payload(record: RequestRecord) -> dict[str, Any]:
    try:
        body = json.loads(record.body) if record.body else {}
    except ValueError:
        body = {}
    out: dict[str, Any] = {}
    if isinstance(body, dict):
        out = {k: body[k] for k in PAYLOAD_KEYS if k in body}
    out["outputs"] = record.outputs
    return out


# ---------------------------------------------------------------- the writer


def replica_name() -> str:
    """This replica's id inside Ray Serve, else ``<host>-<pid>``: one log file per writer."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - outside a replica (tests, in-process use)
        return f"{socket.gethostname()}-{os.getpid()}"


class RequestLog:
    """Appends one line per request to this replica's file for the day (UTC).

    Appending is all a request does. A background thread does the rest every
    ``upload_every_s`` seconds: under a URI storage root it uploads the lines written
    since its last upload as one new object (``request_log_part_relpath``: the file's
    byte offset names it), so no upload repeats a line and none runs on the request loop;
    and it deletes the days older than ``retention_days`` (locally, and at a URI root).
    ``close`` uploads what is left (it deletes nothing).

    Args:
        root: The rayft root.
        writer: A name no other writer uses (``replica_name()``).
        log_payloads: Also log prompts and outputs.
        upload_every_s: Seconds between uploads (URI roots) and retention sweeps.
        retention_days: Days of logs kept, today included; older days are deleted.
    """

    def __init__(
        self,
        root: StorageRoot,
        writer: str | None = None,
        log_payloads: bool = False,
        upload_every_s: float = UPLOAD_EVERY_S,
        retention_days: int = RETENTION_DAYS,
    ) -> None:
        self.storage = root
        self.writer = writer or replica_name()
        self.log_payloads = log_payloads
        self.upload_every_s = upload_every_s
        self.retention_days = retention_days
        self._lock = threading.Lock()
        self._relpath: str | None = None
        self._handle: IO[str] | None = None
        self._shipped: dict[str, int | None] = {}  # relpath -> bytes uploaded (None: unknown)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    @property
    def directory(self) -> Path:
        """Where every replica's files go (one folder per day)."""
        return self.storage.path(LOG_DIR)

    def relpath(self, ts: float) -> str:
        """The file (relative to the root) that a line written at ``ts`` goes to."""
        return request_log_relpath(_day(ts) or "0000-00-00", self.writer)

    def write(self, record: RequestRecord) -> None:
        """Append the line of ``record`` (a local append; uploads happen in the background)."""
        text = json.dumps(log_line(record, self.log_payloads), ensure_ascii=False) + "\n"
        with self._lock:
            relpath = self.relpath(record.started)
            if relpath != self._relpath:
                self._reopen(relpath)
            assert self._handle is not None
            self._handle.write(text)
            self._handle.flush()
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._run, name="rayft-request-log", daemon=True
                )
                self._worker.start()

    def _reopen(self, relpath: str) -> None:
        if self._handle is not None:
            self._handle.close()
        path = self.storage.path(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open
        self._relpath = relpath
        # Where uploads of this file resume is found out by the background thread.
        self._shipped.setdefault(relpath, None)

    def _run(self) -> None:
        while not self._stop.wait(self.upload_every_s):
            self.sync()

    def sync(self) -> None:
        """Upload the lines not uploaded yet (URI roots) and delete days past retention.

        Failures are logged; the next round carries the same lines again.
        """
        try:
            self._upload_new_lines()
            self.prune()
        except Exception:  # noqa: BLE001 - the log never fails the server
            log.warning("cannot upload or prune the request log", exc_info=True)

    def _upload_new_lines(self) -> None:
        if not self.storage.is_remote:
            return
        with self._lock:
            current, files = self._relpath, sorted(self._shipped)
        # An earlier day's file may still hold lines written before midnight.
        for relpath in files:
            self._ship(relpath)
            if relpath != current:
                with self._lock:
                    self._shipped.pop(relpath, None)

    def _ship(self, relpath: str) -> None:
        path = self.storage.path(relpath)
        with self._lock:
            offset = self._shipped.get(relpath)
        if offset is None:
            offset = self._uploaded_bytes(relpath)
            with self._lock:
                self._shipped[relpath] = offset
        if not path.is_file() or path.stat().st_size <= offset:
            return
        with open(path, "rb") as handle:
            handle.seek(offset)
            fresh = handle.read()
        whole = fresh[: fresh.rfind(b"\n") + 1]  # complete lines only
        if not whole:
            return
        day, name = relpath.split("/")[-2:]
        part = request_log_part_relpath(day, name.removesuffix(".jsonl"), offset)
        self.storage.upload(part, whole)
        with self._lock:
            self._shipped[relpath] = offset + len(whole)

    def _uploaded_bytes(self, relpath: str) -> int:
        """How much of the local file ``relpath`` its uploaded parts hold (a writer that
        restarts under the same name resumes there, neither repeating nor skipping lines)."""
        import pyarrow.fs as pafs

        day, name = relpath.split("/")[-2:]
        parts = request_log_part_relpath(day, name.removesuffix(".jsonl"), 0).rsplit("/", 1)[0]
        target = self.storage.remote(parts)
        assert target is not None
        fs, path = target
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        ends = [
            int(i.base_name.split(".")[0]) + i.size for i in infos if i.type == pafs.FileType.File
        ]
        return max(ends, default=0)

    def prune(self, now: float | None = None) -> list[str]:
        """Delete the days older than ``retention_days`` (UTC); returns the days deleted."""
        first_kept = _day((now or time.time()) - (self.retention_days - 1) * 86400)
        assert first_kept is not None
        days = set(_local_days(self.directory))
        if self.storage.is_remote:
            days.update(self.storage.list_dirs(LOG_DIR))
        old = sorted(d for d in days if _DAY.fullmatch(d) and d < first_kept)
        for day in old:
            shutil.rmtree(self.directory / day, ignore_errors=True)
            self.storage.delete(f"{LOG_DIR}/{day}")
        return old

    def close(self) -> None:
        """Stop the background thread, close the file and upload what is left (URI roots)."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join()
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
        try:
            self._upload_new_lines()
        except Exception:  # noqa: BLE001 - the log never fails the server
            log.warning("cannot upload the request log", exc_info=True)


def _local_days(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.is_dir()] if directory.is_dir() else []


# ---------------------------------------------------------------- the reader


class LogQuery(BaseModel):
    """Which logged requests to read: ``{"model", "since", "until", "limit"}``.

    ``since`` / ``until`` are ISO 8601 times (``2026-12-01T10:00:00Z``) or epoch
    seconds; ``limit`` keeps the most recent rows (one per answered choice). ``model``
    defaults to the model being evaluated.
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = Field(None, ge=1)


class LogDataset(BaseModel):
    """An evaluation dataset read from the request log: ``{"request_log": {...}}``."""

    model_config = ConfigDict(extra="forbid")

    request_log: LogQuery


def _epoch(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # a time without zone is UTC, as the log writes it
        moment = moment.replace(tzinfo=timezone.utc)
    try:
        return moment.timestamp()
    except (OverflowError, OSError, ValueError):  # a zone offset pushed it out of range
        return None


def read_log(
    root: StorageRoot,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
    where: Callable[[dict[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    """Logged lines of ``model`` between ``since`` and ``until``, oldest first.

    Only the days in the range are opened. With ``limit`` the log is read newest first,
    day by day and each file from its end, and reading stops once ``limit`` lines
    matched: the cost follows ``limit``, not the size of the log. Lines that do not
    parse (a line torn by a replica that died mid-write) are skipped.

    Args:
        root: The rayft root.
        model: Only requests served by this model; ``None`` for every model.
        since: Only requests that arrived at or after this time.
        until: Only requests that arrived before this time.
        limit: Keep only the most recent ``limit`` lines.
        where: Only lines for which this is true.
    """
    logs = root.path(LOG_DIR)
    start, end = _epoch(since), _epoch(until)
    first_day, last_day = _day(start), _day(end)
    days = sorted(
        day
        for day in _local_days(logs)
        if not ((first_day and day < first_day) or (last_day and day > last_day))
    )
    match = _Match(model, start, end, where)
    lines: list[dict[str, Any]] = []
    for day in reversed(days) if limit else days:
        found: list[dict[str, Any]] = []
        for file in sorted((logs / day).glob("*.jsonl")):
            found.extend(match.newest(file, limit) if limit else match.all(file))
        found.sort(key=lambda line: line["ts"])
        if limit:
            lines[:0] = found[-(limit - len(lines)) :]
            if len(lines) >= limit:
                break
        else:
            lines.extend(found)
    return lines


# A line is written when its request ends: its arrival (``ts``) is at most a request's
# deadline before the lines around it, so reading a file backwards stops this far
# before ``since``.
LATE_S = 3600.0


@dataclass(frozen=True)
class _Match:
    """Which lines ``read_log`` keeps."""

    model: str | None
    start: float | None
    end: float | None
    where: Callable[[dict[str, Any]], bool] | None

    def line(self, raw: bytes) -> dict[str, Any] | None:
        try:
            line = json.loads(raw)
            ts = float(line["ts"])
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            return None
        line["ts"] = ts
        return line

    def keeps(self, line: dict[str, Any]) -> bool:
        ts = line["ts"]
        if self.model is not None and line.get("model") != self.model:
            return False
        if (self.start is not None and ts < self.start) or (
            self.end is not None and ts >= self.end
        ):
            return False
        return self.where is None or self.where(line)

    def all(self, file: Path) -> list[dict[str, Any]]:
        with open(file, "rb") as handle:
            parsed = (self.line(raw) for raw in handle)
            return [line for line in parsed if line is not None and self.keeps(line)]

    def newest(self, file: Path, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` matching lines from the end of ``file``."""
        out: list[dict[str, Any]] = []
        for raw in _lines_backwards(file):
            line = self.line(raw)
            if line is None:
                continue
            if self.start is not None and line["ts"] < self.start - LATE_S:
                break  # every line before it arrived earlier still
            if self.keeps(line):
                out.append(line)
                if len(out) >= limit:
                    break
        return out


def _lines_backwards(file: Path, block: int = 64 * 1024) -> Iterator[bytes]:
    """The lines of ``file`` from the last to the first, read in blocks from its end."""
    with open(file, "rb") as handle:
        position = handle.seek(0, os.SEEK_END)
        tail = b""
        while position > 0:
            step = min(block, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + tail
            parts = data.split(b"\n")
            tail = parts[0]  # may continue in the block before
            for part in reversed(parts[1:]):
                if part.strip():
                    yield part
        if tail.strip():
            yield tail


def _day(ts: float | None) -> str | None:
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")
    except (OverflowError, OSError, ValueError):  # before 1970 or past 9999: no day bound
        return None


def log_rows(lines: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """Evaluation rows from logged requests: chat rows (messages + the answer) and
    prompt/completion rows, one per generated choice of every answered (200) request.

    Raises:
        NotFound: No answered request of ``model`` is in the log.
        BadRequest: The requests were logged without payloads (``log_payloads`` off).
    """
    answered = [line for line in lines if line.get("status") == 200]
    if not answered:
        raise NotFound(
            f"the request log holds no answered request of {model!r} in that time range; "
            "serve with request_log=true and send traffic first",
            code="no_logged_requests",
            param="dataset",
        )
    rows: list[dict[str, Any]] = []
    for line in answered:
        rows.extend(_rows_of(line))
    if not rows:
        raise BadRequest(
            f"the request log holds {len(answered)} requests of {model!r} but no prompts or "
            "outputs: they were logged with log_payloads off; serve with log_payloads=true "
            "to evaluate on served traffic",
            code="no_logged_payloads",
            param="dataset",
        )
    return rows


def _rows_of(line: dict[str, Any]) -> list[dict[str, Any]]:
    outputs = line.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        return []
    if isinstance(line.get("messages"), list):
        messages = [_plain_message(m) for m in line["messages"] if isinstance(m, dict)]
        return [
            {"messages": [*messages, {"role": "assistant", "content": text}]} for text in outputs
        ]
    prompt = line.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        return []  # token-id prompts have no text to evaluate on
    n = max(1, len(outputs) // max(1, len(prompts)))
    return [
        {"prompt": prompts[i // n], "completion": text}
        for i, text in enumerate(outputs)
        if i // n < len(prompts)
    ]


def _plain_message(message: dict[str, Any]) -> dict[str, Any]:
    """A logged message as the chat row format takes it (as the chat route renders it)."""
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    role = "system" if message.get("role") == "developer" else message.get("role")
    return {"role": role, "content": content or ""}


def new_request_id() -> str:
    """Ray Serve's id of the request being handled, else a fresh one."""
    try:
        rid = serve_request_id()
        if rid:
            return rid
    except Exception:  # noqa: BLE001 - private API, or outside Serve
        pass
    return uuid.uuid4().hex
