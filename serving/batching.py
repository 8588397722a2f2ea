"""Continuous batching across concurrent HTTP requests: one decode task per replica.

Every request submits its rows to the replica's single ``ModelEngine`` and waits on
its own asyncio queue. One background task steps the engine on a dedicated thread
(so the event loop keeps accepting requests while a forward pass runs) and routes
each step's outputs to the queues. Rows for different adapters therefore share every
forward pass, and a request that arrives mid-generation joins at the next step instead
of waiting for the batch to drain.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from rayft.serving.engine import GenerationRequest, ModelEngine, StepOutput, engine_error
from rayft.serving.errors import Overloaded, RequestTimeout, ServingError
from rayft.serving.metrics import NullMetrics
from rayft.serving.request_log import note_first_token

log = logging.getLogger(__name__)

T = TypeVar("T")


class DecodeLoop:
    """Owns the engine's thread and the background task that steps it.

    Args:
        engine: The replica's model engine.
        batch_wait_timeout_s: After idling, how long to wait for more requests before
            the first step, so a burst of requests starts in one batch.
        max_queued_rows: Rows (queued + running) beyond which new requests get 429.
        request_timeout_s: Deadline of every request.
        metrics: Told the queued and running rows after every step.
    """

    def __init__(
        self,
        engine: ModelEngine,
        batch_wait_timeout_s: float = 0.005,
        max_queued_rows: int = 2048,
        request_timeout_s: float = 600.0,
        metrics: NullMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics or NullMetrics()
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_queued_rows = max_queued_rows
        self.request_timeout_s = request_timeout_s
        # One thread: the engine's model and adapter set are touched by one thread only.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rayft-decode")
        self._routes: dict[int, tuple[asyncio.Queue, int]] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.steps = 0
        self.rows_per_step_total = 0

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def run_exclusive(
        self,
        fn: Callable[..., T],
        *args: Any,
        deadline: float | None = None,
        stop: threading.Event | None = None,
    ) -> T:
        """Run ``fn(*args)`` on the engine's thread, between decode steps.

        Args:
            fn: The work; it runs alone on the engine's thread.
            deadline: When the work must be done (``deadline()``); default
                ``request_timeout_s`` from now.
            stop: An event ``fn`` watches: set at the deadline, so work still queued or
                running stops there instead of holding the engine's thread.

        Raises:
            RequestTimeout: ``fn`` did not finish by the deadline (work not started yet is
                dropped; work under way stops when it next looks at ``stop``, or runs
                to its end when it takes none).
            ServingError: What ``fn`` raised for its input, or a 503 ``engine_error``
                when it failed in any other way.
        """
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._executor, fn, *args)
        limit = self.request_timeout_s if deadline is None else deadline - loop.time()
        try:
            return await asyncio.wait_for(work, max(0.0, limit))
        except asyncio.TimeoutError:
            if stop is not None:
                stop.set()
            raise self._timeout() from None
        except ServingError:
            raise
        except Exception as err:  # noqa: BLE001 - the engine failed, not the request
            log.exception("%s failed on the engine thread", getattr(fn, "__name__", fn))
            raise engine_error(err, getattr(fn, "__name__", "engine work")) from None

    def deadline(self) -> float:
        """The event-loop time by which a request starting now must be answered."""
        return asyncio.get_running_loop().time() + self.request_timeout_s

    async def stream(
        self, requests: list[GenerationRequest], deadline: float | None = None
    ) -> AsyncIterator[tuple[int, StepOutput]]:
        """Decode rows together with every other request's rows.

        Yields:
            ``(index into requests, output)`` as steps complete; each row's last output
            has ``finished`` set. A row still unfinished at the request's deadline
            (``deadline``, default ``request_timeout_s`` from now) ends with a
            ``RequestTimeout`` error output. Rows still running when the consumer stops
            (a client that disconnected, or the deadline) are cancelled, and their
            routes removed.

        Raises:
            Overloaded: Too many rows are already queued.
        """
        self._start()
        self.check_capacity(len(requests))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout_s if deadline is None else deadline
        queue: asyncio.Queue = asyncio.Queue()
        routed: list[int] = []
        remaining: dict[int, int] = {}  # request id -> index, until its row finished
        try:
            for index, request in enumerate(requests):
                rid = self.engine.submit(request)
                self._routes[rid] = (queue, index)
                routed.append(rid)
                remaining[rid] = index
            assert self._wake is not None
            self._wake.set()
            self._report_rows()
            while remaining:
                try:
                    rid, index, out = await asyncio.wait_for(
                        queue.get(), max(0.0, deadline - loop.time())
                    )
                except asyncio.TimeoutError:
                    timeout = self._timeout()
                    for rid, index in list(remaining.items()):
                        yield index, _failed(rid, requests[index], timeout)
                    return  # the rows still unfinished are cancelled below
                if out.finished:
                    remaining.pop(rid, None)
                if out.token is not None:
                    note_first_token()
                yield index, out
        finally:
            for rid in routed:
                self._routes.pop(rid, None)
            for rid in remaining:
                self.engine.cancel(rid)

    def _timeout(self) -> RequestTimeout:
        return RequestTimeout(
            f"the request did not finish within this server's deadline of "
            f"{self.request_timeout_s:g} s (request_timeout_s); ask for fewer tokens or retry",
            code="request_timeout",
        )

    def check_capacity(self, rows: int) -> None:
        """Raise ``Overloaded`` (429) when ``rows`` more would exceed the queue limit.

        Streaming routes call this before sending response headers, so a full queue is
        a clean 429 rather than a broken stream.
        """
        if len(self._routes) + rows > self.max_queued_rows:
            raise Overloaded(
                f"the server is at its limit of {self.max_queued_rows} queued rows; retry later",
                code="queue_full",
            )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            if not self.engine.has_work():
                self._wake.clear()
                # Re-check after clearing: a submit between the check and clear() set it.
                if not self.engine.has_work():
                    await self._wake.wait()
                if self.batch_wait_timeout_s > 0:
                    await asyncio.sleep(self.batch_wait_timeout_s)
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as err:  # noqa: BLE001 - the engine fails only the rows it touched;
                # anything that escapes it leaves no row whose state is known, so every open
                # request gets its answer now rather than waiting for its deadline.
                log.exception("decode step failed")
                failure = engine_error(err, "a decode step")
                outputs = await loop.run_in_executor(self._executor, self.engine.abort_all, failure)
                self._fail_routes(failure, {o.request_id for o in outputs})
            self.steps += 1
            self.rows_per_step_total += len(outputs)
            self._report_rows()
            for out in outputs:
                route = self._routes.get(out.request_id)
                if route is not None:
                    queue, index = route
                    queue.put_nowait((out.request_id, index, out))

    def _report_rows(self) -> None:
        load = self.engine.load()
        self.metrics.set_rows(load["queued_rows"], load["running_rows"])

    def _fail_routes(self, failure: ServingError, already: set[int]) -> None:
        for rid, (queue, index) in list(self._routes.items()):
            if rid not in already:
                out = StepOutput(rid, "", True, "error", 0, 0, failure)
                queue.put_nowait((rid, index, out))

    def stats(self) -> dict[str, int]:
        """Decode steps taken and row outputs produced (their ratio is the mean batch size),
        and the rows open now: routed to a waiting request, queued and running."""
        return {
            "decode_steps": self.steps,
            "decoded_rows": self.rows_per_step_total,
            "open_routes": len(self._routes),
            **self.engine.load(),
        }

    def close(self) -> None:
        """Stop the background task and the engine thread."""
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _failed(rid: int, request: GenerationRequest, err: ServingError) -> StepOutput:
    return StepOutput(rid, "", True, "error", len(request.prompt_ids), 0, err)
