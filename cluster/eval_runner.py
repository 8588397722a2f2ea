"""Computing an eval run on this replica: sample (``completions``), grade, count, record.

A run is an asyncio task on the replica's event loop (``EvalRuns``, at most
``JobLimits.eval_max_concurrent_runs`` at once, 429 beyond). It takes its rows in batches:
a ``completions`` run decodes each row's prompt on the replica's engine in the shared
batch, as ``/v1/chat/completions`` would (through the adapter the run names); every row
is then graded off the event loop (``grade`` of ``trainers.graders``, judges on the same
engine, python graders in the sandbox with the storage root hidden). Every
``HEARTBEAT_S`` it writes its record (counts so far, and the time: a heartbeat) and stops
if the stored run is no longer in progress (cancelled through another replica); past
``eval_run_timeout_s`` it fails with ``run_timeout``.

A run outlives nothing: when its replica stops (a restart, a scale-down), the work is
lost. Whoever reads such a run next (``settle``) marks it ``failed`` with
``run_interrupted``: at once on the replica that started it (its task is gone), after
``STALE_AFTER_S`` without a heartbeat elsewhere. Create the run again to recompute it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi.concurrency import run_in_threadpool

from rayft.cluster.eval_data import (
    CompletionsDataSource,
    MessageError,
    Row,
    render_messages,
)
from rayft.cluster.eval_results import (
    CriterionResult,
    ModelUsage,
    Tally,
    criterion_result,
    item_status,
)
from rayft.cluster.eval_store import EvalStore, RunRecord, new_id, now
from rayft.cluster.graders_api import EngineJudge
from rayft.serving.auth import Principal
from rayft.serving.errors import Overloaded, ServingError
from rayft.serving.service import ModelService
from rayft.trainers.grader_sandbox import SandboxLimits
from rayft.trainers.graders import GradeContext, grade

REPLICA = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
"""This replica, as run records name the one computing them."""
BATCH_ROWS = 8
"""Rows sampled and graded together (decoded in the shared batch)."""
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0
"""A run another replica has not written for this long lost its worker."""
OVERLOAD_WAIT_S = 0.25

log = logging.getLogger(__name__)


class EvalRuns:
    """The eval runs this replica computes now (at most ``limit``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def check_room(self) -> None:
        """Raise ``Overloaded`` (429) when ``limit`` runs are being computed."""
        if len(self.tasks) >= self.limit:
            raise Overloaded(
                f"this server computes at most {self.limit} eval runs at once; retry when one "
                "has ended",
                code="too_many_eval_runs",
            )

    def start(self, run_id: str, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task of the running event loop."""
        self.check_room()
        task = asyncio.get_running_loop().create_task(work, name=f"eval-run-{run_id}")
        self.tasks[run_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(run_id, None))

    def alive(self, run_id: str) -> bool:
        return run_id in self.tasks

    async def cancel(self, run_id: str, wait_s: float = 10.0) -> None:
        """Cancel the run's task if this replica runs it, and wait for it to record its end."""
        task = self.tasks.get(run_id)
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=wait_s)


def settle(record: RunRecord, runs: EvalRuns, at: float | None = None) -> RunRecord | None:
    """The record marked ``failed`` if its run is active but its worker is gone, else None.

    Gone: started on this replica and no task runs it (the replica restarted under the
    same name cannot happen: ``REPLICA`` is new per process); started on another replica
    that has not written it for ``STALE_AFTER_S``; or past its deadline by as long.
    """
    if not record.active:
        return None
    at = time.time() if at is None else at
    if record.replica == REPLICA:
        gone = not runs.alive(record.id)
    else:
        gone = at - record.heartbeat_at > STALE_AFTER_S
    gone = gone or (record.deadline_at > 0 and at > record.deadline_at + STALE_AFTER_S)
    if not gone:
        return None
    return record.model_copy(
        update={
            "status": "failed",
            "error": {
                "code": "run_interrupted",
                "message": "the replica computing this run stopped before it ended (a restart "
                "or a scale-down); create the run again to compute it",
            },
        }
    )


@dataclass
class RunPlan:
    """Everything a run needs, checked when it was created."""

    record: RunRecord
    graders: list[Any]
    rows: list[Row]
    principal: Principal
    source: CompletionsDataSource | None = None
    """The sampling settings of a ``completions`` run; ``None`` for ``jsonl``."""
    adapter: Any = None
    """The served adapter a ``completions`` run samples (``None``: the base model)."""
    max_completion_tokens: int = 16


@dataclass
class Sample:
    """One row's sample: the prompt and the answer (or why there is none)."""

    output_text: str
    messages: list[dict[str, str]] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: dict[str, str] | None = None


class RunJudge(EngineJudge):
    """The engine judge of a run: the run's principal, not a request's."""

    def __init__(self, service: ModelService, principal: Principal) -> None:
        self.service = service
        self.principal = principal


@dataclass
class Progress:
    """What a run has computed so far: its latest record and its output items."""

    record: RunRecord
    items: list[dict[str, Any]] = field(default_factory=list)


async def compute(plan: RunPlan, service: ModelService, store: EvalStore) -> None:
    """Compute the run of ``plan`` and record how it ended (re-raises only a cancel).

    A run that times out, fails or is cancelled keeps the counts and output items of the
    rows it finished.
    """
    progress = Progress(plan.record)
    timeout = max(0.0, plan.record.deadline_at - time.time())
    try:
        await asyncio.wait_for(_compute(plan, service, store, progress), timeout)
    except TimeoutError:
        error = {
            "code": "run_timeout",
            "message": "the run did not end within the server's eval_run_timeout_s; grade "
            "fewer rows per run",
        }
        await _end(store, progress, "failed", error)
    except asyncio.CancelledError:
        await _end(store, progress, "canceled", None)
        raise
    except Exception as err:  # noqa: BLE001 - a run's failure is its record, not a crash
        log.exception("eval run %s failed", plan.record.id)
        await _end(store, progress, "failed", {"code": "run_failed", "message": str(err)[:2000]})


async def _end(
    store: EvalStore, progress: Progress, status: str, error: dict[str, str] | None
) -> None:
    """Write the record's end and the items so far (a cancel or deletion already stored
    wins: nothing is written over it)."""
    update = {"status": status, "error": error, "heartbeat_at": time.time()}
    record = progress.record.model_copy(update=update)
    await run_in_threadpool(store.save_run, record, True, progress.items)


async def _beat(store: EvalStore, progress: Progress, work: asyncio.Task[Any]) -> None:
    """Every ``HEARTBEAT_S``, write the run's record (its counts so far and the time);
    cancel ``work`` when the stored run is no longer in progress (cancelled or deleted
    through another replica, or settled as failed)."""
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        progress.record = progress.record.model_copy(update={"heartbeat_at": time.time()})
        stored = await run_in_threadpool(store.save_run, progress.record, True)
        if stored is None or stored.status != "in_progress":
            work.cancel()
            return


async def _compute(
    plan: RunPlan, service: ModelService, store: EvalStore, progress: Progress
) -> None:
    progress.record = plan.record.model_copy(
        update={"status": "in_progress", "heartbeat_at": time.time()}
    )
    await run_in_threadpool(store.save_run, progress.record, True)
    work = asyncio.current_task()
    assert work is not None
    beat = asyncio.get_running_loop().create_task(_beat(store, progress, work))
    try:
        await _rows(plan, service, progress)
    finally:
        beat.cancel()
    await _end(store, progress, "completed", None)


async def _rows(plan: RunPlan, service: ModelService, progress: Progress) -> None:
    """Sample (a batch at a time) and grade (a row at a time) every row, counting."""
    tally = Tally([g.name for g in plan.graders])
    usage: dict[str, ModelUsage] = {}
    context = GradeContext(
        judge=RunJudge(service, plan.principal),
        sandbox=replace(
            SandboxLimits(),
            hidden_paths=(*SandboxLimits().hidden_paths, str(service.engine.storage.local)),
        ),
    )
    for start in range(0, len(plan.rows), BATCH_ROWS):
        batch = plan.rows[start : start + BATCH_ROWS]
        if plan.source is not None:
            samples = await asyncio.gather(*(_sample(plan, service, row) for row in batch))
        else:
            samples = [Sample(row.output_text) for row in batch]
        for offset, (row, sample) in enumerate(zip(batch, samples, strict=True)):
            index = start + offset
            results = await run_in_threadpool(_grade_row, plan, row, sample, context, index)
            status = item_status(results, sample.error is not None)
            tally.add(status, results)
            _count_usage(plan, sample, results, usage)
            progress.items.append(_output_item(plan, index, row, sample, results, status))
            progress.record = progress.record.model_copy(update=_progress(tally, usage))


def _progress(tally: Tally, usage: dict[str, ModelUsage]) -> dict[str, Any]:
    return {
        "result_counts": tally.result_counts(),
        "per_testing_criteria_results": tally.per_testing_criteria_results(),
        "per_model_usage": [u.usage_object() for u in usage.values()],
    }


def _count_usage(
    plan: RunPlan, sample: Sample, results: list[CriterionResult], usage: dict[str, ModelUsage]
) -> None:
    if plan.source is not None and sample.error is None:
        model = plan.source.model
        usage.setdefault(model, ModelUsage(model)).add(
            sample.prompt_tokens, sample.completion_tokens
        )
    for result in results:
        if result.judge_model is not None:
            judge = usage.setdefault(result.judge_model, ModelUsage(result.judge_model))
            judge.add(0, 0, total=result.judge_tokens)


async def _sample(plan: RunPlan, service: ModelService, row: Row) -> Sample:
    """Decode one row's prompt on the engine (errors become the sample's ``error``)."""
    from rayft.serving.engine import BASE_ADAPTER, GenerationRequest

    source = plan.source
    assert source is not None
    params = source.sampling_params
    try:
        messages = render_messages(source.input_messages, row.item)
    except MessageError as err:
        return Sample("", error={"code": "invalid_input_messages", "message": str(err)})
    try:
        ids = service.encode_chat(messages)
        room = service.engine.context_window - len(ids)
        sampling = service.sampling(
            len(ids),
            max(1, min(plan.max_completion_tokens, room)),
            1.0 if params.temperature is None else params.temperature,
            1.0 if params.top_p is None else params.top_p,
            params.seed,
            None,
        )
        name = plan.adapter.name if plan.adapter is not None else BASE_ADAPTER
        request = GenerationRequest(tuple(ids), name, sampling, plan.adapter)
        out = await _complete(service, request, plan.record.deadline_at)
    except ServingError as err:
        return Sample(
            "", messages, error={"code": err.code or "sample_failed", "message": err.message}
        )
    return Sample(
        out["text"],
        messages,
        out["finish_reason"] or "stop",
        out["prompt_tokens"],
        out["completion_tokens"],
    )


async def _complete(service: ModelService, request: Any, deadline_at: float) -> dict[str, Any]:
    """One row decoded; a full queue is waited out (until the run's deadline), not failed."""
    while True:
        try:
            return (await service.complete([request]))[0]
        except Overloaded:
            if time.time() > deadline_at:
                raise
            await asyncio.sleep(OVERLOAD_WAIT_S)


def _grade_row(
    plan: RunPlan, row: Row, sample: Sample, context: GradeContext, index: int
) -> list[CriterionResult]:
    """Every criterion's grade of one row (in a worker thread: python graders and judges
    block); none when the row has no sample."""
    if sample.error is not None:
        return []
    row_context = replace(context, row=index)
    return [
        criterion_result(grader, grade(grader, sample.output_text, row.item, row_context))
        for grader in plan.graders
    ]


def _output_item(
    plan: RunPlan,
    index: int,
    row: Row,
    sample: Sample,
    results: list[CriterionResult],
    status: str,
) -> dict[str, Any]:
    """OpenAI's ``eval.run.output_item`` of one row."""
    record, source = plan.record, plan.source
    params = source.sampling_params if source is not None else None
    output = [] if sample.error else [{"role": "assistant", "content": sample.output_text}]
    return {
        "object": "eval.run.output_item",
        "id": new_id("outputitem"),
        "run_id": record.id,
        "eval_id": record.eval_id,
        "created_at": now(),
        "status": status,
        "datasource_item_id": index,
        "datasource_item": row.item,
        "results": [r.result_object() for r in results],
        "sample": {
            "input": sample.messages,
            "output": output,
            "model": source.model if source is not None else None,
            "finish_reason": sample.finish_reason if source is not None else None,
            "max_completion_tokens": plan.max_completion_tokens if source is not None else None,
            "seed": params.seed if params is not None else None,
            "temperature": (params.temperature if params.temperature is not None else 1.0)
            if params is not None
            else None,
            "top_p": (params.top_p if params.top_p is not None else 1.0)
            if params is not None
            else None,
            "usage": {
                "prompt_tokens": sample.prompt_tokens,
                "completion_tokens": sample.completion_tokens,
                "total_tokens": sample.prompt_tokens + sample.completion_tokens,
                "cached_tokens": 0,
            },
            "error": sample.error,
        },
    }
