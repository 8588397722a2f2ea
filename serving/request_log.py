"""The request log: one JSON line per served request, kept in the storage root.

Opt-in (``ServeArgs.request_log``). Each replica appends to its own file,
``<root>/request_logs/<YYYY-MM-DD>/<replica>.jsonl`` (dates in UTC), so lines of
different replicas never interleave and a torn last line can only be the last line of
one file. A line holds what monitoring needs::

    {"time": "2026-12-01T23:59:01.123Z", "ts": 1796169541.123, "request_id": "...",
     "route": "/v1/chat/completions", "model": "my-adapter", "status": 200,
     "stream": false, "prompt_tokens": 31, "completion_tokens": 12,
     "latency_s": 0.412, "ttft_s": 0.051, "error": null}

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
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field

from rayft.serving.errors import BadRequest, NotFound
from rayft.trainers.compat import serve_request_id
from rayft.trainers.storage import REQUEST_LOGS_DIR, StorageRoot, request_log_relpath

LOG_DIR = REQUEST_LOGS_DIR
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
"""Routes whose requests are served traffic: these are logged."""
PAYLOAD_KEYS = ("messages", "prompt", "n")
UPLOAD_EVERY_S = 30.0

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

    Under a URI storage root the lines go to the local mirror, and the file is uploaded
    at most every ``upload_every_s`` seconds and when the log closes.

    Args:
        storage: The rayft root.
        writer: A name no other writer uses (``replica_name()``).
        log_payloads: Also log prompts and outputs.
    """

    def __init__(
        self,
        storage: str | Path | StorageRoot | None,
        writer: str | None = None,
        log_payloads: bool = False,
        upload_every_s: float = UPLOAD_EVERY_S,
    ) -> None:
        self.storage = _root(storage)
        self.writer = writer or replica_name()
        self.log_payloads = log_payloads
        self.upload_every_s = upload_every_s
        self._lock = threading.Lock()
        self._relpath: str | None = None
        self._handle: IO[str] | None = None
        self._uploaded = time.monotonic()

    @property
    def directory(self) -> Path:
        """Where every replica's files go (one folder per day)."""
        return self.storage.path(LOG_DIR)

    def relpath(self, ts: float) -> str:
        """The file (relative to the root) that a line written at ``ts`` goes to."""
        day = datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")
        return request_log_relpath(day, self.writer)

    def write(self, record: RequestRecord) -> None:
        """Append the line of ``record``."""
        text = json.dumps(log_line(record, self.log_payloads), ensure_ascii=False) + "\n"
        with self._lock:
            relpath = self.relpath(record.started)
            if relpath != self._relpath:
                self._reopen(relpath)
            assert self._handle is not None
            self._handle.write(text)
            self._handle.flush()
            if self.storage.is_remote and time.monotonic() - self._uploaded > self.upload_every_s:
                self._upload()

    def _reopen(self, relpath: str) -> None:
        if self._handle is not None:
            self._handle.close()
            self._upload()
        path = self.storage.path(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open
        self._relpath = relpath

    def _upload(self) -> None:
        self._uploaded = time.monotonic()
        if self._relpath is None or not self.storage.is_remote:
            return
        try:
            self.storage.mirror(self._relpath)
        except OSError:  # the next upload carries these lines too
            log.warning("cannot upload the request log %s", self._relpath, exc_info=True)

    def close(self) -> None:
        """Flush, upload (URI roots) and close the file."""
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
                self._upload()


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
    storage: str | Path | StorageRoot | None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Logged lines of ``model`` between ``since`` and ``until``, oldest first.

    Lines that do not parse (a line torn by a replica that died mid-write) are skipped.

    Args:
        storage: The rayft root.
        model: Only requests served by this model; ``None`` for every model.
        since: Only requests that arrived at or after this time.
        until: Only requests that arrived before this time.
        limit: Keep only the most recent ``limit`` lines.
    """
    root = _root(storage).path(LOG_DIR)
    start, end = _epoch(since), _epoch(until)
    first_day = _day(start)
    last_day = _day(end)
    lines: list[dict[str, Any]] = []
    days = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for day in days:
        if (first_day and day.name < first_day) or (last_day and day.name > last_day):
            continue
        for file in sorted(day.glob("*.jsonl")):
            lines.extend(_matching(file, model, start, end))
    lines.sort(key=lambda line: line["ts"])
    return lines[-limit:] if limit else lines


def _root(storage: str | Path | StorageRoot | None) -> StorageRoot:
    return StorageRoot.resolve(str(storage) if isinstance(storage, Path) else storage)


def _day(ts: float | None) -> str | None:
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")
    except (OverflowError, OSError, ValueError):  # before 1970 or past 9999: no day bound
        return None


def _matching(
    file: Path, model: str | None, start: float | None, end: float | None
) -> list[dict[str, Any]]:
    out = []
    with open(file, encoding="utf-8") as handle:
        for raw in handle:
            try:
                line = json.loads(raw)
                ts = float(line["ts"])
            except (ValueError, KeyError, TypeError, IndexError):
                continue
            if model is not None and line.get("model") != model:
                continue
            if (start is not None and ts < start) or (end is not None and ts >= end):
                continue
            line["ts"] = ts
            out.append(line)
    return out


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
