"""The OpenAI-compatible HTTP API: routes, request/response schemas, SSE streaming, errors.

Routes (``create_api(service)`` builds them around one ``ModelService``):

    GET  /health                  liveness and the adapters this replica holds (no auth)
    GET  /v1/models               base model and every published adapter trained on it
    GET  /v1/models/{model}
    POST /v1/completions          ``model`` = base or adapter name; ``stream`` → SSE
    POST /v1/chat/completions     rendered with the base model's chat template
    POST /v1/evaluations          loss / perplexity / generation metrics over rows

Streams are ``data: {chunk}\\n\\n`` lines ending with ``data: [DONE]\\n\\n``, as OpenAI
sends them. Every error is ``{"error": {"message", "type", "param", "code"}}``: malformed
JSON is 400, a body that does not fit the schema 422, unknown models 404, adapters of
another base 409, oversized bodies 413, a full queue 429, missing/wrong API key 401.
Request fields that OpenAI defines but rayft does not use (``user``, ``metadata`` ...)
are accepted and ignored, so unchanged OpenAI clients work.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayft.serving.engine import GenerationRequest
from rayft.serving.errors import BadRequest, ServingError, TooLarge, Unauthorized, Unavailable
from rayft.serving.service import ModelService
from rayft.trainers.storage import StorageError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    user: str | None = None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` body (OpenAI's legacy completions)."""

    prompt: str | list[str] | list[int] | list[list[int]]
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
    dataset: str | None = None
    metrics: list[str] = Field(default_factory=lambda: ["loss", "perplexity"])
    format: Literal["auto", "chat", "prompt_completion", "alpaca", "text"] = "auto"
    max_tokens: int = Field(128, ge=1)
    max_seq_len: int = Field(2048, ge=8)


def error_response(err: ServingError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def create_api(service: ModelService) -> FastAPI:
    """The FastAPI app serving ``service``; Ray Serve's ingress mounts it per replica."""
    app = FastAPI(title="rayft", description="OpenAI-compatible base model + LoRA adapters")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # Size and auth checks run before the body is read or parsed.
        length = request.headers.get("content-length")
        if (
            length is not None
            and length.isdigit()
            and int(length) > service.limits.max_request_bytes
        ):
            return error_response(
                TooLarge(
                    f"request body is {length} bytes; the limit is {service.limits.max_request_bytes}"
                )
            )
        if service.api_key and request.url.path.rstrip("/") != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip(), service.api_key
            ):
                return error_response(
                    Unauthorized(
                        "missing or invalid API key: send 'Authorization: Bearer <RAYFT_API_KEY>'",
                        code="invalid_api_key",
                    )
                )
        return await call_next(request)

    @app.exception_handler(ServingError)
    async def serving_error(_: Request, err: ServingError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        # Without a JSON content type FastAPI does not parse the body; judge the bytes.
        if any(p.get("type") == "json_invalid" for p in problems) or not _is_json(
            await request.body()
        ):
            return error_response(
                BadRequest("the request body is not valid JSON", code="invalid_json")
            )
        return error_response(_schema_error(problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = ServingError(str(err.detail), code=str(err.status_code))
        kind.status = err.status_code
        kind.type = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(kind)

    @app.exception_handler(StorageError)
    async def storage_error(_: Request, err: StorageError) -> JSONResponse:
        # The registry's object-storage root is unreachable: the client may retry.
        return error_response(Unavailable(str(err), code="storage_unavailable"))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        kind = ServingError(f"internal error: {type(err).__name__}: {err}", code="internal_error")
        kind.status, kind.type = 500, "server_error"
        return error_response(kind)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return service.health()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": service.list_models()}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        for entry in service.list_models():
            if entry["id"] == model:
                return entry
        service.adapter_for(model)  # raises the precise 400/404/409
        raise BadRequest(f"model {model!r} is not servable here", param="model")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        _refuse_unsupported(body)
        if body.echo:
            raise BadRequest("echo is not supported", param="echo")
        if body.suffix:
            raise BadRequest("suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise BadRequest("best_of other than n is not supported", param="best_of")
        adapter = service.adapter_for(body.model)
        prompts = _prompt_list(body.prompt)
        if len(prompts) * body.n > service.limits.max_n * 4:
            raise BadRequest(
                f"{len(prompts)} prompts x n={body.n} rows; one request may ask for at most "
                f"{service.limits.max_n * 4}",
                param="prompt",
            )
        encoded = [service.encode_prompt(p) for p in prompts]
        requests = _rows(service, encoded, adapter, body, body.max_tokens)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            service.loop.check_capacity(len(requests))
            chunks = _completion_chunks(service, requests, body, rid, created, encoded)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
        results = await service.complete(requests)
        choices = [
            {"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
            for i, r in enumerate(results)
        ]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage(encoded, results),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        _refuse_unsupported(body)
        if not body.messages:
            raise BadRequest(
                "messages is empty; send at least one message",
                code="empty_messages",
                param="messages",
            )
        adapter = service.adapter_for(body.model)
        messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
        encoded = [service.encode_chat(messages)]
        max_tokens = body.max_completion_tokens or body.max_tokens
        requests = _rows(service, encoded, adapter, body, max_tokens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            service.loop.check_capacity(len(requests))
            chunks = _chat_chunks(service, requests, body, rid, created, encoded)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
        results = await service.complete(requests)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r["text"]},
                "logprobs": None,
                "finish_reason": r["finish_reason"],
            }
            for i, r in enumerate(results)
        ]
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": choices,
            "usage": _usage(encoded, results),
        }

    @app.post("/v1/evaluations")
    async def evaluations(body: EvaluationRequest) -> dict[str, Any]:
        return await service.evaluate(
            body.model,
            rows=body.rows,
            dataset=body.dataset,
            metrics=body.metrics,
            fmt=body.format,
            max_tokens=min(body.max_tokens, service.limits.max_tokens_limit),
            max_seq_len=body.max_seq_len,
        )

    return app


# --------------------------------------------------------------------- helpers


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
        loc = [str(x) for x in p.get("loc", ()) if x != "body"]
        # Union members add their type to the location (prompt.str); keep the field path.
        loc = [x for x in loc if not x.startswith(("list[", "str", "int", "dict["))]
        where = ".".join(loc) or "body"
        param = param or where
        parts.append(f"{where}: {p.get('msg')}")
    from rayft.serving.errors import InvalidParameters

    return InvalidParameters("; ".join(parts), code="invalid_parameters", param=param)


def _refuse_unsupported(body: _SamplingFields) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value not in (None, 0, 0.0):
            raise BadRequest(f"{name} is not supported by this server; leave it at 0", param=name)
    if body.logprobs not in (None, False, 0):
        raise BadRequest("logprobs are not supported by this server", param="logprobs")
    if isinstance(body.stop, list) and len(body.stop) > 4:
        raise BadRequest("stop holds at most 4 sequences", param="stop")


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
    adapter: str,
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
            rows.append(GenerationRequest(tuple(ids), adapter, params))
    return rows


def _usage(encoded: list[list[int]], results: list[dict[str, Any]]) -> dict[str, int]:
    return _usage_counts(encoded, sum(r["completion_tokens"] for r in results))


def _usage_counts(encoded: list[list[int]], completion_tokens: int) -> dict[str, int]:
    prompt = sum(len(ids) for ids in encoded)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def _usage_chunk(
    rid: str, kind: str, created: int, model: str, encoded: list[list[int]], completion_tokens: int
) -> str:
    """The last SSE chunk when ``stream_options.include_usage`` is set: no choices, only usage."""
    return _sse(
        {
            "id": rid,
            "object": kind,
            "created": created,
            "model": model,
            "choices": [],
            "usage": _usage_counts(encoded, completion_tokens),
        }
    )


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _completion_chunks(
    service: ModelService,
    requests: list[GenerationRequest],
    body: CompletionRequest,
    rid: str,
    created: int,
    encoded: list[list[int]],
) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    completion_tokens = 0
    async for index, out in service.stream(requests):
        if out.error is not None:
            yield _sse(out.error.body())
            break
        if out.text or out.finished:
            chunk = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {
                        "index": index,
                        "text": out.text,
                        "logprobs": None,
                        "finish_reason": out.finish_reason if out.finished else None,
                    }
                ],
            }
            if include_usage:
                chunk["usage"] = None
            yield _sse(chunk)
        if out.finished:
            completion_tokens += out.completion_tokens
    if include_usage:
        yield _usage_chunk(rid, "text_completion", created, body.model, encoded, completion_tokens)
    yield "data: [DONE]\n\n"


async def _chat_chunks(
    service: ModelService,
    requests: list[GenerationRequest],
    body: ChatCompletionRequest,
    rid: str,
    created: int,
    encoded: list[list[int]],
) -> AsyncIterator[str]:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(index: int, delta: dict[str, Any], finish: str | None) -> str:
        payload: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }
        if include_usage:
            payload["usage"] = None
        return _sse(payload)

    # OpenAI opens every choice with the assistant role and an empty content delta.
    for index in range(len(requests)):
        yield chunk(index, {"role": "assistant", "content": ""}, None)
    completion_tokens = 0
    async for index, out in service.stream(requests):
        if out.error is not None:
            yield _sse(out.error.body())
            break
        if out.text:
            yield chunk(index, {"content": out.text}, None)
        if out.finished:
            completion_tokens += out.completion_tokens
            yield chunk(index, {}, out.finish_reason)
    if include_usage:
        yield _usage_chunk(
            rid, "chat.completion.chunk", created, body.model, encoded, completion_tokens
        )
    yield "data: [DONE]\n\n"
