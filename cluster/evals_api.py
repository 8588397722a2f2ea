"""OpenAI's evals API, computed on this replica's engine with the graders of
``trainers.graders``.

    POST   /v1/evals                                          create (criteria are graders)
    GET    /v1/evals                                          list (after, limit, order, order_by)
    GET    /v1/evals/{eval_id}
    POST   /v1/evals/{eval_id}                                update name / metadata
    DELETE /v1/evals/{eval_id}                                with its runs
    POST   /v1/evals/{eval_id}/runs                           jsonl | completions data source
    GET    /v1/evals/{eval_id}/runs                           list (after, limit, order, status)
    GET    /v1/evals/{eval_id}/runs/{run_id}
    POST   /v1/evals/{eval_id}/runs/{run_id}/cancel
    DELETE /v1/evals/{eval_id}/runs/{run_id}
    GET    /v1/evals/{eval_id}/runs/{run_id}/output_items     list (after, limit, order, status)
    GET    /v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}

They answer as OpenAI's do, so ``client.evals.*`` of the unchanged ``openai`` client works.
A key sees only its project's evals (404 for another's, as for none); an ``inference`` key
gets 403 (``serving.auth.permits``). Bodies are checked by ``cluster.eval_data`` (400
naming the key), bounds by ``JobLimits.eval_*`` (400 ``eval_limit_exceeded``, 429 when the
replica computes ``eval_max_concurrent_runs`` runs). A run is computed in the background
on this replica (``cluster.eval_runner``: what happens to it when the replica stops is
said there); ``/v1/evaluations`` is a separate, older surface and stays as it is.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from rayft.cluster.eval_data import (
    CompletionsDataSource,
    FileContentSource,
    Row,
    config_object,
    parse_criterion,
    parse_eval,
    parse_run,
    parse_update,
    read_rows,
    uses_sample,
)
from rayft.cluster.eval_runner import REPLICA, EvalRuns, RunPlan, compute, settle
from rayft.cluster.eval_store import EvalRecord, EvalStore, RunRecord, new_id, now
from rayft.cluster.files_service import FileStore, id_page, limit_param
from rayft.cluster.job_body import load_json
from rayft.serving.errors import BadRequest, NotFound, ServingError
from rayft.serving.openai_api import get_principal
from rayft.serving.service import ModelService
from rayft.trainers.graders import judge_models
from rayft.trainers.job_limits import JobLimits

router = APIRouter()

RUN_STATUSES = ("queued", "in_progress", "completed", "canceled", "failed")
ITEM_STATUSES = ("pass", "fail")


def _service(request: Request) -> ModelService:
    return request.app.state.service


def _limits(request: Request) -> JobLimits:
    return _service(request).limits.job_limits


def _store(request: Request) -> EvalStore:
    """The evals the request's key may see and change (its project's)."""
    return EvalStore(_service(request).engine.storage, get_principal(request))


def _runs(request: Request) -> EvalRuns:
    """The replica's eval runs in flight, made on first use."""
    runs = getattr(request.app.state, "eval_runs", None)
    if runs is None:
        runs = EvalRuns(_limits(request).eval_max_concurrent_runs)
        request.app.state.eval_runs = runs
    return runs


def _listing(request: Request, items: list[dict[str, Any]], default_limit: int = 20) -> dict:
    """OpenAI's cursor page of ``items`` (oldest first; ``order=desc`` for newest first)."""
    params = request.query_params
    order = params.get("order", "asc")
    if order not in ("asc", "desc"):
        raise BadRequest(f"order is {order!r}; use asc or desc", param="order")
    if order == "desc":
        items = items[::-1]
    return id_page(items, params.get("after"), limit_param(params.get("limit"), default_limit))


def _choice(request: Request, name: str, allowed: tuple[str, ...]) -> str | None:
    value = request.query_params.get(name)
    if value is not None and value not in allowed:
        raise BadRequest(f"{name} is {value!r}; use one of {', '.join(allowed)}", param=name)
    return value


# --------------------------------------------------------------------- evals


@router.post("/v1/evals")
async def create_eval(request: Request) -> dict[str, Any]:
    """Check the config and every criterion (as graders), then record the eval."""
    create, graders = parse_eval(
        load_json(await request.body()), _limits(request).eval_max_criteria
    )
    principal, eval_id, at = get_principal(request), new_id("eval"), now()
    record = EvalRecord(
        id=eval_id,
        created_at=at,
        updated_at=at,
        name=create.name or f"eval-{eval_id[-8:]}",
        metadata=create.metadata,
        data_source_config=config_object(create.data_source_config),
        testing_criteria=[g.model_dump(mode="json", exclude_none=True) for g in graders],
        project=principal.project,
        key_id=principal.key_id,
    )
    await run_in_threadpool(_store(request).save_eval, record)
    return record.eval_object()


@router.get("/v1/evals")
def list_evals(request: Request) -> dict[str, Any]:
    order_by = _choice(request, "order_by", ("created_at", "updated_at")) or "created_at"
    records = _store(request).list_evals()
    records.sort(key=lambda r: (getattr(r, order_by), r.id))
    return _listing(request, [r.eval_object() for r in records])


@router.get("/v1/evals/{eval_id}")
def retrieve_eval(eval_id: str, request: Request) -> dict[str, Any]:
    return _store(request).get_eval(eval_id).eval_object()


@router.post("/v1/evals/{eval_id}")
async def update_eval(eval_id: str, request: Request) -> dict[str, Any]:
    """A new ``name`` and/or ``metadata`` (``metadata`` replaces the old one whole)."""
    update = parse_update(load_json(await request.body()))
    store = _store(request)
    record = await run_in_threadpool(store.get_eval, eval_id)
    changes: dict[str, Any] = {"updated_at": now()}
    if update.name is not None:
        changes["name"] = update.name
    if "metadata" in update.model_fields_set:
        changes["metadata"] = update.metadata
    record = await run_in_threadpool(store.save_eval, record.model_copy(update=changes))
    return record.eval_object()


@router.delete("/v1/evals/{eval_id}")
async def delete_eval(eval_id: str, request: Request) -> dict[str, Any]:
    """Delete the eval with its runs (runs computing here are cancelled first)."""
    store, runs = _store(request), _runs(request)
    for record in await run_in_threadpool(store.list_runs, eval_id):
        await runs.cancel(record.id)
    await run_in_threadpool(store.delete_eval, eval_id)
    return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}


# ---------------------------------------------------------------------- runs


@router.post("/v1/evals/{eval_id}/runs")
async def create_run(eval_id: str, request: Request) -> dict[str, Any]:
    """Check the run against its eval and this server, record it, and start computing it."""
    run = parse_run(load_json(await request.body()))
    store, runs, limits = _store(request), _runs(request), _limits(request)
    runs.check_room()
    evaluation = await run_in_threadpool(store.get_eval, eval_id)
    graders = [
        parse_criterion(c, f"testing_criteria.{i}")
        for i, c in enumerate(evaluation.testing_criteria)
    ]
    rows = await run_in_threadpool(_rows, request, run.data_source.source, limits.eval_max_rows)
    plan = RunPlan(
        record=_new_run(request, eval_id, run, limits),
        graders=graders,
        rows=rows,
        principal=get_principal(request),
    )
    _check_judges(request, graders)
    data = run.data_source
    if isinstance(data, CompletionsDataSource):
        _plan_sampling(request, plan, data, limits)
    elif uses_sample(graders):
        missing = next((i for i, row in enumerate(rows) if row.sample is None), None)
        if missing is not None:
            raise BadRequest(
                f"row {missing} has no 'sample', which the eval's criteria read "
                "({{ sample... }}); give each row a sample, or run a 'completions' data source",
                param="data_source.source",
            )
    await run_in_threadpool(store.save_run, plan.record)
    runs.start(plan.record.id, compute(plan, _service(request), store))
    return plan.record.run_object()


def _new_run(request: Request, eval_id: str, run: Any, limits: JobLimits) -> RunRecord:
    principal, run_id = get_principal(request), new_id("evalrun")
    data = run.data_source
    model = data.model if isinstance(data, CompletionsDataSource) else None
    started = time.time()
    return RunRecord(
        id=run_id,
        eval_id=eval_id,
        created_at=int(started),
        name=run.name or f"{model or 'jsonl'}-{run_id[-8:]}",
        model=model,
        metadata=run.metadata,
        data_source=data.model_dump(mode="json", exclude_none=True),
        project=principal.project,
        key_id=principal.key_id,
        replica=REPLICA,
        heartbeat_at=started,
        deadline_at=started + limits.eval_run_timeout_s,
    )


def _rows(request: Request, source: Any, limit: int) -> list[Row]:
    """The run's rows: inline, or read from an uploaded file the key may see."""
    if isinstance(source, FileContentSource):
        if len(source.content) > limit:
            raise BadRequest(
                f"data_source.source.content holds {len(source.content)} rows; this server "
                f"grades at most {limit} rows per eval run",
                code="eval_limit_exceeded",
                param="data_source.source.content",
            )
        return [Row(row.item, row.sample) for row in source.content]
    service = _service(request)
    files = FileStore(service.engine.storage, service.limits.max_file_bytes, get_principal(request))
    try:
        path = files.content(source.id)
    except NotFound:
        raise BadRequest(
            f"data_source.source.id {source.id!r} is not an uploaded file; upload the rows with "
            "POST /v1/files (purpose evals) and pass the returned id",
            code="invalid_file",
            param="data_source.source.id",
        ) from None
    try:
        return read_rows(path, limit)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise BadRequest(f"{source.id}: {err}", param="data_source.source.id") from None


def _plan_sampling(
    request: Request, plan: RunPlan, data: CompletionsDataSource, limits: JobLimits
) -> None:
    """The adapter and token bound of a ``completions`` run (4xx naming the key when bad)."""
    service = _service(request)
    try:
        plan.adapter = service.served_adapter(data.model, plan.principal)
    except ServingError as err:
        err.param = "data_source.model"
        raise
    cap = min(limits.eval_max_completion_tokens, service.limits.max_tokens_limit)
    asked = data.sampling_params.max_completion_tokens
    if asked is not None and asked > cap:
        raise BadRequest(
            f"max_completion_tokens is {asked}; this server allows at most {cap} per eval sample",
            code="eval_limit_exceeded",
            param="data_source.sampling_params.max_completion_tokens",
        )
    plan.source = data
    plan.max_completion_tokens = asked or cap


def _check_judges(request: Request, graders: list[Any]) -> None:
    """Every judge model is one this server serves to this key (else its 4xx, naming it)."""
    service, principal = _service(request), get_principal(request)
    for grader in graders:
        for model in judge_models(grader):
            try:
                service.served_adapter(model, principal)
            except ServingError as err:
                err.message = f"testing criterion {grader.name!r}'s judge model: {err.message}"
                err.param = "testing_criteria"
                raise


def _settled(store: EvalStore, runs: EvalRuns, record: RunRecord) -> RunRecord:
    """``record``, marked failed (and stored so) if its worker is gone."""
    failed = settle(record, runs)
    if failed is None:
        return record
    return store.save_run(failed, only_active=True) or failed


@router.get("/v1/evals/{eval_id}/runs")
def list_runs(eval_id: str, request: Request) -> dict[str, Any]:
    status = _choice(request, "status", RUN_STATUSES)
    store, runs = _store(request), _runs(request)
    records = [_settled(store, runs, r) for r in store.list_runs(eval_id)]
    items = [r.run_object() for r in records if status is None or r.status == status]
    return _listing(request, items)


@router.get("/v1/evals/{eval_id}/runs/{run_id}")
def retrieve_run(eval_id: str, run_id: str, request: Request) -> dict[str, Any]:
    store = _store(request)
    return _settled(store, _runs(request), store.get_run(eval_id, run_id)).run_object()


@router.post("/v1/evals/{eval_id}/runs/{run_id}/cancel")
async def cancel_run(eval_id: str, run_id: str, request: Request) -> dict[str, Any]:
    """Stop an active run; it keeps the counts and items of the rows it finished."""
    return (await _cancel(request, eval_id, run_id)).run_object()


async def _cancel(request: Request, eval_id: str, run_id: str) -> RunRecord:
    store, runs = _store(request), _runs(request)
    record = await run_in_threadpool(store.get_run, eval_id, run_id)
    if not record.active:
        return record
    await runs.cancel(run_id)  # a run computing here records its own end
    canceled = record.model_copy(update={"status": "canceled", "error": None})
    await run_in_threadpool(store.save_run, canceled, True)  # one computed elsewhere
    return await run_in_threadpool(store.get_run, eval_id, run_id)


@router.delete("/v1/evals/{eval_id}/runs/{run_id}")
async def delete_run(eval_id: str, run_id: str, request: Request) -> dict[str, Any]:
    await _cancel(request, eval_id, run_id)
    await run_in_threadpool(_store(request).delete_run, eval_id, run_id)
    return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}


# -------------------------------------------------------------- output items


@router.get("/v1/evals/{eval_id}/runs/{run_id}/output_items")
def list_output_items(eval_id: str, run_id: str, request: Request) -> dict[str, Any]:
    """The run's output items in data-source order (written when the run ends)."""
    status = _choice(request, "status", ITEM_STATUSES)
    items = _store(request).read_items(eval_id, run_id)
    return _listing(request, [i for i in items if status is None or i["status"] == status])


@router.get("/v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}")
def retrieve_output_item(
    eval_id: str, run_id: str, output_item_id: str, request: Request
) -> dict[str, Any]:
    for item in _store(request).read_items(eval_id, run_id):
        if item["id"] == output_item_id:
            return item
    raise NotFound(
        f"no output item {output_item_id!r} in run {run_id!r}",
        code="output_item_not_found",
        param="output_item_id",
    )
