"""Rollout engines: rayft's serving engine, as Ray actors, sampling a GRPO run's answers.

A run of ``objective: grpo`` samples its groups of answers here, not with
``model.generate`` inside a training worker: ``grpo.rollout_workers`` actors each hold the
base model in a ``serving.engine.ModelEngine`` (or, with ``grpo.rollout_engine: vllm``, a
``serving.vllm_engine.VllmEngine``) and decode every prompt of a batch
together (continuous batching, one forward pass per token for all rows). After each
optimizer step the policy reaches them through the engine's adapter reload
(``ModelEngine.set_adapter_weights``: the LoRA tensors, no file) or, for full weights, a
broadcast of the state dict (``set_base_weights``).

Rank 0 of the run's workers creates the actors, outside the run's placement group, and
owns them: they end with it. Every rank finds them by name. The driver hands the workers a
:class:`RolloutEngines` (``WorkerInputs.rollouts``), so the objective itself never imports
the serving engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rayft.trainers.graders import JUDGE_MAX_TOKENS, JudgeError, JudgeReply
from rayft.trainers.graders import SamplingParams as JudgeSampling

if TYPE_CHECKING:
    from rayft.trainers.config import JobSpec
    from rayft.trainers.storage import StorageRoot

POLICY_ADAPTER = "policy"
"""The rollout engine's name for the policy's LoRA adapter."""
NAMESPACE = "rayft-rollouts"


@dataclass(frozen=True)
class Sampled:
    """One sampled answer: its token ids (end-of-turn token included when it stopped),
    its text, and why it ended (``stop`` or ``length``)."""

    token_ids: list[int]
    text: str
    finish_reason: str


class RolloutEngine:
    """A ``ModelEngine`` that answers batches of prompts with the run's current policy."""

    def __init__(
        self,
        model_dir: str,
        storage: str | None,
        dtype: str,
        batch: int,
        engine: str = "native",
        lora_rank: int = 16,
        cpus: int = 0,
        full: bool = False,
    ) -> None:
        """``lora_rank`` and ``cpus`` size a vLLM engine (``VllmEngine``'s ``max_lora_rank``
        and ``cpus``): the policy's LoRA rank, and the actor's CPUs. ``full``: the policy
        comes as full weights (``set_base``), which a vLLM engine reloads in place; it then
        runs without LoRA layers, which cost it speed on every token."""
        from rayft.serving.engine import ModelEngine
        from rayft.serving.vllm_engine import VllmEngine

        common = {"storage": storage, "dtype": dtype, "max_batch_size": max(1, batch)}
        if engine == "vllm":
            self.engine = VllmEngine(
                model_dir,
                **common,
                max_lora_rank=lora_rank,
                cpus=cpus,
                lora=not full,
                weight_reload=full,
            )
        else:
            self.engine = ModelEngine(model_dir, **common)
        self.adapter = False

    def set_adapter(self, config: dict[str, Any], weights: dict[str, Any]) -> None:
        """The policy's LoRA weights, after an optimizer step."""
        self.engine.set_adapter_weights(POLICY_ADAPTER, config, weights)
        self.adapter = True

    def set_base(self, weights: dict[str, Any]) -> None:
        """The policy's full weights, after an optimizer step."""
        self.engine.set_base_weights(weights)

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[Sampled]:
        """``n`` answers to each prompt, prompt-major (prompt 0's answers first).

        Answer ``j`` of prompt ``i`` draws from its own generator seeded ``seed + i * n + j``,
        so a resumed run samples what the interrupted one would have.
        """
        from rayft.serving.engine import BASE_ADAPTER, GenerationRequest, SamplingParams

        adapter = POLICY_ADAPTER if self.adapter else BASE_ADAPTER
        requests = [
            GenerationRequest(
                prompt_ids=tuple(int(t) for t in prompt),
                adapter=adapter,
                params=SamplingParams(
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed + i * n + j,
                ),
            )
            for i, prompt in enumerate(prompts)
            for j in range(n)
        ]
        done = self.engine.generate(requests)
        return [Sampled(list(c.token_ids), c.text, c.finish_reason) for c in done]


def actor_name(run: str, index: int) -> str:
    return f"rayft-rollout-{run}-{index}"


def start_engines(spec: JobSpec, run: str, model_dir: str, dtype: str, batch: int) -> list[Any]:
    """Create the run's rollout engines (rank 0), outside the run's placement group."""
    import ray

    grpo = spec.grpo
    remote = ray.remote(RolloutEngine)
    actors = [
        remote.options(
            name=actor_name(run, index),
            namespace=NAMESPACE,
            get_if_exists=True,
            num_cpus=grpo.rollout_cpus,
            num_gpus=grpo.rollout_gpus,
            scheduling_strategy="DEFAULT",
            max_concurrency=1,
        ).remote(
            model_dir,
            spec.storage,
            dtype,
            batch,
            grpo.rollout_engine,
            spec.lora.r,
            int(grpo.rollout_cpus),
            spec.method == "full",
        )
        for index in range(grpo.rollout_workers)
    ]
    # Wait for every engine to hold its model, so a failure to start surfaces here; an
    # engine the cluster cannot place fails the run after scaling.start_timeout_s.
    ready = [a.__ray_ready__.remote() for a in actors]
    timeout = spec.scaling.start_timeout_s
    _, waiting = ray.wait(ready, num_returns=len(ready), timeout=timeout)
    if waiting:
        from rayft.trainers.startup import StartTimeoutError

        for actor in actors:
            ray.kill(actor)
        free = ray.available_resources().get("CPU", 0.0)
        raise StartTimeoutError(
            f"{len(waiting)} of the run's {len(actors)} rollout engine(s) did not start within "
            f"{timeout:g} s (scaling.start_timeout_s): each asks for grpo.rollout_cpus="
            f"{grpo.rollout_cpus:g} CPU(s) and grpo.rollout_gpus={grpo.rollout_gpus:g} GPU(s), "
            f"and the cluster has {free:g} CPU(s) free; lower grpo.rollout_cpus, free or add "
            "CPUs, or raise scaling.start_timeout_s"
        )
    ray.get(ready)
    return actors


def find_engine(spec: JobSpec, run: str, rank: int) -> Any:
    """The rollout engine of worker ``rank`` (``rank % grpo.rollout_workers``)."""
    import ray

    return ray.get_actor(actor_name(run, rank % spec.grpo.rollout_workers), namespace=NAMESPACE)


def local_judge(storage: str | None) -> Any:
    """This process's judge of model graders for the registry at ``storage`` (``None``:
    ``$RAYFT_HOME``), made on first use (:class:`LocalJudge`)."""
    from rayft.trainers.storage import StorageRoot

    with _JUDGE_LOCK:
        if storage not in _JUDGES:
            _JUDGES[storage] = LocalJudge(StorageRoot.resolve(storage), dtype="float32")
        return _JUDGES[storage]


_JUDGES: dict[str | None, Any] = {}
_JUDGE_LOCK = threading.Lock()


@dataclass(frozen=True)
class RolloutEngines:
    """Starts (rank 0) and finds (every rank) a run's rollout engines, for the objective;
    and loads, where a run grades, the judges its model graders ask."""

    def start(self, spec: JobSpec, run: str, model_dir: str, dtype: str, batch: int) -> list[Any]:
        return start_engines(spec, run, model_dir, dtype, batch)

    def find(self, spec: JobSpec, run: str, rank: int) -> Any:
        return find_engine(spec, run, rank)

    def judge(self, storage: str | None) -> Any:
        return local_judge(storage)


# --------------------------------------------------------------------- model graders' judges
# A served grader asks the replica's engine (``cluster.graders_api.EngineJudge``). A GRPO run
# has no server to ask: its grading actor loads the judge itself, on rayft's serving engine,
# the first time a grader names it. ``model`` is either a published adapter (it runs on the
# base model its manifest names, and must fit that base as it would to be served) or a model
# rayft loads by name (a builtin, a published model, a local directory). One engine per base
# model is kept; grading threads take turns on it.


class LocalJudge:
    """Runs judge models on engines this process loads on first use.

    Args:
        root: The registry that published adapters and models are found in.
        dtype: Weights' dtype for the judge's engine (``auto``, ``float32``, ...).
    """

    def __init__(self, root: StorageRoot, dtype: str = "auto") -> None:
        self.root = root
        self.dtype = dtype
        self._engines: dict[str, Any] = {}
        self._decoders: dict[str, BatchDecoder] = {}
        self._loading = threading.Lock()

    def __call__(
        self, model: str, messages: list[dict[str, str]], params: JudgeSampling | None
    ) -> JudgeReply:
        from rayft.serving.engine import ServingError

        try:
            base, adapter = self._route(model)
            engine, decoder = self._engine(base)
            sampling = params or JudgeSampling()
            request, completion = decoder.complete(
                lambda: _judge_request(engine, adapter, messages, sampling)
            )
            return JudgeReply(
                completion.text, len(request.prompt_ids) + completion.completion_tokens
            )
        except JudgeError:
            raise
        except ServingError as err:
            raise JudgeError(f"judge {model!r}: {err.message}") from None
        except (OSError, ValueError, RuntimeError) as err:
            raise JudgeError(f"judge {model!r} could not be loaded or run: {err}") from None

    def _route(self, model: str) -> tuple[str, str | None]:
        """The base model to load and the adapter on it (``None``: the base itself)."""
        return judge_route(model, self.root)

    def _engine(self, base: str) -> tuple[Any, BatchDecoder]:
        from rayft.serving.engine import ModelEngine

        with self._loading:
            if base not in self._engines:
                engine = ModelEngine(base, storage=self.root, dtype=self.dtype)
                self._engines[base] = engine
                self._decoders[base] = BatchDecoder(engine)
            return self._engines[base], self._decoders[base]


class BatchDecoder:
    """Decodes the requests of concurrent callers on one engine together.

    A caller queues how to build its request, then waits for the engine; whoever gets it
    builds every request queued by then (resolving an adapter loads it into the engine,
    so that happens only while holding it) and decodes them as one batch
    (``ModelEngine.generate``): judge calls made at once by the grading threads share
    their decode steps instead of taking turns. A batch that fails is decoded again one
    request at a time, so each caller gets its own request's error and no other's.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._decoding = threading.Lock()
        self._queued = threading.Lock()
        self._pending: list[tuple[Callable[[], Any], Future]] = []
        self.batches: list[int] = []
        """Sizes of the batches decoded so far, in order."""

    def complete(self, build: Callable[[], Any]) -> tuple[Any, Any]:
        """``(request, completion)``: the request ``build()`` gives, decoded (a
        ``serving.engine.Completion``), possibly in one batch with other callers'."""
        done: Future = Future()
        with self._queued:
            self._pending.append((build, done))
        with self._decoding:
            with self._queued:
                batch, self._pending = self._pending, []
            self._decode(batch)
        return done.result()

    def _decode(self, batch: list[tuple[Callable[[], Any], Future]]) -> None:
        built: list[tuple[Any, Future]] = []
        for build, done in batch:
            try:
                built.append((build(), done))
            except Exception as err:  # noqa: BLE001 - handed to the caller waiting on it
                done.set_exception(err)
        if not built:
            return
        self.batches.append(len(built))
        try:
            outs = self.engine.generate([request for request, _ in built])
        except Exception:  # noqa: BLE001 - each request is tried alone for its own error
            for request, done in built:
                _settle(done, lambda r=request: (r, self.engine.generate([r])[0]))
            return
        for (request, done), out in zip(built, outs, strict=True):
            done.set_result((request, out))


def _settle(done: Future, run: Callable[[], Any]) -> None:
    """Set ``done`` to what ``run()`` returns, or to the exception it raises."""
    try:
        done.set_result(run())
    except Exception as err:  # noqa: BLE001 - handed to the caller waiting on ``done``
        done.set_exception(err)


def judge_route(model: str, root: StorageRoot) -> tuple[str, str | None]:
    """The base model a judge runs on and the adapter on it (``None``: the base itself).

    Raises:
        JudgeError: ``model`` is a published adapter whose manifest is corrupt or names no
            base model.
    """
    from rayft.trainers.manifest import ArtifactManifest, ManifestError
    from rayft.trainers.registry import RegistryError, sync_adapter

    try:
        path = sync_adapter(model, root)
    except ManifestError as err:
        raise JudgeError(f"judge {model!r}: its published manifest is corrupt ({err})") from None
    except RegistryError:
        return model, None  # not an adapter's name: a model's
    if not (path / "adapter_config.json").is_file():
        return model, None
    manifest = ArtifactManifest.find(path)
    if manifest is None or not manifest.base_model:
        raise JudgeError(
            f"judge {model!r} is an adapter whose manifest names no base model; "
            "publish it with rayft so that its base is known"
        )
    return manifest.base_model, model


def check_judges(judges: list[tuple[str, str]], root: StorageRoot) -> None:
    """Fail before Ray starts when a judge cannot load: an adapter of ``root``'s registry
    without a known base, or a model that resolves nowhere.

    Args:
        judges: ``(dotted key, model)`` pairs (an objective's ``judges``).
        root: Where published adapters and models are found. Resolving a model fetches a
            builtin or a published model into its cache, as the grading actor would on its
            first grade.

    Raises:
        ModelError: naming the key, the judge and why it cannot load.
    """
    from rayft.trainers.models import ModelError, resolve_model

    for key, model in judges:
        try:
            base, _ = judge_route(model, root)
            resolve_model(base, root.models, root)
        except (JudgeError, ModelError) as err:
            raise ModelError(
                f"{key}: {err}; name a builtin model, a published model or adapter, or a "
                "local model directory"
            ) from None


def _judge_request(
    engine: Any, adapter: str | None, messages: list[dict[str, str]], params: JudgeSampling
) -> Any:
    """The engine's request for one chat completion of ``messages`` (through ``adapter``)."""
    from rayft.serving.engine import BASE_ADAPTER, GenerationRequest, SamplingParams

    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise JudgeError(f"judge {engine.model_name!r} has no chat template to read messages with")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    room = engine.context_window - len(ids)
    if room < 1:
        raise JudgeError(
            f"the judge's prompt is {len(ids)} tokens, beyond {engine.model_name!r}'s "
            f"{engine.context_window}-token window"
        )
    sampling = SamplingParams(
        max_tokens=min(params.max_completions_tokens or JUDGE_MAX_TOKENS, room),
        temperature=0.0 if params.temperature is None else params.temperature,
        top_p=1.0 if params.top_p is None else params.top_p,
        seed=params.seed,
    )
    served = engine.resolve_adapter(adapter) if adapter is not None else None
    return GenerationRequest(ids, adapter or BASE_ADAPTER, sampling, served)
