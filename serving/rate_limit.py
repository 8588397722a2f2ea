"""Requests per second per project: a token bucket per project on each replica.

A project's bucket holds up to ``burst`` tokens and gains ``requests_per_s`` a second;
each request takes one, and a request that finds none is answered 429 ``quota_exceeded``
with ``Retry-After`` (whole seconds until a token is back). Admin keys and a server that
needs no key count as project ``default``.

The table is bounded: projects come only from valid keys, a bucket that has refilled is
the same as no bucket (it is dropped when room is needed), and past ``max_projects`` the
least recently used bucket goes.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from rayft.serving.auth import DEFAULT_PROJECT, Principal
from rayft.serving.errors import QuotaExceeded

MAX_PROJECTS = 10_000


@dataclass
class _Bucket:
    tokens: float
    at: float


def rate_key(principal: Principal) -> str:
    """The project a request is counted against (``default`` for an admin)."""
    return DEFAULT_PROJECT if principal.is_admin else principal.project


class ProjectRates:
    """Token buckets keyed by project.

    Args:
        requests_per_s: Tokens a bucket gains per second; 0 takes every request.
        burst: Tokens a bucket holds at most (and starts with).
        max_projects: Most buckets kept at once.
        clock: Monotonic seconds (a test passes its own).
    """

    def __init__(
        self,
        requests_per_s: float,
        burst: int,
        max_projects: int = MAX_PROJECTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = float(requests_per_s)
        self.burst = float(burst)
        self.max_projects = max_projects
        self.clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, project: str) -> int | None:
        """Take a token of ``project``'s bucket: ``None`` when there was one, else the
        whole seconds (at least 1) until there is."""
        if self.rate <= 0:
            return None
        now = self.clock()
        with self._lock:
            bucket = self._buckets.pop(project, None)
            if bucket is None:
                self._make_room(now)
                bucket = _Bucket(self.burst, now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
            self._buckets[project] = bucket  # most recently used last
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return None
            return max(1, math.ceil((1 - bucket.tokens) / self.rate))

    def check(self, principal: Principal) -> None:
        """Take a token for ``principal``'s project.

        Raises:
            QuotaExceeded: The project's bucket is empty (429 with ``Retry-After``).
        """
        project = rate_key(principal)
        wait = self.take(project)
        if wait is not None:
            raise QuotaExceeded(
                f"project {project!r} sent more than {self.rate:g} requests per second "
                f"(burst {self.burst:g}) to this server (requests_per_s quota); retry after "
                f"{wait} s, spread the requests out, or ask an admin for a larger quota",
                quota="requests_per_s",
                retry_after_s=wait,
            )

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self.max_projects:
            return
        refill_s = self.burst / self.rate
        for name in [n for n, b in self._buckets.items() if now - b.at >= refill_s]:
            del self._buckets[name]  # full again: the same as no bucket
        while len(self._buckets) >= self.max_projects:
            self._buckets.popitem(last=False)
