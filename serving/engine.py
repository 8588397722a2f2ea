"""The model server core: one base model, many LoRA adapters, one batched decode loop.

A replica loads the base model once. Adapters are loaded by name from the registry on
first use into ONE ``peft.PeftModel`` and kept in a least-recently-used set of at most
``max_loaded_adapters``; the least recently used adapter that no running row needs is
removed with ``delete_adapter`` to make room. This is the equivalent of Ray Serve's
``@serve.multiplexed`` that the design allows: ``multiplexed`` would hold a separate
model object per adapter id, so requests for different adapters could never share a
forward pass, whereas adapters inside one ``PeftModel`` can be mixed in a single batch
with ``adapter_names=[...]`` (one name per row, ``"__base__"`` for the bare base model).

Decoding is continuous batching at token granularity. ``ModelEngine.step`` runs one
forward pass for every running row (each with its own adapter, sampling settings and
``torch.Generator``), prefills rows that arrived since the last step in a second pass,
and merges them into the running batch by left-padding the KV cache. It returns, per
row, the new text and whether the row finished; streaming and non-streaming responses
are both built from these step outputs. Nothing here knows about Ray or HTTP.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rayft.serving.errors import (
    BadRequest,
    Conflict,
    InvalidParameters,
    NotFound,
    RequestTimeout,
    ServingError,
    Unavailable,
)
from rayft.serving.logprobs import TokenScores
from rayft.trainers.storage import MANIFEST_FILE, StorageRoot

if TYPE_CHECKING:
    from rayft.trainers.manifest import ArtifactManifest

BASE_ADAPTER = "__base__"
SAFE_WEIGHTS = "adapter_model.safetensors"
# Resolved adapters remembered per replica, keyed by (name, version).
RESOLVED_CACHE_SIZE = 64

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How one row is decoded.

    Attributes:
        max_tokens: Most tokens to generate.
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_p: Nucleus sampling: sample from the smallest set of tokens whose
            probability mass reaches ``top_p``.
        seed: Seeds the row's own ``torch.Generator``; ``None`` draws a fresh seed.
        stop: Strings that end the completion; the stop string is not returned.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def model_not_found(name: str, base: str) -> NotFound:
    """The 404 of a model name this server does not serve (or does not show the caller)."""
    return NotFound(
        f"the model {name!r} does not exist: it is neither the base model {base!r} nor a "
        "published adapter (GET /v1/models lists them)",
        code="model_not_found",
        param="model",
    )


@dataclass(frozen=True)
class ServedAdapter:
    """A published adapter checked for this engine's base model (``resolve_adapter``).

    Attributes:
        name: Registry name (what requests call the model).
        version: The published version (for an adapter published before versions, a
            stamp of its manifest file).
        path: The adapter's directory (``adapters/<name>``).
        manifest: Its ``rayft.json``.
    """

    name: str
    version: str
    path: Path
    manifest: ArtifactManifest


@dataclass(frozen=True)
class GenerationRequest:
    """One row to decode: prompt token ids, the adapter to run it through, sampling.

    ``served`` is the adapter as the request resolved it; without it the engine
    resolves ``adapter`` itself.
    """

    prompt_ids: tuple[int, ...]
    adapter: str = BASE_ADAPTER
    params: SamplingParams = field(default_factory=SamplingParams)
    served: ServedAdapter | None = None


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one row.

    Attributes:
        request_id: The id ``submit`` returned.
        text: New text since the previous output of this row (may be empty while
            text that could start a stop string is held back).
        finished: The row is done; no further outputs follow.
        finish_reason: ``"stop"`` (end of turn or stop string), ``"length"``
            (``max_tokens`` or the context window) or ``"error"``.
        prompt_tokens: Prompt length in tokens.
        completion_tokens: Tokens generated so far.
        error: A ``ServingError`` when the row failed.
        token: The token id sampled in this step.
    """

    request_id: int
    text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: ServingError | None = None
    token: int | None = None


@dataclass
class Completion:
    """A finished row, as ``ModelEngine.generate`` returns it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]


@dataclass
class _Row:
    request_id: int
    request: GenerationRequest
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of text already handed out
    text: str = ""


def pick_dtype(requested: str) -> torch.dtype:
    """The torch dtype for ``dtype`` in ServeArgs; ``auto`` is bfloat16 only where it is native."""
    from rayft.trainers.precision import resolve_dtype

    on_gpu = torch.cuda.is_available()
    return getattr(torch, resolve_dtype(requested, on_gpu))


class ModelEngine:
    """A base model with on-demand LoRA adapters and a continuous-batching decode loop.

    Thread safety: ``submit`` and ``cancel`` may be called from any thread; ``step``,
    ``score`` and ``generate`` must be called from one thread at a time (the serving
    layer runs them on a single worker thread).

    Args:
        model: Model name as rayft knows it (builtin, published, local dir or hub id).
        storage: rayft root holding the adapter registry (resolved, or its location);
            ``None`` means ``$RAYFT_HOME``.
        max_loaded_adapters: Most adapters held at once (LRU bound).
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        max_batch_size: Most rows decoded together.
        device: Torch device; defaults to CUDA when available.
        lazy: Load the base model's weights on first use, not here (``VllmEngine``: its
            native rows may never come).
    """

    def __init__(
        self,
        model: str,
        storage: StorageRoot | str | None = None,
        max_loaded_adapters: int = 8,
        dtype: str = "auto",
        max_batch_size: int = 16,
        device: str | None = None,
        *,
        lazy: bool = False,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from rayft.trainers.models import resolve_model

        if max_loaded_adapters < 1:
            raise ValueError("max_loaded_adapters must be at least 1")
        self.model_name = model
        # Resolved once here; the registry calls below are handed the object.
        self.storage = StorageRoot.resolve(storage)
        self.model_dir = Path(resolve_model(model, self.storage.models, self.storage))
        self.max_loaded_adapters = max_loaded_adapters
        self.max_batch_size = max_batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = pick_dtype(dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.config = AutoConfig.from_pretrained(self.model_dir)
        self.context_window = int(getattr(self.config, "max_position_embeddings", 2048) or 2048)
        self.pad_id = self._pad_token_id()
        self.stop_ids = self._stop_token_ids()
        self._base_lock = threading.Lock()
        self._base: Any = None
        self._model: Any = None
        if not lazy:
            self._load_base()

        # Adapter name -> weights file mtime when loaded, oldest use first.
        self._loaded: OrderedDict[str, float] = OrderedDict()
        # (name, version) -> the checked adapter: its manifest is read once per version.
        self._resolved: OrderedDict[tuple[str, str], ServedAdapter] = OrderedDict()
        # Loaded DoRA adapters: PEFT's mixed-adapter forward refuses them (see _run_model).
        self._dora: set[str] = set()
        # Adapters set from tensors (set_adapter_weights): no file or registry entry behind them.
        self._in_memory: set[str] = set()
        self.peak_loaded = 0
        # Told of loads and evictions (serving.metrics: NullMetrics or ServingMetrics).
        self.listener: Any = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._pending: deque[_Row] = deque()
        self._cancelled: set[int] = set()
        self._running: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, cached positions], 1 = real token

    # ----------------------------------------------------------------- setup

    @property
    def base(self) -> Any:
        """The base model, loaded on first use when the engine was made ``lazy``."""
        if self._base is None:
            self._load_base()
        return self._base

    @property
    def model(self) -> Any:
        """What rows run through: the base, a PeftModel once the first adapter loads."""
        if self._model is None:
            self._load_base()
        return self._model

    @model.setter
    def model(self, value: Any) -> None:
        self._model = value

    @property
    def base_loaded(self) -> bool:
        """Whether the base model's weights are in memory (a ``lazy`` engine's may not be)."""
        return self._base is not None

    def _load_base(self) -> None:
        from transformers import AutoModelForCausalLM

        with self._base_lock:
            if self._base is None:
                base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype)
                base.to(self.device).eval()
                self._model = base
                self._base = base

    def _pad_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    def _stop_token_ids(self) -> set[int]:
        from transformers import GenerationConfig

        from rayft.trainers.formats import end_of_turn_ids

        ids = set(end_of_turn_ids(self.tokenizer))
        try:
            generation = GenerationConfig.from_pretrained(self.model_dir)
        except OSError:  # no generation_config.json: what transformers derives for the model
            generation = GenerationConfig.from_model_config(self.config)
        eos = generation.eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
        return ids

    # -------------------------------------------------------------- adapters

    def resolve_adapter(self, name: str) -> ServedAdapter:
        """Resolve an adapter name in the registry and check it fits this base model.

        The registry is asked for the adapter's current version every time (a URI root
        at most every ``RAYFT_REGISTRY_TTL_S``); its manifest is read and checked once per
        version and remembered.

        Raises:
            BadRequest: The name is not one safe path component, or the adapter has
                no safetensors weights (nothing else is ever loaded).
            NotFound: No adapter of that name is published.
            Conflict: The adapter was trained for another base model or other base weights.
            InvalidParameters: Its manifest is unreadable.
        """
        path = self._published_path(name)
        version = _version_of(path)
        key = (name, version)
        served = self._resolved.get(key)
        if served is None:
            served = ServedAdapter(name, version, path, self._checked_manifest(name, path))
            self._resolved[key] = served
            while len(self._resolved) > RESOLVED_CACHE_SIZE:
                self._resolved.popitem(last=False)
        self._resolved.move_to_end(key)
        return served

    def check_adapter(self, name: str) -> Path:
        """The directory of adapter ``name`` once ``resolve_adapter`` accepted it."""
        return self.resolve_adapter(name).path

    def _published_path(self, name: str) -> Path:
        from rayft.trainers.registry import ManifestError, RegistryError, sync_adapter
        from rayft.trainers.storage import StorageError

        try:
            path = sync_adapter(name, self.storage)
        except ManifestError as err:
            raise _corrupt_adapter(name, err) from None
        except RegistryError as err:
            raise BadRequest(str(err), code="invalid_model", param="model") from None
        except StorageError as err:
            raise Unavailable(str(err), code="storage_unavailable") from None
        if not (path / "adapter_config.json").is_file():
            raise model_not_found(name, self.model_name)
        if not (path / SAFE_WEIGHTS).is_file():
            raise BadRequest(
                f"adapter {name!r} has no {SAFE_WEIGHTS}; only safetensors weights are served",
                code="invalid_adapter",
                param="model",
            )
        return path

    def _checked_manifest(self, name: str, path: Path) -> ArtifactManifest:
        from rayft.trainers.manifest import ArtifactManifest, ManifestError

        try:
            manifest = ArtifactManifest.find(path) or ArtifactManifest(kind="adapter", name=name)
        except (ManifestError, OSError) as err:  # corrupt, or a file torn while read
            raise _corrupt_adapter(name, err) from None
        trained_on = manifest.base_model
        if trained_on is not None and not self.serves_base(trained_on):
            raise Conflict(
                f"adapter {name!r} was trained on base model {trained_on!r}, but this server "
                f"holds {self.model_name!r}; serve it from a deployment of {trained_on!r}",
                code="base_model_mismatch",
                param="model",
            )
        recorded = manifest.base_fingerprint
        # Adapters published before fingerprints were recorded carry none and still load.
        if recorded and recorded != self.weights_fingerprint:
            raise Conflict(
                f"adapter {name!r} was trained on base weights {recorded[:12]} of "
                f"{trained_on or self.model_name!r}, but this server holds {self.model_name!r} "
                f"with weights {self.weights_fingerprint[:12]}: the base changed since; serve "
                "it from a deployment of the base it was trained on, or train it again",
                code="base_model_mismatch",
                param="model",
            )
        return manifest

    @cached_property
    def weights_fingerprint(self) -> str:
        """sha256 of the served base model's safetensors weights (``trainers.servable``)."""
        from rayft.trainers.servable import base_fingerprint

        return base_fingerprint(self.model_dir, self.storage.models)

    def serves_base(self, name: str) -> bool:
        """Whether ``name`` (a ``model.name`` an adapter was trained on) is this base model."""
        if name == self.model_name:
            return True
        candidate = Path(name).expanduser()
        return candidate.is_dir() and candidate.resolve() == self.model_dir.resolve()

    def loaded_adapters(self) -> list[str]:
        """Adapters currently held, least recently used first."""
        return list(self._loaded)

    def _ensure_adapter(
        self, name: str, pinned: set[str], served: ServedAdapter | None = None
    ) -> bool:
        """Make ``name`` loaded; False when it must wait for a slot that running rows hold.

        ``served`` is the adapter as the request resolved it; without it, it is resolved here.
        """
        if name == BASE_ADAPTER:
            return True
        if name in self._in_memory and name in self._loaded:
            self._loaded.move_to_end(name)
            return True
        path = (served or self.resolve_adapter(name)).path
        mtime = (path / SAFE_WEIGHTS).stat().st_mtime
        if name in self._loaded:
            # A republished adapter (new weights under the same name) is reloaded once no
            # running row uses the old weights.
            if self._loaded[name] != mtime and name not in pinned:
                self._replace(name, name, path, mtime)
            self._loaded.move_to_end(name)
            return True
        if len(self._loaded) >= self.max_loaded_adapters:
            victim = next((n for n in self._loaded if n not in pinned), None)
            if victim is None:
                return False
            self._replace(victim, name, path, mtime)
            return True
        self._load(name, path, mtime)
        return True

    def _replace(self, old: str, new: str, path: Path, mtime: float) -> None:
        if len(self._loaded) > 1:
            self._unload(old)
            self._evicted(old, new)
            self._load(new, path, mtime)
            return
        # PEFT cannot run a PeftModel with zero adapters, so the newcomer loads before the
        # last one goes (the bound is exceeded only inside this call, and only when it is 1).
        # PEFT refuses adapter names with a dot: the staging name has none.
        staging = new if new != old else f"{new}__reloading"
        self._load(staging, path, mtime)
        self._unload(old)
        self._evicted(old, new)
        if staging != new:
            self._load(new, path, mtime)
            self._unload(staging)

    def _load(self, name: str, path: Path, mtime: float) -> None:
        from peft import PeftModel

        try:
            if self.model is self.base:
                self.model = PeftModel.from_pretrained(self.base, str(path), adapter_name=name)
            else:
                self.model.load_adapter(str(path), adapter_name=name)
        except Exception as err:  # noqa: BLE001 - a broken adapter must not take the server down
            raise Conflict(
                f"adapter {name!r} cannot be loaded onto {self.model_name!r}: "
                f"{type(err).__name__}: {err}",
                code="invalid_adapter",
                param="model",
            ) from None
        # load_adapter leaves new modules in train mode; PEFT refuses adapter_names then.
        self.model.eval()
        self._loaded[name] = mtime
        if getattr(self.model.peft_config[name], "use_dora", False):
            self._dora.add(name)
        self.peak_loaded = max(self.peak_loaded, len(self._loaded))
        log.info("loaded adapter %s (%d held)", name, len(self._loaded))
        if self.listener is not None:
            self.listener.set_loaded_adapters(len(self._loaded))

    def _unload(self, name: str) -> None:
        self.model.delete_adapter(name)
        del self._loaded[name]
        self._dora.discard(name)
        log.info("evicted adapter %s", name)
        if self.listener is not None:
            self.listener.set_loaded_adapters(len(self._loaded))

    def _evicted(self, old: str, new: str) -> None:
        # Reloading a republished adapter under its own name is no eviction.
        if old != new and self.listener is not None:
            self.listener.adapter_evicted(old)

    # -------------------------------------------------------------- rollouts

    def set_adapter_weights(self, name: str, config: dict[str, Any], weights: dict) -> None:
        """Load (or overwrite in place) adapter ``name`` from a LoRA config and its weights.

        This is how a training run's policy reaches its rollout engines after every
        optimizer step: no file, no registry, the tensors as PEFT's
        ``get_peft_model_state_dict`` gives them. Only for engines no request reaches.
        """
        from peft import get_peft_model, set_peft_model_state_dict

        if name not in self._loaded:
            lora = lora_config(config)
            if self.model is self.base:
                self.model = get_peft_model(self.base, lora, adapter_name=name)
            else:
                self.model.add_adapter(name, lora)
            self._loaded[name] = 0.0
            self._in_memory.add(name)
        set_peft_model_state_dict(self.model, weights, adapter_name=name)
        self.model.eval()

    def set_base_weights(self, weights: dict) -> None:
        """Overwrite the base model's weights (a full-weight policy's broadcast)."""
        self.base.load_state_dict(weights, strict=False)
        self.base.eval()

    # ------------------------------------------------------------- requests

    def submit(self, request: GenerationRequest) -> int:
        """Queue a row for decoding; returns its request id. Thread-safe."""
        generator = None
        if request.params.temperature > 0:
            generator = torch.Generator(device="cpu")
            seed = request.params.seed
            # torch takes seeds in [0, 2**64); any integer maps there, so n choices seeded
            # seed, seed + 1, ... never overflow.
            generator.manual_seed(
                seed % (1 << 64) if seed is not None else int.from_bytes(_random_bytes(), "little")
            )
        with self._lock:
            rid = next(self._ids)
            self._pending.append(_Row(rid, request, generator))
        return rid

    def cancel(self, request_id: int) -> None:
        """Drop a row (e.g. its client went away); it produces no further output."""
        with self._lock:
            self._cancelled.add(request_id)

    def has_work(self) -> bool:
        """True while any row is queued or running."""
        with self._lock:
            return bool(self._pending or self._running)

    def generate(self, requests: Iterable[GenerationRequest]) -> list[Completion]:
        """Decode rows to completion, batched together; results in request order.

        Raises:
            ServingError: The first row that failed (e.g. an unknown adapter).
        """
        ids = [self.submit(r) for r in requests]
        texts: dict[int, list[str]] = {i: [] for i in ids}
        done: dict[int, StepOutput] = {}
        tokens: dict[int, list[int]] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.request_id not in texts:
                    continue
                texts[out.request_id].append(out.text)
                if out.token is not None:
                    tokens.setdefault(out.request_id, []).append(out.token)
                if out.finished:
                    done[out.request_id] = out
        for rid in ids:
            if done[rid].error is not None:
                raise done[rid].error
        return [
            Completion(
                text="".join(texts[rid]),
                finish_reason=done[rid].finish_reason or "stop",
                prompt_tokens=done[rid].prompt_tokens,
                completion_tokens=done[rid].completion_tokens,
                token_ids=tokens.get(rid, []),
            )
            for rid in ids
        ]

    # ---------------------------------------------------------------- decode

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Advance every running row by one token and admit queued rows.

        A failure inside the step fails exactly the rows it touched, with a 503
        ``engine_error`` output each: a failed decode pass fails every running row (their
        shared KV cache may be half-updated), a failed prefill only the rows it admitted.
        Rows that finished earlier in the step keep their outputs, queued rows stay
        queued, and the engine is ready for the next step.

        Returns:
            One output per row that produced text or finished in this step.
        """
        outputs: list[StepOutput] = []
        self._drop_cancelled()
        if self._running:
            try:
                decoded = self._sample_and_advance(self._running, self._decode_running())
            except Exception as err:  # noqa: BLE001 - fail these rows, keep the engine serving
                outputs += self._fail_running(err, "decode")
            else:
                outputs += decoded
                self._retire_finished(decoded)
        admitted, failed = self._admit()
        outputs += failed
        if admitted:
            outputs += self._prefill_and_merge(admitted)
        return outputs

    def _prefill_and_merge(self, admitted: list[_Row]) -> list[StepOutput]:
        try:
            logits, cache, mask = self._prefill(admitted)
            prefilled = self._sample_and_advance(admitted, logits)
        except Exception as err:  # noqa: BLE001 - only the rows being prefilled are lost
            log.exception("prefill of %d rows failed", len(admitted))
            failure = engine_error(err, "prefill")
            return [self._failure(r, failure) for r in admitted]
        try:
            self._merge(admitted, cache, mask)
        except Exception as err:  # noqa: BLE001 - a half-merged cache is unusable for all
            self._running = self._running + admitted
            return self._fail_running(err, "merge")
        self._retire_finished(prefilled)
        return prefilled

    def _fail_running(self, err: Exception, phase: str) -> list[StepOutput]:
        log.exception("%s step over %d running rows failed", phase, len(self._running))
        failure = engine_error(err, phase)
        rows, self._running, self._cache, self._mask = self._running, [], None, None
        return [self._failure(r, failure) for r in rows]

    def abort_all(self, err: ServingError) -> list[StepOutput]:
        """Fail every queued and running row and reset the batch (the last resort when a
        step raised outside the rows it was working on)."""
        with self._lock:
            rows = self._running + list(self._pending)
            self._pending.clear()
        self._running, self._cache, self._mask = [], None, None
        return [self._failure(r, err) for r in rows]

    def load(self) -> dict[str, int]:
        """Rows queued and running now (for health checks and leak tests)."""
        with self._lock:
            return {"queued_rows": len(self._pending), "running_rows": len(self._running)}

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return
            self._pending = deque(r for r in self._pending if r.request_id not in cancelled)
        keep = [i for i, r in enumerate(self._running) if r.request_id not in cancelled]
        if len(keep) != len(self._running):
            self._select(keep)

    def _admit(self) -> tuple[list[_Row], list[StepOutput]]:
        """Take queued rows while there is room, loading their adapters; rows whose adapter
        cannot be loaded fail, rows whose adapter must wait for a free slot stay queued."""
        admitted: list[_Row] = []
        failed: list[StepOutput] = []
        waiting: list[_Row] = []
        pinned = {r.request.adapter for r in self._running}
        while len(self._running) + len(admitted) < self.max_batch_size:
            with self._lock:
                if not self._pending:
                    break
                row = self._pending.popleft()
            try:
                ready = self._ensure_adapter(row.request.adapter, pinned, row.request.served)
            except ServingError as err:
                failed.append(self._failure(row, err))
                continue
            except Exception as err:  # noqa: BLE001 - e.g. a disk error reading the adapter
                log.exception("loading adapter %s failed", row.request.adapter)
                failed.append(self._failure(row, engine_error(err, "adapter load")))
                continue
            if not ready:
                waiting.append(row)
                continue
            pinned.add(row.request.adapter)
            admitted.append(row)
        if waiting:
            with self._lock:
                self._pending.extendleft(reversed(waiting))
        return admitted, failed

    def _failure(self, row: _Row, err: ServingError) -> StepOutput:
        return StepOutput(row.request_id, "", True, "error", len(row.request.prompt_ids), 0, err)

    def _forward(self, rows: list[_Row], **inputs: Any) -> Any:
        return self._run_model([r.request.adapter for r in rows], use_cache=True, **inputs)

    def _run_model(self, adapters: list[str], **inputs: Any) -> Any:
        """One forward pass where row ``i`` uses adapter ``adapters[i]``.

        PEFT's mixed-adapter path splits every LoRA layer's input by adapter in Python;
        when the whole batch uses one adapter (or only the base), the plain path with
        that adapter active computes the same thing without the per-layer bookkeeping.
        PEFT refuses DoRA adapters in a mixed batch, so rows of a DoRA adapter run in a
        pass of their own (:meth:`_grouped_forward`).
        """
        if self.model is self.base:
            return self.model(**inputs)
        names = set(adapters)
        if len(names) > 1:
            if names & self._dora:
                return self._grouped_forward(adapters, **inputs)
            return self.model(**inputs, adapter_names=adapters)
        (name,) = names
        if name == BASE_ADAPTER:
            with self.model.disable_adapter():
                return self.model(**inputs)
        self.model.base_model.set_adapter(name)
        return self.model(**inputs)

    def _grouped_forward(self, adapters: list[str], **inputs: Any) -> Any:
        """One forward per DoRA adapter's rows and one for all other rows (mixed as usual).

        Each group gets its rows of every batched input and of the KV cache; logits and
        cache are put back together in row order, so callers see one batched pass.
        """
        from transformers import DynamicCache
        from transformers.modeling_outputs import CausalLMOutputWithPast

        groups: dict[str, list[int]] = {}
        for i, name in enumerate(adapters):
            groups.setdefault(name if name in self._dora else "", []).append(i)
        cache = inputs.pop("past_key_values", None)
        rows = len(adapters)
        logits: torch.Tensor | None = None
        keys: list[torch.Tensor | None] = []
        values: list[torch.Tensor | None] = []
        for indices in groups.values():
            index = torch.tensor(indices, dtype=torch.long, device=self.device)
            part = {
                k: v.index_select(0, index)
                if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows
                else v
                for k, v in inputs.items()
            }
            sub_cache = DynamicCache(config=self.base.config)
            if cache is not None and cache.get_seq_length() > 0:
                for layer_idx, layer in enumerate(cache.layers):
                    sub_cache.update(
                        layer.keys.index_select(0, index),
                        layer.values.index_select(0, index),
                        layer_idx,
                    )
            out = self._run_model([adapters[i] for i in indices], past_key_values=sub_cache, **part)
            if logits is None:
                logits = out.logits.new_empty((rows, *out.logits.shape[1:]))
                keys = [None] * len(out.past_key_values.layers)
                values = [None] * len(out.past_key_values.layers)
            logits[index] = out.logits
            for layer_idx, layer in enumerate(out.past_key_values.layers):
                if keys[layer_idx] is None:
                    keys[layer_idx] = layer.keys.new_empty((rows, *layer.keys.shape[1:]))
                    values[layer_idx] = layer.values.new_empty((rows, *layer.values.shape[1:]))
                keys[layer_idx][index] = layer.keys
                values[layer_idx][index] = layer.values
        merged = DynamicCache(config=self.base.config)
        for layer_idx, (k, v) in enumerate(zip(keys, values, strict=True)):
            merged.update(k, v, layer_idx)
        return CausalLMOutputWithPast(logits=logits, past_key_values=merged)

    def _prefill(self, rows: list[_Row]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Prompt pass over ``rows``: last-position logits, KV cache and mask per row.

        Rows with the same prompt and adapter (a group of samples of one prompt, as GRPO
        draws them, or ``n`` > 1) share one pass: only distinct prompts are computed, and
        their logits and cache are copied to every row that asked for them. Each row
        still samples from its own generator.
        """
        first: dict[tuple[tuple[int, ...], str], int] = {}
        source = [
            first.setdefault((r.request.prompt_ids, r.request.adapter), i)
            for i, r in enumerate(rows)
        ]
        distinct = sorted(first.values())
        if len(distinct) == len(rows):
            return self._prefill_rows(rows)
        logits, cache, mask = self._prefill_rows([rows[i] for i in distinct])
        position = {row: k for k, row in enumerate(distinct)}
        index = torch.tensor([position[i] for i in source], dtype=torch.long, device=self.device)
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        return logits.index_select(0, index), cache, mask.index_select(0, index)

    def _prefill_rows(self, rows: list[_Row]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        from transformers import DynamicCache

        width = max(len(r.request.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            prompt = row.request.prompt_ids
            # Left padding keeps every row's next token in the last column.
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.base.config)
        out = self._forward(
            rows, input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache
        )
        return out.logits[:, -1, :], out.past_key_values, mask

    def _decode_running(self) -> torch.Tensor:
        rows = self._running
        last = torch.tensor([[r.generated[-1]] for r in rows], dtype=torch.long, device=self.device)
        positions = self._mask.sum(-1, keepdim=True)
        mask = torch.cat([self._mask, torch.ones_like(last)], dim=-1)
        out = self._forward(
            rows,
            input_ids=last,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self._cache,
        )
        self._cache, self._mask = out.past_key_values, mask
        return out.logits[:, -1, :]

    def _merge(self, rows: list[_Row], cache: Any, mask: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter KV cache."""
        if not self._running:
            self._running, self._cache, self._mask = list(rows), cache, mask
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers, strict=True):
            old_layer.keys = torch.cat(
                [_left_pad(old_layer.keys, width), _left_pad(new_layer.keys, width)], dim=0
            )
            old_layer.values = torch.cat(
                [_left_pad(old_layer.values, width), _left_pad(new_layer.values, width)], dim=0
            )
        self._mask = torch.cat(
            [_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)], dim=0
        )
        self._running = self._running + list(rows)

    def _select(self, keep: list[int]) -> None:
        """Keep only the running rows at ``keep`` and trim columns no row needs any more."""
        if not keep:
            self._running, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._running = [self._running[i] for i in keep]
        mask = self._mask.index_select(0, index)
        # Leading columns that are padding for every remaining row are dead weight.
        first = int((mask.sum(0) > 0).nonzero()[0]) if mask.any() else 0
        self._mask = mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., first:, :]
            layer.values = layer.values.index_select(0, index)[..., first:, :]

    def _retire_finished(self, outputs: list[StepOutput]) -> None:
        finished = {o.request_id for o in outputs if o.finished}
        if not finished or not self._running:
            return
        keep = [i for i, r in enumerate(self._running) if r.request_id not in finished]
        if len(keep) != len(self._running):
            self._select(keep)

    # -------------------------------------------------------------- sampling

    def _sample_and_advance(self, rows: list[_Row], logits: torch.Tensor) -> list[StepOutput]:
        tokens = sample_tokens(
            logits, [r.request.params for r in rows], [r.generator for r in rows]
        )
        outputs = []
        for row, token in zip(rows, tokens, strict=True):
            row.generated.append(token)
            outputs.append(self._advance_text(row, token))
        return outputs

    def _advance_text(self, row: _Row, token: int) -> StepOutput:
        params = row.request.params
        prompt_len = len(row.request.prompt_ids)
        reason: str | None = None
        body = row.generated
        if token in self.stop_ids:
            reason, body = "stop", row.generated[:-1]
        elif len(row.generated) >= params.max_tokens:
            reason = "length"
        elif prompt_len + len(row.generated) >= self.context_window:
            reason = "length"
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        cut = _find_stop(text, params.stop, row.emitted)
        if cut is not None:
            text, reason = text[:cut], "stop"
        if reason is None:
            end = len(text) - _held_back(text, params.stop)
        else:
            end = len(text)
        delta = text[row.emitted : end] if end > row.emitted else ""
        row.emitted = max(row.emitted, end)
        row.text = text
        return StepOutput(
            row.request_id,
            delta,
            reason is not None,
            reason,
            prompt_len,
            len(row.generated),
            token=token,
        )

    # ------------------------------------------------------------ evaluation

    @torch.inference_mode()
    def score(
        self,
        examples: list[tuple[list[int], list[int]]],
        adapter: str = BASE_ADAPTER,
        batch_size: int = 8,
        stop: threading.Event | None = None,
    ) -> tuple[float, int]:
        """Teacher-forced next-token loss of token sequences under one adapter.

        Args:
            examples: ``(input_ids, labels)`` pairs; ``labels`` holds ``IGNORE_INDEX``
                (-100) where no loss is taken (prompt tokens).
            adapter: Adapter name or ``"__base__"``.
            batch_size: Rows per forward pass (right-padded, masked).
            stop: Set when the caller no longer wants the result (its deadline passed):
                scoring ends before the next forward pass.

        Returns:
            The summed cross-entropy in nats over labelled positions, and their count.

        Raises:
            RequestTimeout: ``stop`` was set before the last forward pass.
        """
        self._hold_adapter(adapter)
        from contextlib import nullcontext
        from functools import partial

        from rayft.trainers.loss import IGNORE_INDEX, causal_lm_loss_sums

        head = self.model.get_output_embeddings()
        base_only = adapter == BASE_ADAPTER and self.model is not self.base
        total, count = 0.0, 0
        for start in range(0, len(examples), batch_size):
            _check_stop(stop)
            chunk = examples[start : start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (row_ids, row_labels) in enumerate(chunk):
                ids[i, : len(row_ids)] = torch.tensor(row_ids)
                labels[i, : len(row_labels)] = torch.tensor(row_labels)
                mask[i, : len(row_ids)] = 1
            batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            # The training loss itself (trainers.loss): the head runs inside the same
            # adapter scope as the model, so a LoRA-wrapped head scores like training.
            with self.model.disable_adapter() if base_only else nullcontext():
                forward = (
                    self.model if base_only else partial(self._run_model, [adapter] * len(chunk))
                )
                loss, n = causal_lm_loss_sums(
                    forward, head, {k: v.to(self.device) for k, v in batch.items()}
                )
            total += float(loss)
            count += n
        if adapter != BASE_ADAPTER and adapter in self._loaded:
            self._loaded.move_to_end(adapter)
        return total, count

    @torch.inference_mode()
    def token_scores(
        self,
        sequences: list[list[int]],
        adapter: str = BASE_ADAPTER,
        top_k: int = 0,
        served: ServedAdapter | None = None,
        batch_size: int = 8,
        stop: threading.Event | None = None,
    ) -> list[TokenScores]:
        """Log-probability of every token of each sequence given the ones before it.

        One teacher-forced pass per ``batch_size`` sequences (right-padded, masked), the
        head applied a chunk of positions at a time (``trainers.loss.CHUNK_POSITIONS``),
        so no ``[batch, seq, vocab]`` logits are built. ``POST /v1/completions`` with
        ``logprobs`` or ``echo`` reports these (``serving.logprobs``).

        Args:
            sequences: Token ids (prompt then completion), each non-empty.
            adapter: Adapter name or ``"__base__"``.
            top_k: Likeliest tokens to report at each position besides the actual one.
            served: The adapter as the request resolved it.
            batch_size: Sequences per forward pass.
            stop: Set when the caller no longer wants the result (its deadline passed).

        Raises:
            RequestTimeout: ``stop`` was set before the last forward pass.
        """
        from contextlib import nullcontext
        from functools import partial

        self._hold_adapter(adapter, served)
        head = self.model.get_output_embeddings()
        base_only = adapter == BASE_ADAPTER and self.model is not self.base
        scores: list[TokenScores] = []
        for start in range(0, len(sequences), batch_size):
            _check_stop(stop)
            chunk = sequences[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, row in enumerate(chunk):
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[i, : len(row)] = 1
            # The head runs inside the adapter's scope, so a LoRA-wrapped head scores too.
            with self.model.disable_adapter() if base_only else nullcontext():
                forward = (
                    self.model if base_only else partial(self._run_model, [adapter] * len(chunk))
                )
                out = forward(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    use_cache=False,
                    output_hidden_states=True,
                    logits_to_keep=1,
                )
                hidden = out.hidden_states[-1]
                for i, row in enumerate(chunk):
                    scores.append(_row_scores(head, hidden[i, : len(row) - 1], row[1:], top_k))
        if adapter != BASE_ADAPTER and adapter in self._loaded:
            self._loaded.move_to_end(adapter)
        return scores

    def close(self) -> None:
        """Release what the engine holds outside this process (nothing: see ``VllmEngine``)."""

    def check_health(self) -> None:
        """Raise when the engine can no longer answer (never, in this process)."""

    def _hold_adapter(self, adapter: str, served: ServedAdapter | None = None) -> None:
        """Load ``adapter`` for scoring, or 503 ``busy`` when running rows hold every slot."""
        if adapter != BASE_ADAPTER and not self._ensure_adapter(
            adapter, {r.request.adapter for r in self._running}, served
        ):
            raise Unavailable(
                "every adapter slot is in use by running requests; retry shortly", code="busy"
            )


def lora_config(config: dict[str, Any]) -> Any:
    """A ``peft.LoraConfig`` from a config dict, keeping only the fields it takes (a
    policy's config as sent to rollout engines may carry PEFT's bookkeeping too)."""
    import dataclasses

    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    return LoraConfig(**{k: v for k, v in config.items() if k in known})


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise RequestTimeout(
            "the request passed its deadline (request_timeout_s); scoring stopped",
            code="request_timeout",
        )


def _row_scores(head: Any, hidden: torch.Tensor, targets: list[int], top_k: int) -> TokenScores:
    """Scores of ``targets`` from the hidden states of the positions that predict them."""
    from rayft.trainers.loss import CHUNK_POSITIONS

    wanted = torch.tensor(targets, dtype=torch.long, device=hidden.device)
    logprobs: list[float] = []
    top: list[list[tuple[int, float]]] = []
    for start in range(0, len(targets), CHUNK_POSITIONS):
        end = start + CHUNK_POSITIONS
        table = torch.log_softmax(head(hidden[start:end]).float(), dim=-1)
        logprobs += table.gather(1, wanted[start:end, None])[:, 0].tolist()
        if top_k:
            values, indices = table.topk(min(top_k, table.shape[-1]), dim=-1)
            top += [
                list(zip(row_ids, row_values, strict=True))
                for row_ids, row_values in zip(indices.tolist(), values.tolist(), strict=True)
            ]
        else:
            top += [[] for _ in range(table.shape[0])]
    return TokenScores(logprobs, top)


def _version_of(path: Path) -> str:
    """The published version ``path`` (``adapters/<name>``) links to.

    Publishing swaps a link to ``.versions/<name>/<version>``, so reading the link names
    the version without reading the manifest. An adapter directory published before
    versions is stamped by its manifest file's modification time instead.
    """
    if path.is_symlink():
        return Path(os.readlink(path)).name
    manifest = path / MANIFEST_FILE
    return f"mtime-{manifest.stat().st_mtime_ns}" if manifest.is_file() else "unversioned"


def _corrupt_adapter(name: str, err: Exception) -> InvalidParameters:
    # Listed nowhere (the registry hides it) and unusable until republished: a 422 that
    # says so, never a 500, and no other adapter is affected.
    return InvalidParameters(
        f"adapter {name!r} cannot be served: its manifest is unreadable ({err}); publish it again",
        code="invalid_adapter",
        param="model",
    )


def engine_error(err: Exception, phase: str) -> Unavailable:
    """The 503 a row gets when the engine failed while working on it."""
    return Unavailable(
        f"generation failed on this replica during {phase} ({type(err).__name__}: {err}); "
        "the request may be retried",
        code="engine_error",
    )


def sample_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Pick the next token of each row: argmax at temperature 0, else seeded nucleus sampling.

    Each row draws from its own generator, so a row's tokens do not depend on which
    other rows share its batch.
    """
    logits = logits.float().cpu()
    chosen: list[int] = []
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.temperature <= 0 or gen is None:
            chosen.append(int(torch.argmax(logits[row])))
            continue
        probs = torch.softmax(logits[row] / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            sorted_probs[before >= p.top_p] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        chosen.append(int(torch.multinomial(probs, 1, generator=gen)))
    return chosen


def _find_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    """Index where the earliest stop string starts, searching only text not yet returned."""
    best: int | None = None
    for stop in stops:
        # A stop string may begin in held-back text but never inside text already sent.
        idx = text.find(stop, max(0, emitted - len(stop) + 1))
        while idx != -1 and idx < emitted:
            idx = text.find(stop, idx + 1)
        if idx != -1 and (best is None or idx < best):
            best = idx
    return best


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that must not be sent yet.

    A trailing U+FFFD is an incomplete multi-byte character that the next token may
    complete; a suffix that is a prefix of a stop string may still become that stop.
    """
    hold = 0
    if text.endswith("\ufffd"):
        hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[-2]
    if missing <= 0:
        return t
    pad = t.new_zeros((*t.shape[:-2], missing, t.shape[-1]))
    return torch.cat([pad, t], dim=-2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    if missing <= 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)


def _random_bytes() -> bytes:
    import os

    return os.urandom(7)


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped so a diverged model reports a large finite number (trainers.loss)."""
    from rayft.trainers.loss import perplexity as capped_perplexity

    return capped_perplexity(loss)
