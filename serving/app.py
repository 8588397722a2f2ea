"""The Ray Serve application: one deployment serving a base model and all its adapters.

Use it through Serve's own tooling::

    serve run rayft.serving.app:build_app model=tiny-llama max_loaded_adapters=4

or a Serve config file whose application has ``import_path: rayft.serving.app:build_app`` and
``args:`` matching ``ServeArgs``; or ``rayft serve`` which builds the same application.

Each replica loads the base model once and keeps up to ``max_loaded_adapters`` LoRA
adapters in one PEFT model (see ``serving.engine`` for why this replaces
``@serve.multiplexed``); concurrent requests for different adapters share forward
passes through the replica's continuous-batching loop (``serving.batching``).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

DEPLOYMENT_NAME = "rayft"


class ServeArgs(BaseModel):
    """Typed arguments of ``build_app``; unknown keys are rejected.

    Ray Serve settings (``num_replicas``, ``autoscaling_config``, ``max_ongoing_requests``,
    ``max_queued_requests``) are passed through to the deployment unchanged.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = "smollm2-135m-instruct"
    """Base model: builtin id, published model, local HF directory or hub id."""
    storage: str | None = None
    """rayft root holding the adapter registry; default ``$RAYFT_HOME``."""
    max_loaded_adapters: int = Field(8, ge=1)
    """Adapters each replica holds at most (least recently used is evicted)."""
    num_replicas: int | Literal["auto"] | None = None
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int | None = Field(None, ge=1)
    max_queued_requests: int | None = None
    max_batch_size: int = Field(16, ge=1)
    """Rows decoded together in one forward pass."""
    batch_wait_timeout_s: float = Field(0.005, ge=0.0)
    """After idling, how long the first request waits for others to share its batch."""
    max_tokens_limit: int = Field(1024, ge=1)
    max_prompt_tokens: int = Field(4096, ge=1)
    max_eval_rows: int = Field(2000, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_cpus: float = Field(1.0, ge=0.0)
    """CPUs reserved per replica (``ray_actor_options``)."""
    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs per replica; 0 runs on CPU."""


def parse_args(args: dict[str, Any] | ServeArgs | None) -> ServeArgs:
    """Validate builder arguments, reporting every problem with its key."""
    if isinstance(args, ServeArgs):
        return args
    try:
        return ServeArgs.model_validate(dict(args or {}))
    except ValidationError as err:
        from rayft.trainers.config import ConfigError

        problems = [(".".join(map(str, e["loc"])), e["msg"]) for e in err.errors()]
        raise ConfigError(problems, source="serve arguments") from None


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64)
@serve.ingress()
class ModelServer:
    """One replica: the base model, its adapter LRU and the OpenAI-compatible routes."""

    def __init__(self, args: dict[str, Any]) -> None:
        from rayft.serving.engine import ModelEngine
        from rayft.serving.service import Limits, ModelService

        cfg = ServeArgs.model_validate(args)
        engine = ModelEngine(
            cfg.model,
            storage=cfg.storage,
            max_loaded_adapters=cfg.max_loaded_adapters,
            dtype=cfg.dtype,
            max_batch_size=cfg.max_batch_size,
        )
        limits = Limits(
            max_tokens_limit=cfg.max_tokens_limit,
            max_prompt_tokens=cfg.max_prompt_tokens,
            max_eval_rows=cfg.max_eval_rows,
        )
        self.service = ModelService(engine, limits, cfg.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self):
        from rayft.serving.openai_api import create_api

        return create_api(self.service)

    def loaded_adapters(self) -> list[str]:
        """Adapters this replica holds now (least recently used first)."""
        return self.service.engine.loaded_adapters()

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Serve's application builder: ``serve run rayft.serving.app:build_app key=value ...``.

    Args:
        args: ``ServeArgs`` fields as a dict (strings from the command line are coerced).

    Returns:
        The bound application, ready for ``serve.run``.
    """
    cfg = parse_args(args)
    options: dict[str, Any] = {
        "ray_actor_options": _actor_options(cfg),
    }
    if cfg.autoscaling_config is not None:
        options["autoscaling_config"] = cfg.autoscaling_config
    if cfg.num_replicas is not None:
        options["num_replicas"] = cfg.num_replicas
    if cfg.max_ongoing_requests is not None:
        options["max_ongoing_requests"] = cfg.max_ongoing_requests
    if cfg.max_queued_requests is not None:
        options["max_queued_requests"] = cfg.max_queued_requests
    return ModelServer.options(**options).bind(cfg.model_dump(mode="json"))


def _actor_options(cfg: ServeArgs) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": cfg.num_cpus}
    if cfg.num_gpus:
        options["num_gpus"] = cfg.num_gpus
    # Replicas resolve the registry and the API key from the driver's environment.
    keys = ("RAYFT_HOME", "RAYFT_MODEL_CACHE", "RAYFT_API_KEY", "HF_HUB_OFFLINE")
    env = {k: os.environ[k] for k in keys if os.environ.get(k)}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options
