"""What one replica does, independent of Ray: model names, limits, generation and evaluation.

``ModelService`` joins the engine, the decode loop and the request limits. The HTTP
layer (``serving.openai_api``) turns requests into calls on it, and the Ray Serve
deployment (``serving.app``) builds one per replica, so the same object is also usable
in-process (``rayft eval --in-process``) and in tests without Ray.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from starlette.concurrency import run_in_threadpool

from rayft.serving.auth import Authenticator, KeyStore, Principal
from rayft.serving.batching import DecodeLoop
from rayft.serving.classify import TASK as CLASSIFICATION
from rayft.serving.classify import (
    Classifiers,
    adapter_task,
    classifier_refusal,
    generator_refusal,
)
from rayft.serving.engine import (
    BASE_ADAPTER,
    GenerationRequest,
    ModelEngine,
    SamplingParams,
    ServedAdapter,
    StepOutput,
    model_not_found,
)
from rayft.serving.errors import BadRequest, TooLarge
from rayft.serving.logprobs import TokenScores
from rayft.serving.metrics import NullMetrics
from rayft.serving.request_log import (
    GENERATION_ROUTES,
    LogDataset,
    RequestLog,
    RequestRecord,
    note_model,
)
from rayft.trainers.job_limits import JobLimits, ProjectQuotas

MAX_NAME_CHARS = 256
MAX_STOPS = 4
MAX_STOP_CHARS = 256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Per-request limits; anything beyond them is refused with a 400/413, never run.

    Attributes:
        max_tokens_limit: Largest ``max_tokens`` a request may ask for.
        max_prompt_tokens: Longest prompt, in tokens.
        max_eval_rows: Most rows one evaluation may hold.
        max_request_bytes: Largest request body.
        max_n: Largest ``n`` (choices per prompt).
        max_file_bytes: Largest ``POST /v1/files`` upload (the other routes keep
            ``max_request_bytes``).
        job_limits: Bounds on each fine-tuning job (``POST /v1/fine_tuning/jobs``).
        max_queued_rows: Rows queued and decoding at once across all requests; past it a
            request gets 429. An evaluation queues all its rows, so it is at least
            ``max_eval_rows``.
        max_concurrent_uploads: ``POST /v1/files`` uploads received at once (429 past it).
        project_quotas: What each project may keep and ask for: files, bytes, jobs that
            have not ended, requests per second, checkpoint retention (429 past one).
        max_logprob_tokens: Most tokens one completion request with ``logprobs`` or
            ``echo`` may have scored: prompt plus ``max_tokens`` over all its choices.
    """

    max_tokens_limit: int = 1024
    max_prompt_tokens: int = 4096
    max_eval_rows: int = 2000
    max_request_bytes: int = 16 * 1024 * 1024
    max_n: int = 16
    max_file_bytes: int = 512 * 1024 * 1024
    job_limits: JobLimits = field(default_factory=JobLimits)
    max_queued_rows: int = 2048
    max_concurrent_uploads: int = 4
    project_quotas: ProjectQuotas = field(default_factory=ProjectQuotas)
    max_logprob_tokens: int = 65536

    def __post_init__(self) -> None:
        if self.max_eval_rows > self.max_queued_rows:
            raise ValueError(
                f"max_eval_rows ({self.max_eval_rows}) is over max_queued_rows "
                f"({self.max_queued_rows}): an evaluation with generation metrics would always "
                "get 429; lower max_eval_rows or raise max_queued_rows"
            )


class ModelService:
    """A base model and its adapters behind OpenAI-style operations.

    Args:
        engine: The model engine (base model + adapter LRU).
        limits: Request limits.
        batch_wait_timeout_s: See ``DecodeLoop``.
        api_key: An admin key of project ``default`` (``serving.auth``); defaults to
            ``$RAYFT_API_KEY``. When it is set or the storage root has a key store, every
            route but ``/health`` needs ``Authorization: Bearer``.
        api_key_sha256: The key's SHA-256 hex digest instead of the key itself (what a
            Serve deployment receives, so the key is never stored in Ray's state).
        request_timeout_s: Deadline of every request; see ``DecodeLoop``.
        metrics: Where requests, tokens, latencies and the adapter LRU are counted
            (``serving.metrics``); default: nowhere.
        request_log: Where a line per completion request is written; default: no log.
        keys: The project key store; default the one in the engine's storage root.
    """

    def __init__(
        self,
        engine: ModelEngine,
        limits: Limits | None = None,
        batch_wait_timeout_s: float = 0.005,
        api_key: str | None = None,
        api_key_sha256: str | None = None,
        request_timeout_s: float = 600.0,
        metrics: NullMetrics | None = None,
        request_log: RequestLog | None = None,
        keys: KeyStore | None = None,
    ) -> None:
        self.engine = engine
        self.limits = limits or Limits()
        self.classifiers = Classifiers(engine)
        self.metrics = metrics or NullMetrics()
        self.request_log = request_log
        engine.listener = self.metrics
        self.loop = DecodeLoop(
            engine,
            batch_wait_timeout_s,
            max_queued_rows=self.limits.max_queued_rows,
            request_timeout_s=request_timeout_s,
            metrics=self.metrics,
        )
        if api_key_sha256 is None:
            key = api_key if api_key is not None else os.environ.get("RAYFT_API_KEY")
            api_key_sha256 = key_digest(key) if key else None
        # Only the digest is kept: a token is checked by hashing it (constant time).
        digest = bytes.fromhex(api_key_sha256) if api_key_sha256 else None
        self.auth = Authenticator(digest, keys or KeyStore(engine.storage))
        self.created = int(time.time())

    @property
    def requires_key(self) -> bool:
        """True when every route but ``/health`` needs a key."""
        return self.auth.requires_key

    def authorized(self, token: bytes) -> bool:
        """Whether ``token`` (raw header bytes, any encoding) is an accepted key."""
        return self.auth.principal(token) is not None

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    # --------------------------------------------------------------- models

    def list_models(self, principal: Principal | None = None) -> list[dict[str, Any]]:
        """The base model, then every published adapter trained on it (OpenAI model objects).

        With ``principal``, only the adapters it may call: shared ones and its project's.
        """
        from rayft.trainers.registry import list_adapters

        out = [_model_object(self.model_name, self.created, root=self.model_name)]
        for adapter in list_adapters(self.engine.storage):
            base = adapter.base_model
            if base is not None and not self.engine.serves_base(base):
                continue
            if principal is not None and not principal.sees(adapter.project):
                continue
            created = int(adapter.published_at or self.created)
            out.append(
                _model_object(adapter.name, created, root=self.model_name, parent=self.model_name)
            )
        return out

    def served_adapter(
        self, model: str, principal: Principal | None = None
    ) -> ServedAdapter | None:
        """The generation adapter an OpenAI ``model`` field names; ``None`` for the base.

        Resolved once per request: the rows the request submits carry it. With
        ``principal``, another project's adapter is not found (404), as if it did not exist.

        Raises:
            BadRequest / NotFound / Conflict / InvalidParameters: 400/404/409/422 when
                the name is not usable for generation here.
        """
        if not isinstance(model, str) or not model:
            raise BadRequest("model must be a non-empty string", param="model")
        checked_text(model, "model", MAX_NAME_CHARS)
        if model == self.model_name:
            note_model(model)
            return None
        served = self._visible_adapter(model, principal)
        if adapter_task(served.path, served.manifest) == CLASSIFICATION:
            raise classifier_refusal(model)
        note_model(model)
        return served

    def adapter_for(self, model: str, principal: Principal | None = None) -> str:
        """The engine adapter name for an OpenAI ``model`` field (400/404/409/422 when
        unusable, or another project's)."""
        served = self.served_adapter(model, principal)
        return served.name if served is not None else BASE_ADAPTER

    def _visible_adapter(self, model: str, principal: Principal | None) -> ServedAdapter:
        """``engine.resolve_adapter``, with another project's adapter answered 404."""
        served = self.engine.resolve_adapter(model)
        if principal is not None and not principal.sees(served.manifest.project):
            raise model_not_found(model, self.model_name)
        return served

    def health(self) -> dict[str, Any]:
        """Liveness plus what this replica holds, for operators and tests."""
        return {
            "status": "ok",
            "model": self.model_name,
            "loaded_adapters": self.engine.loaded_adapters(),
            "max_loaded_adapters": self.engine.max_loaded_adapters,
            "peak_loaded_adapters": self.engine.peak_loaded,
            "pid": os.getpid(),
            **self.loop.stats(),
        }

    # ------------------------------------------------------------- prompts

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a completion prompt (text or ids), checked against the limits."""
        if isinstance(prompt, str):
            ids = list(self.engine.tokenizer(prompt)["input_ids"])
        else:
            vocab = len(self.engine.tokenizer)
            if any(not 0 <= t < vocab for t in prompt):
                raise BadRequest(f"prompt token ids must lie in [0, {vocab})", param="prompt")
            ids = list(prompt)
        return self._checked_prompt(ids)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation rendered by the base model's chat template."""
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise BadRequest(
                f"{self.model_name!r} has no chat template; use /v1/completions",
                code="no_chat_template",
            )
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as err:  # noqa: BLE001 - templates raise anything on odd input
            raise BadRequest(
                f"the chat template rejected these messages: {err}", param="messages"
            ) from None
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._checked_prompt(ids)

    def _checked_prompt(self, ids: list[int]) -> list[int]:
        if not ids:
            raise BadRequest("the prompt is empty", code="empty_prompt", param="prompt")
        return self._within_prompt_limit(ids, "the prompt", "prompt")

    def _within_prompt_limit(self, ids: list[int], what: str, param: str) -> list[int]:
        """``ids``, or a 400 naming ``what`` when they exceed ``max_prompt_tokens``."""
        if len(ids) > self.limits.max_prompt_tokens:
            raise BadRequest(
                f"{what} is {len(ids)} tokens; this server accepts at most "
                f"{self.limits.max_prompt_tokens}",
                code="context_length_exceeded",
                param=param,
            )
        return ids

    def sampling(
        self,
        prompt_len: int,
        max_tokens: int | None,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: str | list[str] | None,
    ) -> SamplingParams:
        """Sampling settings for one row, with ``max_tokens`` checked against the limits.

        Without ``max_tokens`` a row may use the rest of the context window, capped at
        the server's ``max_tokens_limit``.
        """
        room = self.engine.context_window - prompt_len
        if room < 1:
            raise BadRequest(
                f"the prompt has {prompt_len} tokens and fills this model's context window "
                f"of {self.engine.context_window} tokens, leaving no room for max_tokens; "
                "shorten the prompt",
                code="context_length_exceeded",
                param="prompt",
            )
        if max_tokens is None:
            max_tokens = min(self.limits.max_tokens_limit, room)
        if max_tokens > self.limits.max_tokens_limit:
            raise BadRequest(
                f"max_tokens is {max_tokens}; this server allows at most "
                f"{self.limits.max_tokens_limit}",
                code="max_tokens_exceeded",
                param="max_tokens",
            )
        if max_tokens > room:
            raise BadRequest(
                f"this model's context window is {self.engine.context_window} tokens; the "
                f"prompt has {prompt_len} and max_tokens asks for {max_tokens} more",
                code="context_length_exceeded",
                param="max_tokens",
            )
        if max_tokens < 1:
            raise BadRequest("max_tokens must be at least 1", param="max_tokens")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > MAX_STOPS:
            raise BadRequest(f"stop holds at most {MAX_STOPS} sequences", param="stop")
        for text in stops:
            if len(text) > MAX_STOP_CHARS:
                raise BadRequest(
                    f"a stop sequence is {len(text)} characters; at most {MAX_STOP_CHARS} "
                    "are allowed",
                    code="stop_too_long",
                    param="stop",
                )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=tuple(s for s in stops if s),
        )

    def stream(self, requests: list[GenerationRequest]) -> AsyncIterator[tuple[int, StepOutput]]:
        """Decode rows in the shared batch; see ``DecodeLoop.stream``."""
        return self.loop.stream(requests)

    async def complete(
        self, requests: list[GenerationRequest], deadline: float | None = None
    ) -> list[dict[str, Any]]:
        """Decode rows to the end; per row ``{"text", "finish_reason", "prompt_tokens",
        "completion_tokens", "token_ids"}`` in request order (``token_ids``: every token
        sampled, an end-of-turn token included).

        Args:
            requests: The rows.
            deadline: When they must be done (``DecodeLoop.deadline``); default
                ``request_timeout_s`` from now.

        Raises:
            ServingError: A row failed (``RequestTimeout`` past the deadline).
        """
        texts = [[] for _ in requests]
        tokens: list[list[int]] = [[] for _ in requests]
        final: dict[int, StepOutput] = {}
        # aclosing: a failed row ends the request now and frees its other rows' routes.
        async with aclosing(self.loop.stream(requests, deadline)) as outputs:
            async for index, out in outputs:
                texts[index].append(out.text)
                if out.token is not None:
                    tokens[index].append(out.token)
                if out.finished:
                    if out.error is not None:
                        raise out.error
                    final[index] = out
        return [
            {
                "text": "".join(texts[i]),
                "finish_reason": final[i].finish_reason,
                "prompt_tokens": final[i].prompt_tokens,
                "completion_tokens": final[i].completion_tokens,
                "token_ids": tokens[i],
            }
            for i in range(len(requests))
        ]

    async def token_scores(
        self, sequences: list[list[int]], served: ServedAdapter | None, top_k: int
    ) -> list[TokenScores]:
        """Every token's log-probability in each sequence under the base or ``served``
        (``ModelEngine.token_scores``), on the engine's thread, within the request deadline.

        Raises:
            BadRequest: The sequences hold more than ``max_logprob_tokens`` tokens.
            RequestTimeout: Scoring passed the request's deadline.
        """
        self.check_logprob_tokens(sum(len(ids) for ids in sequences))
        adapter = served.name if served is not None else BASE_ADAPTER
        stop = threading.Event()  # set at the deadline: scoring stops on the engine thread
        score = partial(self.engine.token_scores, sequences, adapter, top_k, served, stop=stop)
        return await self.loop.run_exclusive(score, deadline=self.loop.deadline(), stop=stop)

    def check_logprob_tokens(self, tokens: int) -> None:
        """A 400 naming the limit when a request would have ``tokens`` tokens scored."""
        limit = self.limits.max_logprob_tokens
        if tokens > limit:
            raise BadRequest(
                f"this request would score {tokens} tokens (prompts plus max_tokens, times n); "
                f"this server scores at most {limit} per request (max_logprob_tokens): send "
                "fewer or shorter prompts, or a smaller max_tokens",
                code="too_many_tokens",
                param="prompt",
            )

    # ------------------------------------------------------- classification

    async def classify(
        self, model: str, inputs: str | list[str], principal: Principal | None = None
    ) -> dict[str, Any]:
        """Label each text with the classifier ``model`` (``POST /v1/classifications``).

        Returns:
            ``{"object": "list", "model", "data": [{index, label, score,
            probabilities}], "usage": {prompt_tokens, total_tokens}}``.

        Raises:
            BadRequest: Empty input, a text over the prompt limit, or ``model`` is the
                base or an adapter that is not a classifier (the message names the
                endpoint to use).
            NotFound / Conflict: As for generation adapters.
        """
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not texts:
            raise BadRequest("input is empty; send a text or a list of texts", param="input")
        if len(texts) > self.limits.max_eval_rows:
            raise TooLarge(
                f"{len(texts)} texts; this server classifies at most "
                f"{self.limits.max_eval_rows} per request",
                param="input",
            )
        if not isinstance(model, str) or not model:
            raise BadRequest("model must be a non-empty string", param="model")
        checked_text(model, "model", MAX_NAME_CHARS)
        if model == self.model_name:
            raise generator_refusal(model)
        served = self._visible_adapter(model, principal)
        if adapter_task(served.path, served.manifest) != CLASSIFICATION:
            raise generator_refusal(model)
        note_model(model)
        encoded = [self._classified_text(text, i) for i, text in enumerate(texts)]
        data = await self.loop.run_exclusive(
            self.classifiers.classify, model, served.path, served.manifest, encoded
        )
        tokens = sum(len(ids) for ids in encoded)
        return {
            "object": "list",
            "model": model,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def _classified_text(self, text: str, index: int) -> list[int]:
        where = f"input[{index}]"
        if not isinstance(text, str) or not text.strip():
            raise BadRequest(f"{where} is empty; send non-empty texts", param="input")
        ids = list(self.engine.tokenizer(text)["input_ids"])
        return self._within_prompt_limit(ids, where, "input")

    # ----------------------------------------------------------- evaluation

    async def evaluate(
        self,
        model: str,
        rows: list[Any] | None = None,
        dataset: str | LogDataset | None = None,
        metrics: list[str] | None = None,
        fmt: str = "auto",
        max_tokens: int = 128,
        max_seq_len: int | None = None,
        principal: Principal | None = None,
    ) -> dict[str, Any]:
        """Run rows through ``model`` and compute the requested metrics.

        Args:
            model: Base model name or adapter name.
            rows: Inline rows (chat, prompt_completion, alpaca or text).
            dataset: A dataset name in the registry instead of ``rows``, or requests read
                back from the request log (``serving.request_log.LogDataset``).
            metrics: Any of ``serving.evaluation.ALL_METRICS``; default loss and perplexity.
            fmt: Row format, or ``auto`` to detect it per row.
            max_tokens: Generation budget per row for the generation metrics.
            max_seq_len: Rows are cut to this many tokens for the loss; at most the
                model's context window, which is also the default when it is under 2048.
            principal: Who asks: only its project's adapters, uploaded files and logged
                requests are read (``None``: everything, for in-process callers).

        Returns:
            ``{"object": "evaluation", "model", "rows", "tokens", "dropped_rows",
            "generated_tokens", "metrics": {...}}``.
        """
        from rayft.serving.evaluation import (
            GENERATION_METRICS,
            check_metrics,
            prepare_rows,
            summarize,
        )

        metrics = check_metrics(metrics or ["loss", "perplexity"])
        # One deadline for the whole evaluation: reading, scoring and generating.
        deadline = self.loop.deadline()
        served = self.served_adapter(model, principal)
        adapter = served.name if served is not None else BASE_ADAPTER
        max_seq_len = self._eval_seq_len(max_seq_len)
        # Reading a dataset and tokenizing rows are file and CPU work: off the event loop.
        rows = await run_in_threadpool(self._eval_rows, model, rows, dataset, principal)
        want_loss = any(m in ("loss", "perplexity") for m in metrics)
        want_gen = any(m in GENERATION_METRICS for m in metrics)
        prepared = await run_in_threadpool(
            prepare_rows, rows, self.engine.tokenizer, fmt, max_seq_len, want_loss, want_gen
        )
        loss_sum, loss_tokens = 0.0, 0
        if want_loss:
            if not prepared.scored:
                raise BadRequest("no row has a labelled token to score (all were cut or empty)")
            stop = threading.Event()  # set at the deadline: scoring stops on the engine thread
            score = partial(self.engine.score, prepared.scored, adapter, stop=stop)
            loss_sum, loss_tokens = await self.loop.run_exclusive(
                score, deadline=deadline, stop=stop
            )
        predictions: list[str] = []
        generated = 0
        if want_gen:
            if not prepared.prompts:
                raise BadRequest(
                    "generation metrics need rows with an answer (chat, prompt_completion or alpaca)"
                )
            requests = self._greedy_requests(prepared.prompts, adapter, served, max_tokens)
            results = await self.complete(requests, deadline)
            predictions = [r["text"] for r in results]
            generated = sum(r["completion_tokens"] for r in results)
        return {
            "object": "evaluation",
            "model": model,
            "rows": len(rows),
            "tokens": loss_tokens,
            "dropped_rows": prepared.dropped,
            "generated_tokens": generated,
            "metrics": summarize(metrics, loss_sum, loss_tokens, predictions, prepared.references),
        }

    def _eval_rows(
        self,
        model: str,
        rows: list[Any] | None,
        dataset: str | LogDataset | None,
        principal: Principal | None = None,
    ) -> list[Any]:
        """The rows to evaluate: inline, or read from ``dataset``; within the row limit."""
        from rayft.serving.evaluation import dataset_rows

        if (rows is None) == (dataset is None):
            raise BadRequest(
                "give exactly one of rows (inline) or dataset (a registry name)", param="rows"
            )
        project = principal.scope if principal is not None else None
        if dataset is not None:
            rows = dataset_rows(
                dataset, model, self.engine.storage, self.limits.max_eval_rows, project
            )
        assert rows is not None
        if not rows:
            raise BadRequest("rows is empty", param="rows")
        if len(rows) > self.limits.max_eval_rows:
            raise TooLarge(
                f"{len(rows)} rows; this server evaluates at most {self.limits.max_eval_rows} per request",
                param="rows",
            )
        return rows

    def _greedy_requests(
        self, prompts: list[list[int]], adapter: str, served: ServedAdapter | None, max_tokens: int
    ) -> list[GenerationRequest]:
        """One greedy request per prompt, its budget cut to what the context window leaves."""
        requests = []
        for prompt in prompts:
            budget = min(max_tokens, self.engine.context_window - len(prompt))
            if budget < 1:
                raise BadRequest("a row's prompt fills the whole context window", param="rows")
            params = SamplingParams(max_tokens=budget, temperature=0.0)
            requests.append(GenerationRequest(tuple(prompt), adapter, params, served))
        return requests

    def _eval_seq_len(self, max_seq_len: int | None) -> int:
        window = self.engine.context_window
        if max_seq_len is None:
            return min(2048, window)
        if max_seq_len > window:
            raise BadRequest(
                f"max_seq_len is {max_seq_len}, beyond this model's context window of "
                f"{window} tokens; ask for at most {window}",
                code="context_length_exceeded",
                param="max_seq_len",
            )
        return max_seq_len

    # ----------------------------------------------------------- monitoring

    @property
    def keeps_payloads(self) -> bool:
        """True when prompts and outputs go to the request log."""
        return self.request_log is not None and self.request_log.log_payloads

    def observe(self, record: RequestRecord) -> None:
        """Count a finished HTTP request and log it (completion routes only)."""
        try:
            self.metrics.observe_request(record)
            if self.request_log is not None and record.route in GENERATION_ROUTES:
                self.request_log.write(record)
        except Exception:  # noqa: BLE001 - monitoring never fails a request
            log.exception("cannot record request %s", record.request_id)

    def close(self) -> None:
        """Stop the decode loop and its thread, the engine, and close the request log."""
        self.loop.close()
        self.engine.close()
        if self.request_log is not None:
            self.request_log.close()


def key_digest(key: str) -> str:
    """SHA-256 hex digest of an API key, as ``ModelService(api_key_sha256=...)`` takes it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def checked_text(value: str, param: str, limit: int) -> str:
    """``value`` if it is at most ``limit`` characters and has no control characters.

    Raises:
        BadRequest: Naming ``param`` and what is wrong with it.
    """
    if len(value) > limit:
        raise BadRequest(f"{param} is {len(value)} characters; at most {limit}", param=param)
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise BadRequest(
            f"{param} {value!r} contains control characters", code="invalid_" + param, param=param
        )
    return value


def _model_object(name: str, created: int, root: str, parent: str | None = None) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "rayft",
        "root": root,
        "parent": parent,
    }
