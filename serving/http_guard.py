"""Who may reach the server: the exposure check, and the browser-facing HTTP checks.

An unkeyed server on loopback is the default, and a web page the user visits can send
requests there: through DNS rebinding (its own name resolving to 127.0.0.1, so the
browser treats the server as the page's origin) or as cross-site "simple" requests (a
form or ``fetch`` with ``text/plain``, sent without a preflight). ``HttpGuard`` closes
both, before the API key and body checks of ``openai_api.RequestGuard`` run:

- the ``Host`` header must name the server: the loopback names (any port) and the names
  the operator lists (``ServeArgs.allowed_hosts``; ``rayft serve --host X`` adds ``X``);
  anything else is 400 ``invalid_host``. ``"*"`` in the list accepts every name (behind
  a proxy that checks it);
- a state-changing request (POST, PUT, PATCH, DELETE) that carries ``Origin`` must come
  from the server's own origin (the ``Host`` it was sent to): else 403 ``cross_origin``;
- a body is JSON (``application/json``, ``application/*+json``; no type is read as
  JSON, as FastAPI does), or multipart for ``POST /v1/files``: else 415;
- JSON nests at most ``MAX_JSON_DEPTH`` levels, counted while the body streams in: else
  400 ``json_too_deep`` (Python's parser would otherwise fail with a 500).

While the server drains (``Admission``), every new request is answered 503 with
``Retry-After``; the requests already admitted finish.

``check_exposure`` is the other half: serving beyond loopback without ``RAYFT_API_KEY``
is refused before anything starts.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

from rayft.serving.auth import KeyStore
from rayft.serving.errors import (
    BadRequest,
    Forbidden,
    ServingError,
    Unavailable,
    UnsupportedMediaType,
)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
"""The names every server answers to, with any port."""
ANY_HOST = "*"
WILDCARD_BINDS = ("0.0.0.0", "::", "[::]", "")
MAX_JSON_DEPTH = 64
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
UPLOAD_ROUTE = "/v1/files"
DRAIN_RETRY_AFTER_S = 5

# The bytes that matter to nesting: quotes, backslashes and brackets.
_SIGNIFICANT = re.compile(rb'["\\\[\]{}]')
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


# ------------------------------------------------------------------ exposure


class InsecureServing(ValueError):
    """Serving beyond loopback with no API key, without the operator saying so."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_exposure(host: str, insecure: bool = False, storage: str | None = None) -> None:
    """Refuse to serve on a non-loopback ``host`` when no key is required.

    A key is required when ``RAYFT_API_KEY`` is set or the storage root's key store
    (``serving.auth.KeyStore``) holds a key.

    Args:
        storage: The rayft root whose key store counts (default ``$RAYFT_HOME``).

    Raises:
        InsecureServing: Naming the host and the ways out.
    """
    if insecure or is_loopback(host) or os.environ.get("RAYFT_API_KEY"):
        return
    if KeyStore(storage).records():  # the app then asks every request for a key
        return
    raise InsecureServing(
        f"refusing to serve on {host} without an API key: anyone who reaches it could use "
        "every model and adapter; set RAYFT_API_KEY (clients then send "
        "'Authorization: Bearer <key>'), create a project key (serving.auth.KeyStore), serve on "
        "127.0.0.1, or pass --insecure"
    )


def bind_host_names(bind_host: str) -> list[str]:
    """The ``Host`` names a server bound to ``bind_host`` answers to, beyond loopback.

    A named interface is its own name; a wildcard bind (``0.0.0.0``, ``::``) answers to
    this machine's host name, its fully qualified name and the addresses they resolve to.
    """
    if bind_host not in WILDCARD_BINDS:
        return [] if is_loopback(bind_host) else [bind_host]
    names = {socket.gethostname(), socket.getfqdn()}
    for name in list(names):
        try:
            names.update(str(info[4][0]) for info in socket.getaddrinfo(name, None))
        except OSError:
            continue
    return sorted(n for n in names if n and not is_loopback(n))


# -------------------------------------------------------------- the checks


def _host_name(value: str) -> str | None:
    """The lower-case name of a ``Host`` value (``name``, ``name:port``, ``[v6]:port``)."""
    if not value or any(c in value for c in "/?#@ \t"):
        return None
    try:
        parts = urlsplit(f"//{value}")
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return None
    return parts.hostname or None


def _authority(value: str, scheme: str) -> tuple[str, int] | None:
    """``(name, port)`` of a ``Host`` value, the scheme's default port when none is given."""
    name = _host_name(value)
    if name is None:
        return None
    port = urlsplit(f"//{value}").port
    return name, port or (443 if scheme in ("https", "wss") else 80)


def host_allow_list(names: Iterable[str]) -> frozenset[str]:
    """The normalised names of ``names`` (ports and IPv6 brackets dropped) plus loopback."""
    allowed = set()
    for name in (*LOOPBACK_HOSTS, *names):
        normal = ANY_HOST if name.strip() == ANY_HOST else _host_name(name.strip())
        if normal:
            allowed.add(normal)
    return frozenset(allowed)


def _media_type(headers: dict[bytes, bytes]) -> str | None:
    raw = headers.get(b"content-type")
    if raw is None:
        return None
    return raw.decode("latin-1").split(";", 1)[0].strip().lower()


def _has_body(headers: dict[bytes, bytes]) -> bool:
    length = headers.get(b"content-length", b"").strip()
    return b"transfer-encoding" in headers or (bool(length) and length != b"0")


def _is_json_type(media: str) -> bool:
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


class HeadChecks:
    """The checks of one request's head, in order; each returns a refusal or ``None``."""

    def __init__(self, scope: dict[str, Any], allowed: frozenset[str] | None) -> None:
        self.scope = scope
        self.allowed = allowed
        self.headers = dict(scope.get("headers") or [])
        self.method = scope.get("method", "GET")
        self.path = scope.get("path", "").rstrip("/")

    def first(self) -> ServingError | None:
        """The first check that refuses the request, or ``None``."""
        return self.host() or self.origin() or self.content_type()

    def host(self) -> ServingError | None:
        """400 unless ``Host`` names this server."""
        if self.allowed is None or ANY_HOST in self.allowed:
            return None
        value = self.headers.get(b"host", b"").decode("latin-1")
        if _host_name(value) in self.allowed:
            return None
        return BadRequest(
            f"this server does not answer to the host {value[:100]!r}; send requests to "
            "127.0.0.1 or localhost, or let the operator add the name with "
            "allowed_hosts (rayft serve --allowed-host NAME)",
            code="invalid_host",
        )

    def origin(self) -> ServingError | None:
        """403 for a state-changing request from another web origin."""
        raw = self.headers.get(b"origin")
        if raw is None or self.method not in STATE_CHANGING:
            return None
        origin = raw.decode("latin-1").strip()
        scheme = self.scope.get("scheme", "http")
        target = _authority(self.headers.get(b"host", b"").decode("latin-1"), scheme)
        try:
            parts = urlsplit(origin)
            mine = _authority(parts.netloc, parts.scheme) if parts.scheme else None
        except ValueError:
            mine = None
        if mine is not None and mine == target:
            return None
        return Forbidden(
            f"cross-origin {self.method} from {origin[:100]!r} refused: this API takes "
            "state-changing requests only from its own origin or from non-browser clients",
            code="cross_origin",
        )

    def content_type(self) -> ServingError | None:
        """415 for a body that is neither JSON nor, for uploads, multipart."""
        if self.method not in STATE_CHANGING or not _has_body(self.headers):
            return None
        media = _media_type(self.headers)
        upload = self.method == "POST" and self.path == UPLOAD_ROUTE
        if upload and media == "multipart/form-data":
            return None
        if not upload and (media is None or _is_json_type(media)):
            return None
        wanted = "multipart/form-data" if upload else "application/json"
        return UnsupportedMediaType(
            f"Content-Type {media or '(none)'} is not accepted here; send {wanted}",
            code="unsupported_media_type",
        )

    def reads_json(self) -> bool:
        """Whether the body is JSON, so its nesting is counted."""
        if self.method not in STATE_CHANGING:
            return False
        return not (self.method == "POST" and self.path == UPLOAD_ROUTE)


class _TooDeep(Exception):
    """The body nests deeper than the limit (raised from ``receive``)."""


class JsonDepth:
    """Counts the nesting of a JSON text fed in chunks, without parsing it."""

    def __init__(self, limit: int = MAX_JSON_DEPTH) -> None:
        self.limit = limit
        self.depth = 0
        self.in_string = False
        self.escaped = False  # the chunk ended with a backslash inside a string

    def feed(self, chunk: bytes) -> bool:
        """Count ``chunk``; True once the text nests deeper than the limit."""
        skip = 0 if self.escaped else -1
        self.escaped = False
        for match in _SIGNIFICANT.finditer(chunk):
            at = match.start()
            if at == skip:
                continue
            byte = chunk[at]
            if self.in_string:
                if byte == _BACKSLASH:
                    skip = at + 1
                    self.escaped = skip == len(chunk)
                elif byte == _QUOTE:
                    self.in_string = False
            elif byte == _QUOTE:
                self.in_string = True
            elif byte in _OPEN:
                self.depth += 1
                if self.depth > self.limit:
                    return True
            elif byte in _CLOSE:
                self.depth -= 1
        return False


# --------------------------------------------------------------- admission


class Admission:
    """Whether a replica takes new requests, and how many it is working on."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    def enter(self) -> None:
        """A request was admitted."""
        self.in_flight += 1

    def leave(self) -> None:
        """An admitted request was answered."""
        self.in_flight -= 1

    async def drain(self, grace_period_s: float, poll_s: float = 0.05) -> bool:
        """Stop admitting; wait up to ``grace_period_s`` for the admitted requests.

        Polled rather than awaited on an event: Serve may run ``reconfigure`` on another
        event loop than the one serving requests.

        Returns:
            True when every admitted request finished within the grace period.
        """
        self.draining = True
        deadline = time.monotonic() + grace_period_s
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        return self.in_flight == 0


# --------------------------------------------------------------- middleware


class HttpGuard:
    """ASGI middleware: host, origin, content type, JSON depth and admission checks.

    Args:
        app: The wrapped ASGI app.
        allowed_hosts: Names the ``Host`` header may carry besides loopback; ``None``
            checks no ``Host`` (an app mounted behind the caller's own front end).
        admission: The replica's admission state (draining answers 503).
        max_json_depth: Deepest JSON nesting a body may have.
    """

    def __init__(
        self,
        app: Any,
        allowed_hosts: Sequence[str] | None = None,
        admission: Admission | None = None,
        max_json_depth: int = MAX_JSON_DEPTH,
    ) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else host_allow_list(allowed_hosts)
        self.admission = admission or Admission()
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        checks = HeadChecks(scope, self.allowed)
        refusal = checks.first()
        if refusal is None and self.admission.draining:
            refusal = Unavailable(
                "the server is shutting down; retry on another replica or later",
                code="shutting_down",
            )
        if refusal is not None:
            await _answer(refusal, scope, receive, send)
            return
        self.admission.enter()
        try:
            await self._forward(checks, scope, receive, send)
        finally:
            self.admission.leave()

    async def _forward(self, checks: HeadChecks, scope: dict[str, Any], receive: Any, send: Any):
        if not checks.reads_json():
            await self.app(scope, receive, send)
            return
        depth = JsonDepth(self.max_json_depth)
        started = False

        async def counted() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request" and depth.feed(message.get("body", b"")):
                raise _TooDeep
            return message

        async def watched(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooDeep:
            if started:  # a route that streamed before reading its whole body
                return
            refusal = BadRequest(
                f"the JSON body nests deeper than {self.max_json_depth} levels",
                code="json_too_deep",
            )
            await _answer(refusal, scope, receive, send)


async def _answer(err: ServingError, scope: dict[str, Any], receive: Any, send: Any) -> None:
    headers = {"Retry-After": str(DRAIN_RETRY_AFTER_S)} if err.status == 503 else None
    await JSONResponse(err.body(), status_code=err.status, headers=headers)(scope, receive, send)
