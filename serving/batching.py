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
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from rayft.serving.engine import GenerationRequest, ModelEngine, StepOutput
from rayft.serving.errors import Overloaded, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


class DecodeLoop:
    """Owns the engine's thread and the background task that steps it.

    Args:
        engine: The replica's model engine.
        batch_wait_timeout_s: After idling, how long to wait for more requests before
            the first step, so a burst of requests starts in one batch.
        max_queued_rows: Rows (queued + running) beyond which new requests get 429.
    """

    def __init__(
        self, engine: ModelEngine, batch_wait_timeout_s: float = 0.005, max_queued_rows: int = 1024
    ) -> None:
        self.engine = engine
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_queued_rows = max_queued_rows
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

    async def run_exclusive(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine's thread, between decode steps."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def stream(
        self, requests: list[GenerationRequest]
    ) -> AsyncIterator[tuple[int, StepOutput]]:
        """Decode rows together with every other request's rows.

        Yields:
            ``(index into requests, output)`` as steps complete; each row's last output
            has ``finished`` set. Rows still running when the consumer stops (a client
            that disconnected) are cancelled.

        Raises:
            Overloaded: Too many rows are already queued.
        """
        self._start()
        self.check_capacity(len(requests))
        queue: asyncio.Queue = asyncio.Queue()
        ids = []
        for index, request in enumerate(requests):
            rid = self.engine.submit(request)
            self._routes[rid] = (queue, index)
            ids.append(rid)
        assert self._wake is not None
        self._wake.set()
        remaining = set(ids)
        try:
            while remaining:
                rid, index, out = await queue.get()
                if out.finished:
                    remaining.discard(rid)
                yield index, out
        finally:
            for rid in ids:
                self._routes.pop(rid, None)
            for rid in remaining:
                self.engine.cancel(rid)

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
            except Exception as err:  # noqa: BLE001 - fail the batch, keep the replica serving
                log.exception("decode step failed")
                failure = Unavailable(
                    f"generation failed on this replica ({type(err).__name__}: {err}); retry",
                    code="generation_failed",
                )
                outputs = await loop.run_in_executor(self._executor, self.engine.abort_all, failure)
            self.steps += 1
            self.rows_per_step_total += len(outputs)
            for out in outputs:
                route = self._routes.get(out.request_id)
                if route is not None:
                    queue, index = route
                    queue.put_nowait((out.request_id, index, out))

    def stats(self) -> dict[str, int]:
        """Decode steps taken and row outputs produced; their ratio is the mean batch size."""
        return {"decode_steps": self.steps, "decoded_rows": self.rows_per_step_total}

    def close(self) -> None:
        """Stop the background task and the engine thread."""
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
