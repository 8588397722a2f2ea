"""``POST /v1/files`` bodies, streamed to disk as they arrive.

The multipart body is parsed while it is received (``python_multipart``, the parser
Starlette's forms use): the ``file`` part goes to the upload's staging file in chunks,
counted as they come, so a replica holds at most one write buffer of any upload,
whatever its size. The bytes are refused with 413 once past ``max_file_bytes``, and with
400 as soon as a line grows past ``MAX_ROW_BYTES`` (every row of a training file is one
JSON line, which the check then parses on its own); the staging file goes with the
refusal. ``UploadSlots`` bounds how many uploads a replica receives at once (429 past it).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fastapi.concurrency import run_in_threadpool

from rayft.cluster.files_service import MAX_ROW_BYTES, FileStore
from rayft.serving.errors import BadRequest, Overloaded

WRITE_CHUNK = 1 << 20
MAX_FIELD_BYTES = 1024
MAX_PARTS = 8


class UploadSlots:
    """How many uploads one replica receives at once.

    Args:
        limit: Uploads received together; one more is answered 429.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextlib.contextmanager
    def taken(self) -> Iterator[None]:
        """Hold one slot for the body of the ``with`` (429 ``Overloaded`` when none is free).

        Only the event loop's thread takes and frees slots, so a plain counter is exact.
        """
        if self.active >= self.limit:
            raise Overloaded(
                f"this server receives at most {self.limit} uploads at once "
                "(max_concurrent_uploads); retry shortly",
                code="too_many_uploads",
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


@dataclass
class StreamedUpload:
    """What the multipart body held once it is received.

    Attributes:
        filename: The ``file`` part's file name.
        purpose: The ``purpose`` field (``None`` when absent).
        staging: Where the file's bytes are (``None`` when no ``file`` part came).
        size: The file's size in bytes.
    """

    filename: str = ""
    purpose: str | None = None
    staging: Path | None = None
    size: int = 0
    file_id: str = ""
    suffix: str = ""


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    value: bytearray = field(default_factory=bytearray)
    is_file: bool = False


class _Receiver:
    """Collects the parser's callbacks; the awaiting side writes what they queued."""

    def __init__(self, store: FileStore, upload: StreamedUpload) -> None:
        self.store = store
        self.upload = upload
        self.part = _Part()
        self.parts = 0
        self.field_name = b""
        self.field_value = b""
        self.pending: list[bytes] = []
        self.opened = False
        self.line = 1
        self.since_newline = 0

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise BadRequest(
                f"the form has more than {MAX_PARTS} parts; send 'file' and 'purpose'",
                param="file",
            )
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.field_value += data[start:end]

    def on_header_end(self) -> None:
        if len(self.part.headers) < 16:
            self.part.headers[self.field_name.lower()] = self.field_value
        self.field_name, self.field_value = b"", b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        self.part.name = options.get(b"name", b"").decode("utf-8", "replace")
        if self.part.name != "file":
            return
        if self.opened:
            raise BadRequest("send one file per upload", param="file")
        self.part.is_file = True
        self.opened = True
        self.upload.filename = options.get(b"filename", b"").decode("utf-8", "replace")
        file_id, suffix, staging = self.store.begin(self.upload.filename)
        self.upload.file_id, self.upload.suffix, self.upload.staging = file_id, suffix, staging

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part.is_file:
            chunk = data[start:end]
            self._count(chunk)
            self.pending.append(chunk)
            return
        self.part.value += data[start:end]
        if len(self.part.value) > MAX_FIELD_BYTES:
            raise BadRequest(
                f"form field {self.part.name!r} is over {MAX_FIELD_BYTES} bytes", param="purpose"
            )

    def on_part_end(self) -> None:
        if self.part.name == "purpose" and not self.part.is_file:
            self.upload.purpose = self.part.value.decode("utf-8", "replace")

    def _count(self, chunk: bytes) -> None:
        """Count the file's bytes and refuse it once it is too large or a line too long."""
        self.upload.size += len(chunk)
        if self.upload.size > self.store.max_bytes:
            raise self.store.too_large()
        first = chunk.find(b"\n")
        # Lines inside one chunk are shorter than the chunk; only the one that spans
        # chunks can grow past the limit, so two finds per chunk check every line.
        longest = self.since_newline + (len(chunk) if first < 0 else first)
        if longest > MAX_ROW_BYTES:
            raise BadRequest(
                f"{self.upload.filename or 'the file'}:{self.line}: the line is over "
                f"{MAX_ROW_BYTES} bytes; each row of a training file is one JSON line "
                "of at most that size",
                code="invalid_file",
                param="file",
            )
        if first < 0:
            self.since_newline = longest
        else:
            self.line += chunk.count(b"\n")
            self.since_newline = len(chunk) - chunk.rfind(b"\n") - 1


async def receive_upload(
    content_type: str, body: AsyncIterator[bytes], store: FileStore
) -> StreamedUpload:
    """Stream a multipart ``POST /v1/files`` body: the file part to its staging file.

    The caller removes ``upload.staging`` when it is done with it (whatever happened).

    Raises:
        BadRequest: Not a multipart body, a malformed one, a line over ``MAX_ROW_BYTES``,
            or a file name of another format.
        TooLarge: The file is over ``store.max_bytes``.
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise BadRequest(
            "send the file as multipart/form-data with the fields 'file' and 'purpose'",
            code="invalid_content_type",
            param="file",
        )
    upload = StreamedUpload()
    receiver = _Receiver(store, upload)
    parser = MultipartParser(options[b"boundary"], receiver.callbacks())
    handle: IO[bytes] | None = None
    try:
        async for chunk in body:
            _feed(parser, chunk)
            handle = await _write(receiver, upload, handle, final=False)
        _finalize(parser)
        handle = await _write(receiver, upload, handle, final=True)
    except BaseException:
        # Refused, malformed or the client left: nothing of the upload stays on disk.
        if handle is not None:
            handle.close()
            handle = None
        if upload.staging is not None:
            upload.staging.unlink(missing_ok=True)
        raise
    finally:
        if handle is not None:
            handle.close()
    return upload


def _feed(parser: Any, chunk: bytes) -> None:
    from python_multipart.exceptions import FormParserError

    try:
        parser.write(chunk)
    except FormParserError:
        raise BadRequest("the multipart body is malformed", param="file") from None


def _finalize(parser: Any) -> None:
    from python_multipart.exceptions import FormParserError

    try:
        parser.finalize()
    except FormParserError:
        raise BadRequest("the multipart body is malformed or cut short", param="file") from None


async def _write(
    receiver: _Receiver, upload: StreamedUpload, handle: IO[bytes] | None, final: bool
) -> IO[bytes] | None:
    """Write the queued file bytes once a buffer's worth (or the last of them) is queued."""
    queued = sum(len(c) for c in receiver.pending)
    if not receiver.pending or (queued < WRITE_CHUNK and not final):
        return handle
    if handle is None:
        assert upload.staging is not None
        handle = open(upload.staging, "wb")  # noqa: SIM115 - closed by receive_upload
    data = b"".join(receiver.pending)
    receiver.pending.clear()
    await run_in_threadpool(handle.write, data)  # a slow disk never stalls the event loop
    return handle
