"""The judge of model graders (``score_model``, ``label_model``) in training.

A served grader asks the replica's engine (``cluster.graders_api.EngineJudge``). A GRPO run
has no server to ask: its grading actor loads the judge itself, on rayft's serving engine,
the first time a grader names it. ``model`` is either a published adapter (it runs on the
base model its manifest names, and must fit that base as it would to be served) or a model
rayft loads by name (a builtin, a published model, a local directory). One engine per base
model is kept; grading threads take turns on it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from rayft.trainers.graders import JudgeError, JudgeReply, SamplingParams

if TYPE_CHECKING:
    from rayft.trainers.storage import StorageRoot

JUDGE_MAX_TOKENS = 512
"""Most tokens a judge writes when its grader's ``sampling_params`` name no limit."""


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
        self._locks: dict[str, threading.Lock] = {}
        self._loading = threading.Lock()

    def __call__(
        self, model: str, messages: list[dict[str, str]], params: SamplingParams | None
    ) -> JudgeReply:
        from rayft.serving.errors import ServingError

        try:
            base, adapter = self._route(model)
            engine, lock = self._engine(base)
            with lock:  # one thread at a time decodes on an engine
                return _complete(engine, adapter, messages, params or SamplingParams())
        except JudgeError:
            raise
        except ServingError as err:
            raise JudgeError(f"judge {model!r}: {err.message}") from None
        except (OSError, ValueError, RuntimeError) as err:
            raise JudgeError(f"judge {model!r} could not be loaded or run: {err}") from None

    def _route(self, model: str) -> tuple[str, str | None]:
        """The base model to load and the adapter on it (``None``: the base itself)."""
        from rayft.trainers.manifest import ArtifactManifest, ManifestError
        from rayft.trainers.registry import RegistryError, sync_adapter

        try:
            path = sync_adapter(model, self.root)
        except ManifestError as err:
            raise JudgeError(
                f"judge {model!r}: its published manifest is corrupt ({err})"
            ) from None
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

    def _engine(self, base: str) -> tuple[Any, threading.Lock]:
        from rayft.serving.engine import ModelEngine

        with self._loading:
            if base not in self._engines:
                self._engines[base] = ModelEngine(base, storage=self.root, dtype=self.dtype)
                self._locks[base] = threading.Lock()
            return self._engines[base], self._locks[base]


def _complete(
    engine: Any, adapter: str | None, messages: list[dict[str, str]], params: SamplingParams
) -> JudgeReply:
    """One chat completion of ``messages`` on ``engine`` (through ``adapter`` if named)."""
    from rayft.serving.engine import BASE_ADAPTER, GenerationRequest
    from rayft.serving.engine import SamplingParams as Sampling

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
    sampling = Sampling(
        max_tokens=min(params.max_completions_tokens or JUDGE_MAX_TOKENS, room),
        temperature=0.0 if params.temperature is None else params.temperature,
        top_p=1.0 if params.top_p is None else params.top_p,
        seed=params.seed,
    )
    served = engine.resolve_adapter(adapter) if adapter is not None else None
    request = GenerationRequest(ids, adapter or BASE_ADAPTER, sampling, served)
    completion = engine.generate([request])[0]
    return JudgeReply(completion.text, len(ids) + completion.completion_tokens)
