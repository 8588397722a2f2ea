"""Who is asking: API keys, the project and role each belongs to, and what a role may do.

Keys are made with ``rayft keys create`` and kept in the storage root's key store,
``auth/keys.json`` (``trainers.storage.keys_relpath``). A key reads
``rk-<id>-<secret>``: the store holds its id, project, role, times and a salted SHA-256
of the secret, never the secret itself, so a key is found by its id and checked in
constant time. The secret is 256 random bits, so a fast salted hash is as strong as a
slow one would be, and checking a key costs microseconds per request.

Every replica reads the store again when it changes (its inode, size or modification
time on a local root; at most every ``REMOTE_REFRESH_S`` seconds under a URI root), so a
key revoked with ``rayft keys revoke`` is refused from the next request on.

``RAYFT_API_KEY`` is one more key: an admin of project ``default``. With neither it nor a
key store, every request is an admin of ``default`` (the loopback default).

Roles:

* ``admin`` sees and changes every project's files, jobs and adapters;
* ``member`` sees and changes its own project's only (another project's ids answer 404);
* ``inference`` may only call models (``INFERENCE_ROUTES``); anything else is 403.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from rayft.trainers.storage import StorageError, StorageRoot, keys_relpath

Role = Literal["admin", "member", "inference"]
ROLES: tuple[str, ...] = get_args(Role)
DEFAULT_PROJECT = "default"
ENV_KEY_ID = "RAYFT_API_KEY"
"""The key id recorded for requests made with ``RAYFT_API_KEY``."""
KEY_PREFIX = "rk"
REMOTE_REFRESH_S = 2.0
PROJECT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
INFERENCE_ROUTES = (
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/classifications"),
)
"""What an ``inference`` key may call (``GET /v1/models/<name>`` too); everything else is 403."""

log = logging.getLogger(__name__)


class KeyStoreError(ValueError):
    """A key store operation that cannot be done (bad project, role, expiry or key id)."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts as.

    Attributes:
        key_id: The key's id (``RAYFT_API_KEY`` for the environment's key, ``None`` when
            the server needs no key).
        project: The project it acts in.
        role: ``admin``, ``member`` or ``inference``.
    """

    key_id: str | None
    project: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def scope(self) -> str | None:
        """The one project this principal sees, ``None`` for an admin (every project)."""
        return None if self.is_admin else self.project

    def sees(self, project: str | None) -> bool:
        """Whether an object of ``project`` is visible (``None``: shared by every project)."""
        return project is None or self.is_admin or project == self.project

    def owns(self, project: str | None) -> bool:
        """Whether a file or job of ``project`` is this principal's to see and change.

        Records made before projects existed (no project) belong to ``default``.
        """
        return self.is_admin or (project or DEFAULT_PROJECT) == self.project


OPEN = Principal(None, DEFAULT_PROJECT, "admin")
"""Every request on a server that needs no key."""
ENV_ADMIN = Principal(ENV_KEY_ID, DEFAULT_PROJECT, "admin")
"""Requests with ``RAYFT_API_KEY``."""


def permits(principal: Principal, method: str, path: str) -> bool:
    """Whether ``principal``'s role may call ``method path`` (an allow-list for ``inference``)."""
    if principal.role != "inference":
        return True
    path = path.rstrip("/") or "/"
    if method == "GET" and path.startswith("/v1/models/"):
        return True
    return (method, path) in INFERENCE_ROUTES


def bearer_token(authorization: bytes) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else ``None``."""
    scheme, _, token = authorization.partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


def check_project(project: str) -> str:
    """``project`` if it is a valid project name.

    Raises:
        KeyStoreError: Naming the rule.
    """
    if not isinstance(project, str) or not PROJECT_PATTERN.match(project):
        raise KeyStoreError(
            f"project {project!r}: use 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return project


def parse_expiry(text: str | None, now: float | None = None) -> float | None:
    """When a key given ``--expires text`` expires (epoch seconds); ``None`` for never.

    Args:
        text: ``<n>d``, ``<n>h`` or ``<n>m`` from now, an ISO date (``2027-01-31``, the
            start of that day in UTC) or an ISO time (``2027-01-31T12:00:00Z``).
        now: The present (epoch seconds); default the clock.

    Raises:
        KeyStoreError: ``text`` is none of these, or not in the future.
    """
    if text is None or text == "":
        return None
    now = time.time() if now is None else now
    match = re.fullmatch(r"(\d{1,6})([dhm])", text.strip())
    if match:
        seconds = {"d": 86400, "h": 3600, "m": 60}[match.group(2)]
        when = now + int(match.group(1)) * seconds
    else:
        when = _iso_time(text.strip())
    if when <= now:
        raise KeyStoreError(f"--expires {text!r} is not in the future")
    return when


def _iso_time(text: str) -> float:
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            moment = datetime.combine(date.fromisoformat(text), datetime.min.time())
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    except (ValueError, OverflowError, OSError):
        raise KeyStoreError(
            f"--expires {text!r}: give a duration (30d, 12h, 90m) or an ISO date "
            "(2027-01-31) or time (2027-01-31T12:00:00Z)"
        ) from None


# ----------------------------------------------------------------- the store


class KeyRecord(BaseModel):
    """One key as the store keeps it: never the secret, only its salted hash.

    Attributes:
        id: The key's id (the middle part of ``rk-<id>-<secret>``).
        project: The project it acts in.
        role: What it may do.
        created_at: When it was made (epoch seconds).
        expires_at: When it stops working; ``None`` for never.
        revoked_at: When it was revoked; ``None`` while it is not.
        salt: Hex salt of the hash.
        sha256: Hex SHA-256 of salt + secret.
    """

    model_config = ConfigDict(extra="ignore")

    id: str
    project: str
    role: Role
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    salt: str
    sha256: str

    def active(self, now: float) -> bool:
        """Neither revoked nor expired at ``now``."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def public(self) -> dict[str, Any]:
        """What ``rayft keys list`` shows: everything but the salt and hash."""
        return self.model_dump(exclude={"salt", "sha256"})


def _hash(salt: bytes, secret: bytes) -> bytes:
    return hashlib.sha256(salt + secret).digest()


class KeyStore:
    """The key store of one storage root, re-read when it changes.

    Args:
        storage: The rayft root (default ``$RAYFT_HOME``).
        refresh_s: Under a URI root, the longest a replica keeps a copy before reading
            the store again.
    """

    def __init__(
        self, storage: StorageRoot | str | None = None, refresh_s: float = REMOTE_REFRESH_S
    ) -> None:
        self.root = StorageRoot.resolve(storage)
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._stamp: Any = None
        self._keys: dict[str, KeyRecord] = {}
        self._present = False
        self._read_at = float("-inf")

    # ------------------------------------------------------------- reading

    def exists(self) -> bool:
        """Whether the store exists (then every request needs a key, even with none active)."""
        self._refresh()
        return self._present

    def records(self) -> list[KeyRecord]:
        """Every key ever made (revoked ones too), oldest first."""
        self._refresh()
        return sorted(self._keys.values(), key=lambda r: (r.created_at, r.id))

    def verify(self, token: bytes, now: float | None = None) -> Principal | None:
        """The principal of ``token`` (``rk-<id>-<secret>``), or ``None`` for a token that
        is malformed, unknown, revoked or expired."""
        self._refresh()
        prefix, _, rest = token.partition(b"-")
        key_id, _, secret = rest.partition(b"-")
        record = self._keys.get(key_id.decode("latin-1")) if prefix == KEY_PREFIX.encode() else None
        if record is None:
            _hash(b"\0" * 16, secret)  # the same work for an unknown id
            return None
        try:
            good = hmac.compare_digest(
                _hash(bytes.fromhex(record.salt), secret), bytes.fromhex(record.sha256)
            )
        except ValueError:  # a hand-edited record: its key cannot be checked
            return None
        if not good or not record.active(time.time() if now is None else now):
            return None
        return Principal(record.id, record.project, record.role)

    def _refresh(self) -> None:
        with self._lock:
            stamp = self._current_stamp()
            if stamp is not None and stamp == self._stamp:
                return
            try:
                raw = self.root.read(keys_relpath())
            except StorageError as err:
                self._unreachable(err)
                return
            self._read_at = time.monotonic()
            self._stamp = stamp if stamp is not None else ("read", self._read_at)
            self._present = raw is not None
            self._keys = _parse(raw) if raw is not None else {}

    def _unreachable(self, err: StorageError) -> None:
        """The object-storage root cannot be read: keep the copy read last and try again
        after ``refresh_s``; with none yet, accept no key from the store (fail closed)."""
        log.warning("cannot read the key store %s: %s", keys_relpath(), err)
        self._read_at = time.monotonic()
        if self._stamp is None:
            self._stamp = ("unreachable", self._read_at)
            self._present, self._keys = True, {}

    def _current_stamp(self) -> Any:
        """What changes when the store does; ``None`` when it must be read again."""
        if self.root.is_remote:
            fresh = time.monotonic() - self._read_at < self.refresh_s
            return self._stamp if fresh else None
        try:
            info = os.stat(self.root.path(keys_relpath()))
        except FileNotFoundError:
            return ("absent",)
        return (info.st_ino, info.st_size, info.st_mtime_ns)

    # ------------------------------------------------------------- changing

    def create(
        self, project: str, role: str, expires_at: float | None = None
    ) -> tuple[KeyRecord, str]:
        """Make a key; returns its record and the key itself (shown once, never stored).

        Raises:
            KeyStoreError: A bad project name or role.
        """
        check_project(project)
        if role not in ROLES:
            raise KeyStoreError(f"role {role!r}: choose one of {', '.join(ROLES)}")
        key_id, secret, salt = (
            secrets.token_hex(8),
            secrets.token_urlsafe(32),
            secrets.token_bytes(16),
        )
        record = KeyRecord(
            id=key_id,
            project=project,
            role=role,  # type: ignore[arg-type]
            created_at=time.time(),
            expires_at=expires_at,
            salt=salt.hex(),
            sha256=_hash(salt, secret.encode()).hex(),
        )
        with self._writing() as keys:
            keys[key_id] = record
        return record, f"{KEY_PREFIX}-{key_id}-{secret}"

    def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key from the next request on (revoking it again changes nothing).

        Raises:
            KeyStoreError: No key has that id.
        """
        key_id = key_id.removeprefix(f"{KEY_PREFIX}-").split("-")[0]
        with self._writing() as keys:
            record = keys.get(key_id)
            if record is None:
                raise KeyStoreError(f"no key {key_id!r}; `rayft keys list` shows the key ids")
            if record.revoked_at is None:
                record = keys[key_id] = record.model_copy(update={"revoked_at": time.time()})
        return record

    @contextmanager
    def _writing(self):
        """The store's keys, read fresh and written back atomically; writers take turns
        (a lock file beside the store on a local root)."""
        path = self.root.path(keys_relpath())
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(".keys.lock"), "a") as lock:
            _lock_file(lock)
            raw = self.root.read(keys_relpath())
            keys = _parse(raw, strict=True) if raw is not None else {}
            yield keys
            body = {"version": 1, "keys": [r.model_dump() for r in keys.values()]}
            self.root.write(keys_relpath(), json.dumps(body, indent=2))
        self._stamp = None


def _lock_file(handle: Any) -> None:
    try:
        import fcntl
    except ImportError:  # no advisory locks here: writers must not overlap
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)


def _parse(raw: bytes, strict: bool = False) -> dict[str, KeyRecord]:
    """The keys in the store's bytes; an unreadable store holds no usable key (and says so)."""
    try:
        data = json.loads(raw)
        return {r.id: r for r in (KeyRecord.model_validate(k) for k in data["keys"])}
    except (ValueError, KeyError, TypeError, ValidationError) as err:
        if strict:
            raise KeyStoreError(f"the key store {keys_relpath()} is unreadable: {err}") from None
        log.error("the key store %s is unreadable (%s): no key is accepted", keys_relpath(), err)
        return {}


# ------------------------------------------------------------ the decision


class Authenticator:
    """Bearer token → ``Principal``: ``RAYFT_API_KEY`` (by its digest) and the key store.

    Args:
        env_digest: SHA-256 of ``RAYFT_API_KEY``, if one is set.
        store: The key store.
    """

    def __init__(self, env_digest: bytes | None, store: KeyStore) -> None:
        self.env_digest = env_digest
        self.store = store

    @property
    def requires_key(self) -> bool:
        """True when every request but ``/health`` needs a key."""
        return self.env_digest is not None or self.store.exists()

    def principal(self, token: bytes | None) -> Principal | None:
        """Who ``token`` (raw header bytes, any encoding) acts as; ``None`` when refused."""
        if not self.requires_key:
            return OPEN
        if token is None:
            return None
        if self.env_digest is not None and hmac.compare_digest(
            hashlib.sha256(token).digest(), self.env_digest
        ):
            return ENV_ADMIN
        return self.store.verify(token)
