"""OpenAI's grader routes, with the graders of ``trainers.graders``.

    POST /v1/fine_tuning/alpha/graders/run        {grader, model_sample, item} -> reward
    POST /v1/fine_tuning/alpha/graders/validate   {grader} -> {grader}

They answer as OpenAI's do, so ``client.fine_tuning.alpha.graders.run(...)`` and
``.validate(...)`` of the unchanged ``openai`` client work. A grader that is not valid
JSON for this server is a 400 naming its key (``param``); a ``score_model`` or
``label_model`` grader whose judge ``model`` this server does not serve (or the key's
project may not see) is answered as ``/v1/chat/completions`` answers that model (404 /
400 / 409) before anything is graded. A grader that fails while grading (a python grader
that raises or breaks a limit, a judge answer that does not parse) is not an HTTP error:
its reward is 0 and ``metadata.errors`` says what happened, as OpenAI reports it.

The judge is the replica's own engine (``EngineJudge``), reached from the grading thread
through the event loop. Python graders run one process per call under
``trainers.grader_sandbox`` with the storage root hidden; at most ``MAX_CONCURRENT_RUNS``
runs grade at once per replica (429 beyond).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import anyio.from_thread
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from rayft.cluster.job_body import load_json
from rayft.cluster.uploads import UploadSlots
from rayft.serving.errors import BadRequest, Overloaded, ServingError
from rayft.serving.openai_api import get_principal
from rayft.serving.service import ModelService
from rayft.trainers.grader_sandbox import SandboxLimits
from rayft.trainers.graders import (
    JUDGE_MAX_TOKENS,
    GradeContext,
    GraderError,
    GradeResult,
    JudgeError,
    JudgeReply,
    SamplingParams,
    grade,
    judge_models,
    parse_grader,
)

router = APIRouter()

MAX_CONCURRENT_RUNS = 4
"""Grader runs one replica grades at once; one more is answered 429."""
MAX_SAMPLE_CHARS = 1 << 20

_RUN_KEYS = {"grader", "model_sample", "item"}


def _service(request: Request) -> ModelService:
    return request.app.state.service


def _grader(body: Any) -> Any:
    """The typed grader of a request body's ``grader`` (400 naming the key when bad)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with a 'grader'", param="grader")
    if "grader" not in body:
        raise BadRequest("grader is required", code="invalid_grader", param="grader")
    try:
        return parse_grader(body["grader"])
    except GraderError as err:
        raise BadRequest(err.message, code="invalid_grader", param=err.param) from None


def _check_judges(grader: Any, service: ModelService, request: Request) -> None:
    """Every judge model is one this server serves to this key (else its 4xx, naming it)."""
    principal = get_principal(request)
    for model in judge_models(grader):
        try:
            service.served_adapter(model, principal)
        except ServingError as err:
            err.message = f"the grader's judge model: {err.message}"
            err.param = err.param or "grader.model"
            raise


@router.post("/v1/fine_tuning/alpha/graders/validate")
async def validate_grader(request: Request) -> dict[str, Any]:
    """The grader as this server reads it, or a 400 naming what to change."""
    body = load_json(await request.body())
    grader = _grader(body)
    unknown = sorted(set(body) - {"grader"})
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; send only 'grader'", param=unknown[0])
    return {"grader": grader.model_dump(mode="json", exclude_none=True)}


@router.post("/v1/fine_tuning/alpha/graders/run")
async def run_grader(request: Request) -> dict[str, Any]:
    """Grade one model sample against one item: OpenAI's ``GraderRunResponse``."""
    body = load_json(await request.body())
    grader = _grader(body)
    unknown = sorted(set(body) - _RUN_KEYS)
    if unknown:
        raise BadRequest(
            f"unknown field {unknown[0]!r}; send grader, model_sample and item", param=unknown[0]
        )
    sample = body.get("model_sample")
    if not isinstance(sample, str) or len(sample) > MAX_SAMPLE_CHARS:
        raise BadRequest(
            f"model_sample must be a string of at most {MAX_SAMPLE_CHARS} characters",
            param="model_sample",
        )
    item = body.get("item", {})
    service = _service(request)
    _check_judges(grader, service, request)
    context = GradeContext(
        judge=EngineJudge(service, request),
        sandbox=replace(
            SandboxLimits(),
            hidden_paths=(*SandboxLimits().hidden_paths, str(service.engine.storage.local)),
        ),
    )
    with _run_slots(request).taken():
        result = await run_in_threadpool(grade, grader, sample, item, context)
    return run_response(grader, result)


def _run_slots(request: Request) -> UploadSlots:
    slots = getattr(request.app.state, "grader_slots", None)
    if slots is None:
        slots = _GraderSlots(MAX_CONCURRENT_RUNS)
        request.app.state.grader_slots = slots
    return slots


class _GraderSlots(UploadSlots):
    """``UploadSlots`` for grader runs, with their own 429."""

    def taken(self) -> Any:
        if self.active >= self.limit:
            raise Overloaded(
                f"this server grades at most {self.limit} grader runs at once; retry shortly",
                code="too_many_grader_runs",
            )
        return super().taken()


def run_response(grader: Any, result: GradeResult) -> dict[str, Any]:
    """``result`` in the shape of OpenAI's ``GraderRunResponse``."""
    usage = {}
    if result.sampled_model_name is not None:
        usage[result.sampled_model_name] = {"total_tokens": result.token_usage}
    return {
        "reward": result.score,
        "sub_rewards": dict(result.sub_scores),
        "model_grader_token_usage_per_model": usage,
        "metadata": {
            "name": grader.name,
            "type": grader.type,
            "errors": result.metadata_errors(),
            "execution_time": result.execution_time,
            "scores": dict(result.sub_scores) or {grader.name: result.score},
            "token_usage": result.token_usage if result.sampled_model_name else None,
            "sampled_model_name": result.sampled_model_name,
        },
    }


class EngineJudge:
    """A judge that runs on this replica's engine, called from a grading thread.

    Each call hops to the event loop (``anyio.from_thread``) and decodes one chat
    completion in the shared batch, as ``/v1/chat/completions`` would.
    """

    def __init__(self, service: ModelService, request: Request) -> None:
        self.service = service
        self.principal = get_principal(request)

    def __call__(
        self, model: str, messages: list[dict[str, str]], params: SamplingParams | None
    ) -> JudgeReply:
        return anyio.from_thread.run(self._complete, model, messages, params)

    async def _complete(
        self, model: str, messages: list[dict[str, str]], params: SamplingParams | None
    ) -> JudgeReply:
        from rayft.serving.engine import BASE_ADAPTER, GenerationRequest

        service, params = self.service, params or SamplingParams()
        try:
            adapter = service.served_adapter(model, self.principal)
            ids = service.encode_chat(messages)
            limit = service.limits.max_tokens_limit
            max_tokens = min(params.max_completions_tokens or JUDGE_MAX_TOKENS, limit)
            room = service.engine.context_window - len(ids)
            sampling = service.sampling(
                len(ids),
                max(1, min(max_tokens, room)),
                0.0 if params.temperature is None else params.temperature,
                1.0 if params.top_p is None else params.top_p,
                params.seed,
                None,
            )
            name = adapter.name if adapter is not None else BASE_ADAPTER
            rows = await service.complete([GenerationRequest(tuple(ids), name, sampling, adapter)])
        except ServingError as err:
            raise JudgeError(f"{model}: {err.message}") from None
        row = rows[0]
        return JudgeReply(row["text"], len(ids) + row["completion_tokens"])
