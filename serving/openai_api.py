"""The OpenAI-compatible HTTP API: routes, request/response schemas, SSE streaming, errors.

The route table (module-level handlers on ``router``; ``create_api(service)`` mounts them
around one ``ModelService``, which handlers reach through ``request.app.state``):

    GET  /health                  liveness (no key); with an admin key, the adapters this
                                  replica holds, its pid and queue figures
    GET  /v1/models               base model and every published adapter trained on it
    GET  /v1/models/{model}
    POST /v1/completions          ``model`` = base or adapter name; ``stream`` → SSE;
                                  ``echo`` / ``logprobs`` / ``max_tokens: 0`` → token
                                  log-probabilities (``serving.logprobs``), as lm-eval reads them
    POST /v1/chat/completions     rendered with the base model's chat template
    POST /v1/evaluations          loss / perplexity / generation metrics over rows, a
                                  registry dataset, or the request log's traffic
    POST /v1/classifications      labels with probabilities from a classification
                                  adapter (``serving.classify``)

``create_api(service, routers)`` also includes the routers it is given: the rayft service
app (``cluster.service_app``) adds OpenAI's files and fine-tuning jobs routes
(``cluster.fine_tuning_api``), which belong to the control plane, not to serving.

Every request passes ``serving.metrics.RequestMonitor`` (outermost), which counts it
in the Prometheus metrics and writes its request-log line, whatever answered it.

Completions and chat completions differ only in how a prompt is encoded and how a
choice is shaped (``_COMPLETION`` / ``_CHAT``); both go through ``_generate``, which
turns encoded prompts and sampling settings into a response or an SSE stream.

Streams are ``data: {chunk}\\n\\n`` lines ending with ``data: [DONE]\\n\\n``, as OpenAI
sends them. Every error is ``{"error": {"message", "type", "param", "code"}}``: malformed
JSON is 400, a body that does not fit the schema 422, unknown models 404, adapters of
another base 409, an adapter whose manifest is unreadable 422, oversized bodies (declared
or chunked) 413, a full queue 429 with ``Retry-After``, missing/wrong/revoked/expired API
key 401, a key whose role may not call the route 403 ``permission_denied``, a
failure inside the engine 503 ``engine_error``, a request past its deadline 503
``request_timeout``. A stream that fails after its headers ends with one error event,
then ``data: [DONE]``.
Request fields that OpenAI defines but rayft does not use (``user``, ``metadata`` ...)
are accepted and ignored, so unchanged OpenAI clients work.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayft.serving.auth import Principal, bearer_token, permits
from rayft.serving.engine import BASE_ADAPTER, GenerationRequest, ServedAdapter, StepOutput
from rayft.serving.errors import (
    BadRequest,
    Forbidden,
    InvalidParameters,
    QuotaExceeded,
    ServingError,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from rayft.serving.http_guard import Admission, HttpGuard
from rayft.serving.logprobs import MAX_LOGPROBS, TokenScores, completion_ids, legacy_logprobs
from rayft.serving.metrics import RequestMonitor
from rayft.serving.rate_limit import ProjectRates
from rayft.serving.request_log import LogDataset, note_error, note_principal, note_usage
from rayft.serving.service import ModelService
from rayft.trainers.storage import StorageError
from rayft.trainers.validation_errors import error_key

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
RETRY_AFTER_S = 1


class _Body(BaseModel):
    # Strict: "5" is not an integer and "true" is not a boolean, as in OpenAI's API.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    # Any 64-bit seed (signed or not); choice i of n is seeded seed + i, modulo 2**64.
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    user: str | None = None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` body (OpenAI's legacy completions).

    ``max_tokens: 0`` generates nothing (with ``echo``: the prompt is scored only);
    ``logprobs: k`` (at most ``MAX_LOGPROBS``) reports each token's log-probability and the
    ``k`` likeliest alternatives (``serving.logprobs``).
    """

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)


class EvaluationRequest(_Body):
    """``POST /v1/evaluations`` body."""

    model: str
    rows: list[dict[str, Any]] | None = None
    # A registry dataset name, or {"request_log": {...}}: requests this server answered.
    dataset: str | LogDataset | None = None
    metrics: list[str] = Field(default_factory=lambda: ["loss", "perplexity"])
    format: Literal["auto", "chat", "prompt_completion", "alpaca", "text"] = "auto"
    max_tokens: int = Field(128, ge=1)
    max_seq_len: int | None = Field(None, ge=8)


class ClassificationRequest(_Body):
    """``POST /v1/classifications`` body: one text or a list of texts."""

    model: str
    input: str | list[str]


REQUEST_MODELS = (
    CompletionRequest,
    ChatCompletionRequest,
    EvaluationRequest,
    ClassificationRequest,
)
"""The bodies FastAPI validates for these routes (their union tags leave error locations)."""


def error_response(err: ServingError) -> JSONResponse:
    """``err`` as an HTTP response in OpenAI's error shape (429s say when to retry)."""
    retry = err.retry_after_s if isinstance(err, QuotaExceeded) else RETRY_AFTER_S
    headers = {"Retry-After": str(retry)} if err.status == 429 and retry is not None else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def get_service(request: Request) -> ModelService:
    """The replica's ``ModelService`` (a FastAPI dependency of every route)."""
    return request.app.state.service


def scope_principal(scope: dict[str, Any]) -> Principal | None:
    """Who the request acts as, as ``RequestGuard`` resolved its key (``None``: no valid key)."""
    return (scope.get("state") or {}).get("principal")


def get_principal(request: Request) -> Principal:
    """The request's ``Principal`` (a FastAPI dependency of every route that needs a key)."""
    principal = scope_principal(request.scope)
    if principal is None:  # only /health passes the guard without one
        raise Unauthorized("missing or invalid API key", code="invalid_api_key")
    return principal


router = APIRouter()


# ------------------------------------------------------------------ routes


@router.get("/health")
async def health(request: Request, service: ModelService = Depends(get_service)) -> dict[str, Any]:
    """Liveness, for anyone; what this replica holds, for an admin key (or an open server).

    The one route that needs no API key.
    """
    principal = scope_principal(request.scope)
    if principal is None or not principal.is_admin:
        return {"status": "ok"}
    return service.health()


@router.get("/v1/models")
async def models(
    service: ModelService = Depends(get_service), principal: Principal = Depends(get_principal)
) -> dict[str, Any]:
    """The base model and every published adapter trained on it that the key may call."""
    return {"object": "list", "data": service.list_models(principal)}


@router.get("/v1/models/{model:path}")
async def model(
    model: str,
    service: ModelService = Depends(get_service),
    principal: Principal = Depends(get_principal),
) -> dict[str, Any]:
    """One model object; 400/404/409/422 say why a name is not servable here."""
    for entry in service.list_models(principal):
        if entry["id"] == model:
            return entry
    service.adapter_for(model, principal)  # raises the precise 400/404/409/422
    raise BadRequest(f"model {model!r} is not servable here", param="model")


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest,
    service: ModelService = Depends(get_service),
    principal: Principal = Depends(get_principal),
):
    """OpenAI's legacy completions: text or token-id prompts, ``n`` choices each; with
    ``echo`` and/or ``logprobs``, token log-probabilities as OpenAI's legacy API gives them."""
    _refuse_unsupported(body)
    _check_scoring(body)
    if body.suffix:
        raise BadRequest("suffix is not supported", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise BadRequest("best_of other than n is not supported", param="best_of")
    adapter = service.served_adapter(body.model, principal)  # resolved once per request
    prompts = _prompt_list(body.prompt)
    if len(prompts) * body.n > service.limits.max_n * 4:
        raise BadRequest(
            f"{len(prompts)} prompts x n={body.n} rows; one request may ask for at most "
            f"{service.limits.max_n * 4}",
            param="prompt",
        )
    encoded = [service.encode_prompt(p) for p in prompts]
    if body.echo or body.logprobs is not None:
        return await _scored_completion(service, body, adapter, prompts, encoded)
    return await _generate(service, _COMPLETION, body, adapter, encoded, body.max_tokens)


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    service: ModelService = Depends(get_service),
    principal: Principal = Depends(get_principal),
):
    """Chat completions, rendered with the base model's chat template."""
    _refuse_unsupported(body)
    if body.logprobs not in (None, False, 0):
        raise BadRequest(
            "logprobs are not supported by chat completions on this server; use "
            "/v1/completions with logprobs",
            param="logprobs",
        )
    if not body.messages:
        raise BadRequest(
            "messages is empty; send at least one message",
            code="empty_messages",
            param="messages",
        )
    adapter = service.served_adapter(body.model, principal)  # resolved once per request
    messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
    encoded = [service.encode_chat(messages)]
    max_tokens = body.max_completion_tokens or body.max_tokens
    return await _generate(service, _CHAT, body, adapter, encoded, max_tokens)


@router.post("/v1/evaluations")
async def evaluations(
    body: EvaluationRequest,
    service: ModelService = Depends(get_service),
    principal: Principal = Depends(get_principal),
) -> dict[str, Any]:
    """Loss, perplexity and generation metrics of ``model`` over rows or a dataset."""
    return await service.evaluate(
        body.model,
        rows=body.rows,
        dataset=body.dataset,
        metrics=body.metrics,
        fmt=body.format,
        max_tokens=min(body.max_tokens, service.limits.max_tokens_limit),
        max_seq_len=body.max_seq_len,
        principal=principal,
    )


@router.post("/v1/classifications")
async def classifications(
    body: ClassificationRequest,
    service: ModelService = Depends(get_service),
    principal: Principal = Depends(get_principal),
) -> dict[str, Any]:
    """Labels and label probabilities of each input text from a classification adapter."""
    return await service.classify(body.model, body.input, principal)


# ------------------------------------------------------------ the app


def create_api(
    service: ModelService,
    routers: Sequence[APIRouter] = (),
    *,
    allowed_hosts: Sequence[str] | None = None,
    admission: Admission | None = None,
) -> FastAPI:
    """The FastAPI app serving ``service``; Ray Serve's ingress mounts it per replica.

    Args:
        service: The replica's model service; handlers reach it through ``app.state``.
        routers: More routes to include (their handlers see the same service, key
            checks, limits, metrics and error shape as the inference routes).
        allowed_hosts: ``Host`` names answered besides loopback (``serving.http_guard``);
            ``None`` checks no ``Host``. The Serve deployment always passes its list.
        admission: The replica's admission state, which drains it on shutdown.
    """
    app = FastAPI(title="rayft", description="OpenAI-compatible base model + LoRA adapters")
    app.state.service = service
    app.add_middleware(RequestGuard)
    # Outside RequestGuard: a page's request is refused before its key or body is read.
    app.add_middleware(HttpGuard, allowed_hosts=allowed_hosts, admission=admission)
    # Added last, so outermost: it sees the answers RequestGuard gives too.
    app.add_middleware(RequestMonitor)
    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(StorageError, storage_error)
    app.add_exception_handler(Exception, unexpected)
    app.include_router(router)
    for extra in routers:
        app.include_router(extra)
    return app


class RequestGuard:
    """ASGI middleware: the body size limit and the API key, checked before any route runs.

    The size limit holds for bodies sent with ``Content-Length`` (refused unread) and for
    chunked bodies (counted while read, refused once past the limit). The body is read
    here and handed on whole; later ``receive`` calls go to the server, so routes still
    learn when a client disconnects. A file upload (``streams_body``) is the exception:
    its route streams it to disk, and it is counted as it is read.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.rates: ProjectRates | None = None  # the replica's, made on the first request

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        service: ModelService = scope["app"].state.service
        refusal = _refusal(scope, service) or self._over_rate(scope, service)
        if refusal is None and streams_body(scope):
            # An upload goes through unread, counted as the route reads it (413 past it).
            counted = _counted(receive, body_limit(scope, service), _hint(scope))
            await self.app(scope, counted, send)
            return
        if refusal is None:
            body, refusal = await _read_body(receive, body_limit(scope, service), _hint(scope))
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _over_rate(self, scope: dict[str, Any], service: ModelService) -> ServingError | None:
        """429 when the request's project is past its ``requests_per_s`` quota (``/health``
        and refused requests are not counted)."""
        principal = scope_principal(scope)
        if principal is None or scope.get("path", "").rstrip("/") == "/health":
            return None
        if self.rates is None:
            quotas = service.limits.project_quotas
            self.rates = ProjectRates(quotas.requests_per_s, quotas.burst)
        try:
            self.rates.check(principal)
        except QuotaExceeded as err:
            return err
        return None


def _refusal(scope: dict[str, Any], service: ModelService) -> ServingError | None:
    """A declared body over the limit (413), a missing, wrong, revoked or expired key (401),
    or a key whose role may not call the route (403).

    The key's ``Principal`` (``serving.auth``) goes into ``scope["state"]`` for the routes
    and onto the request's log line.
    """
    headers = dict(scope.get("headers") or [])
    limit = body_limit(scope, service)
    length = headers.get(b"content-length", b"").decode("latin-1")
    if length.isdigit() and int(length) > limit:
        return TooLarge(f"request body is {length} bytes; the limit is {limit}{_hint(scope)}")
    # Header bytes are compared as sent: a non-ASCII or malformed token is just wrong.
    principal = service.auth.principal(bearer_token(headers.get(b"authorization", b"")))
    path = scope.get("path", "").rstrip("/")
    if principal is not None:
        scope.setdefault("state", {})["principal"] = principal
        note_principal(principal.project, principal.key_id)
    if path == "/health":
        return None
    if principal is None:
        return Unauthorized(
            "missing, invalid, revoked or expired API key: send 'Authorization: Bearer <key>' "
            "(a key from `rayft keys create`, or RAYFT_API_KEY)",
            code="invalid_api_key",
        )
    if not permits(principal, scope.get("method", ""), path):
        return Forbidden(
            f"this key has the role {principal.role!r}, which may only call models "
            "(completions, chat completions, classifications, GET /v1/models); ask for a "
            "member key of the project",
            code="permission_denied",
        )
    return None


def body_limit(scope: dict[str, Any], service: ModelService) -> int:
    """The largest body a request may send: file uploads have their own, larger limit."""
    if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/v1/files":
        return service.limits.max_file_bytes
    return service.limits.max_request_bytes


def _hint(scope: dict[str, Any]) -> str:
    """What to change when a file upload is too large (the operator's setting)."""
    if scope.get("path", "").rstrip("/") == "/v1/files":
        return " (the server's max_file_bytes); split the file or raise max_file_bytes"
    return ""


def streams_body(scope: dict[str, Any]) -> bool:
    """Whether the route reads the body as a stream (a file upload), so it is not buffered."""
    return scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/v1/files"


def _counted(receive: Any, limit: int, hint: str) -> Any:
    """``receive`` that counts the body's bytes and raises ``TooLarge`` once past ``limit``."""
    size = 0

    async def counted() -> dict[str, Any]:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > limit:
                raise TooLarge(f"request body is over the limit of {limit} bytes{hint}")
        return message

    return counted


async def _read_body(receive: Any, limit: int, hint: str = "") -> tuple[bytes, ServingError | None]:
    """The whole request body, or a 413 as soon as more than ``limit`` bytes arrived."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"", None  # the client went away; the route sees that on receive
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", TooLarge(f"request body is over the limit of {limit} bytes{hint}")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


# ------------------------------------------------------- error handlers


async def serving_error(_: Request, err: ServingError) -> JSONResponse:
    return error_response(err)


async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = err.errors()
    # Without a JSON content type FastAPI does not parse the body; judge the bytes.
    if any(p.get("type") == "json_invalid" for p in problems) or not _is_json(await request.body()):
        return error_response(BadRequest("the request body is not valid JSON", code="invalid_json"))
    return error_response(_schema_error(problems))


async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = ServingError(str(err.detail), code=str(err.status_code))
    kind.status = err.status_code
    kind.type = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return error_response(kind)


async def storage_error(_: Request, err: StorageError) -> JSONResponse:
    # The registry's object-storage root is unreachable: the client may retry.
    return error_response(Unavailable(str(err), code="storage_unavailable"))


async def unexpected(_: Request, err: Exception) -> JSONResponse:
    kind = ServingError(f"internal error: {type(err).__name__}: {err}", code="internal_error")
    kind.status, kind.type = 500, "server_error"
    return error_response(kind)


# -------------------------------------------- the shared generation path


@dataclass(frozen=True)
class _Shape:
    """How one endpoint names and shapes what generation produced.

    Attributes:
        id_prefix: Response ids are ``<id_prefix>-<hex>``.
        object: ``object`` of a whole response.
        chunk_object: ``object`` of each SSE chunk.
        choice: A whole response's choice from ``(index, result row)``.
        opening: Choices sent before any text of row ``index`` (chat: the role delta).
        deltas: Choices that carry one step output of row ``index``.
    """

    id_prefix: str
    object: str
    chunk_object: str
    choice: Callable[[int, dict[str, Any]], dict[str, Any]]
    opening: Callable[[int], list[dict[str, Any]]]
    deltas: Callable[[int, StepOutput], list[dict[str, Any]]]


def _completion_deltas(index: int, out: StepOutput) -> list[dict[str, Any]]:
    if not (out.text or out.finished):
        return []
    reason = out.finish_reason if out.finished else None
    return [{"index": index, "text": out.text, "logprobs": None, "finish_reason": reason}]


def _chat_delta(index: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def _chat_deltas(index: int, out: StepOutput) -> list[dict[str, Any]]:
    choices = [_chat_delta(index, {"content": out.text}, None)] if out.text else []
    if out.finished:
        choices.append(_chat_delta(index, {}, out.finish_reason))
    return choices


_COMPLETION = _Shape(
    id_prefix="cmpl",
    object="text_completion",
    chunk_object="text_completion",
    choice=lambda i, r: {
        "index": i,
        "text": r["text"],
        "logprobs": None,
        "finish_reason": r["finish_reason"],
    },
    opening=lambda i: [],
    deltas=_completion_deltas,
)

_CHAT = _Shape(
    id_prefix="chatcmpl",
    object="chat.completion",
    chunk_object="chat.completion.chunk",
    choice=lambda i, r: {
        "index": i,
        "message": {"role": "assistant", "content": r["text"]},
        "logprobs": None,
        "finish_reason": r["finish_reason"],
    },
    # OpenAI opens every choice with the assistant role and an empty content delta.
    opening=lambda i: [_chat_delta(i, {"role": "assistant", "content": ""}, None)],
    deltas=_chat_deltas,
)


async def _generate(
    service: ModelService,
    shape: _Shape,
    body: _SamplingFields,
    adapter: ServedAdapter | None,
    encoded: list[list[int]],
    max_tokens: int | None,
) -> dict[str, Any] | StreamingResponse:
    """Decode ``body.n`` rows per encoded prompt: a whole response, or an SSE stream."""
    requests = _rows(service, encoded, adapter, body, max_tokens)
    head = {
        "id": f"{shape.id_prefix}-{uuid.uuid4().hex}",
        "object": shape.object,
        "created": int(time.time()),
        "model": body.model,
    }
    if body.stream:
        # Before any header is sent, so a full queue is a clean 429, not a broken stream.
        service.loop.check_capacity(len(requests))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _events(
            service, shape, requests, {**head, "object": shape.chunk_object}, encoded, include_usage
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
    results = await service.complete(requests)
    completion_tokens = sum(r["completion_tokens"] for r in results)
    prompt_tokens = sum(len(ids) for ids in encoded)
    note_usage(prompt_tokens, completion_tokens, [r["text"] for r in results], stream=False)
    return {
        **head,
        "choices": [shape.choice(i, r) for i, r in enumerate(results)],
        "usage": _usage(encoded, completion_tokens),
    }


async def _events(
    service: ModelService,
    shape: _Shape,
    requests: list[GenerationRequest],
    head: dict[str, Any],
    encoded: list[list[int]],
    include_usage: bool,
) -> AsyncIterator[str]:
    """The SSE events of a streamed response, ``data: [DONE]`` last."""

    def chunk(choice: dict[str, Any]) -> str:
        payload = {**head, "choices": [choice]}
        if include_usage:
            payload["usage"] = None
        return _sse(payload)

    for index in range(len(requests)):
        for choice in shape.opening(index):
            yield chunk(choice)
    completion_tokens = 0
    prompt_tokens = sum(len(ids) for ids in encoded)
    texts: list[list[str]] = [[] for _ in requests]
    note_usage(prompt_tokens, 0, None, stream=True)
    # aclosing: an error (or a client gone) ends the rows now and frees their routes.
    async with aclosing(service.stream(requests)) as outputs:
        async for index, out in outputs:
            if out.error is not None:
                note_error(out.error.code or out.error.type)
                yield _sse(out.error.body())
                break
            texts[index].append(out.text)
            for choice in shape.deltas(index, out):
                yield chunk(choice)
            if out.finished:
                completion_tokens += out.completion_tokens
                # Noted as rows finish, so a stream the client leaves still counts them.
                note_usage(prompt_tokens, completion_tokens, ["".join(t) for t in texts], True)
    if include_usage:
        # The last chunk when ``stream_options.include_usage`` is set: no choices, only usage.
        yield _sse({**head, "choices": [], "usage": _usage(encoded, completion_tokens)})
    yield "data: [DONE]\n\n"


# ------------------------------------------------- echo and logprobs


async def _scored_completion(
    service: ModelService,
    body: CompletionRequest,
    adapter: ServedAdapter | None,
    prompts: list[str | list[int]],
    encoded: list[list[int]],
) -> dict[str, Any]:
    """A completion with ``echo`` and/or ``logprobs``: the rows are generated (none for
    ``max_tokens: 0``), then each prompt + completion is scored in one teacher-forced pass."""
    results = await _completions_of(service, body, adapter, encoded)
    rows = [
        (prompt, ids) for prompt, ids in zip(prompts, encoded, strict=True) for _ in range(body.n)
    ]
    sequences = [ids + r["token_ids"] for (_, ids), r in zip(rows, results, strict=True)]
    scores: list[TokenScores] | None = None
    if body.logprobs is not None:
        scores = await service.token_scores(sequences, adapter, body.logprobs)
    # Decoding every token is CPU work: off the event loop.
    choices = await run_in_threadpool(
        _scored_choices, service.engine.tokenizer, body.echo, rows, sequences, results, scores
    )
    completion_tokens = sum(r["completion_tokens"] for r in results)
    note_usage(
        sum(len(ids) for ids in encoded),
        completion_tokens,
        [r["text"] for r in results],
        stream=False,
    )
    return {
        "id": f"{_COMPLETION.id_prefix}-{uuid.uuid4().hex}",
        "object": _COMPLETION.object,
        "created": int(time.time()),
        "model": body.model,
        "choices": choices,
        "usage": _usage(encoded, completion_tokens),
    }


async def _completions_of(
    service: ModelService,
    body: CompletionRequest,
    adapter: ServedAdapter | None,
    encoded: list[list[int]],
) -> list[dict[str, Any]]:
    """Each row's completion (``n`` per prompt), with the token ids its ``logprobs`` report."""
    engine = service.engine
    if body.max_tokens == 0:
        for ids in encoded:
            if len(ids) > engine.context_window:
                raise BadRequest(
                    f"the prompt has {len(ids)} tokens, beyond this model's context window of "
                    f"{engine.context_window}",
                    code="context_length_exceeded",
                    param="prompt",
                )
        if body.logprobs is not None:
            service.check_logprob_tokens(sum(len(ids) for ids in encoded) * body.n)
        empty = {"text": "", "finish_reason": "length", "completion_tokens": 0, "token_ids": []}
        return [dict(empty) for _ in encoded for _ in range(body.n)]
    requests = _rows(service, encoded, adapter, body, body.max_tokens)
    if body.logprobs is not None:
        service.check_logprob_tokens(sum(len(r.prompt_ids) + r.params.max_tokens for r in requests))
    results = await service.complete(requests)

    def decode(ids: list[int]) -> str:
        return engine.tokenizer.decode(ids, skip_special_tokens=True)

    for result in results:
        result["token_ids"] = completion_ids(
            result["token_ids"], result["text"], result["finish_reason"], decode, engine.stop_ids
        )
    return results


def _scored_choices(
    tokenizer: Any,
    echo: bool,
    rows: list[tuple[str | list[int], list[int]]],
    sequences: list[list[int]],
    results: list[dict[str, Any]],
    scores: list[TokenScores] | None,
) -> list[dict[str, Any]]:
    """The choices of a scored completion: echoed prompt text and the ``logprobs`` object."""
    texts: dict[int, str] = {}

    def token_text(token: int) -> str:
        if token not in texts:
            texts[token] = tokenizer.decode([token])
        return texts[token]

    choices = []
    for i, ((prompt, ids), result) in enumerate(zip(rows, results, strict=True)):
        # A token-id prompt is echoed as its tokens' text, special tokens included.
        prompt_text = prompt if isinstance(prompt, str) else tokenizer.decode(ids)
        logprobs = None
        if scores is not None:
            start, offset = (0, 0) if echo else (len(ids), len(prompt_text))
            logprobs = legacy_logprobs(sequences[i], scores[i], token_text, start, offset)
        choices.append(
            {
                "index": i,
                "text": prompt_text + result["text"] if echo else result["text"],
                "logprobs": logprobs,
                "finish_reason": result["finish_reason"],
            }
        )
    return choices


# ------------------------------------------------------------ helpers


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


def _schema_error(problems: list[dict[str, Any]]) -> ServingError:
    parts = []
    param = None
    for p in problems[:5]:
        where = error_key(p.get("loc", ()), REQUEST_MODELS, http=True) or "body"
        param = param or where
        parts.append(f"{where}: {p.get('msg')}")
    return InvalidParameters("; ".join(parts), code="invalid_parameters", param=param)


def _refuse_unsupported(body: _SamplingFields) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value not in (None, 0, 0.0):
            raise BadRequest(f"{name} is not supported by this server; leave it at 0", param=name)


def _check_scoring(body: CompletionRequest) -> None:
    """400 for ``echo`` / ``logprobs`` / ``max_tokens: 0`` combinations not served."""
    if body.logprobs is not None and body.logprobs > MAX_LOGPROBS:
        raise BadRequest(
            f"logprobs is {body.logprobs}; at most {MAX_LOGPROBS} alternatives per token",
            code="invalid_logprobs",
            param="logprobs",
        )
    if body.stream and (body.echo or body.logprobs is not None):
        raise BadRequest(
            "echo and logprobs are not supported with stream: true; send stream: false",
            param="stream",
        )
    if body.max_tokens == 0 and not body.echo:
        raise BadRequest(
            "max_tokens is 0, which returns nothing without echo; set echo: true to score "
            "the prompt, or ask for at least 1 token",
            param="max_tokens",
        )


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise BadRequest("prompt is empty", code="empty_prompt", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _message_dict(message: ChatMessage, index: int) -> dict[str, Any]:
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(
                    f"messages[{index}].content: only text parts are supported", param="messages"
                )
            texts.append(part["text"])
        content = "\n".join(texts)
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": content or ""}


def _rows(
    service: ModelService,
    encoded: list[list[int]],
    adapter: ServedAdapter | None,
    body: _SamplingFields,
    max_tokens: int | None,
) -> list[GenerationRequest]:
    if body.n > service.limits.max_n:
        raise BadRequest(
            f"n is {body.n}; this server allows at most {service.limits.max_n}", param="n"
        )
    rows = []
    for ids in encoded:
        for choice in range(body.n):
            # Each of n choices gets its own seed, so choices differ yet repeat with the seed.
            seed = None if body.seed is None else body.seed + choice
            params = service.sampling(
                len(ids), max_tokens, body.temperature, body.top_p, seed, body.stop
            )
            name = adapter.name if adapter is not None else BASE_ADAPTER
            rows.append(GenerationRequest(tuple(ids), name, params, adapter))
    return rows


def _usage(encoded: list[list[int]], completion_tokens: int) -> dict[str, int]:
    prompt = sum(len(ids) for ids in encoded)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
