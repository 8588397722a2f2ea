"""The Ray Serve application: one deployment serving a base model and all its adapters.

``build_app`` is the inference application (the OpenAI-compatible inference routes):

    serve run rayft.serving.app:build_app model=tiny-llama max_loaded_adapters=4

The rayft service, inference plus OpenAI's files and fine-tuning jobs routes, is the same
deployment with the control plane's router included (``cluster.service_app``); that is what
``rayft serve`` runs, and what a Serve config file names with ``import_path:
rayft.cluster.service_app:build_service_app`` and ``args:`` matching ``ServeArgs``.
Routers are passed as ``"module:attribute"`` import paths and imported in each replica, so
this package never imports the control plane.

Each replica loads the base model once and keeps up to ``max_loaded_adapters`` LoRA
adapters in one PEFT model (see ``serving.engine`` for why this replaces
``@serve.multiplexed``); concurrent requests for different adapters share forward
passes through the replica's continuous-batching loop (``serving.batching``).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from ray import serve

from rayft.trainers.job_limits import JobLimits, ProjectQuotas

DEPLOYMENT_NAME = "rayft"
SERVE_HOST_ENV = "RAY_SERVE_DEFAULT_HTTP_HOST"
"""Ray Serve's default interface for its HTTP proxy."""


class ServeArgs(BaseModel):
    """Typed arguments of ``build_app``; unknown keys are rejected.

    Ray Serve settings (``num_replicas``, ``autoscaling_config``, ``max_ongoing_requests``,
    ``max_queued_requests``) are passed through to the deployment unchanged. Requests
    beyond ``max_ongoing_requests`` per replica wait in Serve's queue; beyond
    ``max_queued_requests`` more they are answered 429 at once, with ``Retry-After``.
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
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests one replica works on at once (its rows share the decode batch)."""
    max_queued_requests: int = Field(256, ge=-1)
    """Requests waiting for a replica before new ones get 429; -1 means no bound."""
    retry_after_s: float = Field(1.0, ge=0.0)
    """``Retry-After`` of a 429 answer."""
    request_timeout_s: float = Field(600.0, gt=0.0)
    """Deadline of every request; past it the request is answered 503 ``request_timeout``."""
    max_batch_size: int = Field(16, ge=1)
    """Rows decoded together in one forward pass."""
    batch_wait_timeout_s: float = Field(0.005, ge=0.0)
    """After idling, how long the first request waits for others to share its batch."""
    max_tokens_limit: int = Field(1024, ge=1)
    max_prompt_tokens: int = Field(4096, ge=1)
    max_eval_rows: int = Field(2000, ge=1)
    max_logprob_tokens: int = Field(65536, ge=1)
    """Most tokens one completion with ``logprobs`` or ``echo`` may have scored (prompts plus
    ``max_tokens``, times ``n``; 400 past it)."""
    max_file_bytes: int = Field(512 * 1024 * 1024, ge=1)
    """Largest training file ``POST /v1/files`` accepts (413 past it)."""
    max_concurrent_uploads: int = Field(4, ge=1)
    """``POST /v1/files`` uploads one replica receives at once (429 past it)."""
    max_queued_rows: int = Field(2048, ge=1, validate_default=True)
    """Rows queued and decoding on one replica at once (429 past it); at least max_eval_rows."""
    job_limits: JobLimits = Field(default_factory=JobLimits)
    """Bounds on each fine-tuning job: workers, CPUs, GPUs, steps, epochs, batch size,
    checkpoints (``trainers.job_limits.JobLimits``; 400 naming the key past one)."""
    project_quotas: ProjectQuotas = Field(default_factory=ProjectQuotas)
    """What each project may keep and ask for: files and their bytes, jobs that have not
    ended, requests per second per replica, checkpoint retention
    (``trainers.job_limits.ProjectQuotas``; 429 ``quota_exceeded`` past one)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    engine: Literal["auto", "native", "vllm"] = "auto"
    """What decodes: ``native`` (rayft's engine), ``vllm`` (vLLM's server beside the replica,
    ``serving.vllm_engine``) or ``auto`` (vLLM where it is installed and a GPU is present)."""
    vllm_python: str | None = None
    """The interpreter with vLLM; default ``$RAYFT_VLLM_PYTHON``, then ``.venv-vllm``
    (``scripts/install_vllm.sh``), then this one when it imports vLLM."""
    max_lora_rank: int = Field(16, ge=1, le=512)
    """Highest LoRA rank vLLM reserves room for (vLLM's default, and rayft's training rank);
    adapters above it are served natively. Rounded up to a rank vLLM takes (1, 8, 16, 32,
    64, 128, 256, 320, 512). vLLM pads every adapter to it, so a larger one slows every row,
    the base model's included."""
    vllm_lora: bool = True
    """Whether vLLM serves adapters (LoRA layers on). Off, vLLM decodes the base model
    alone, faster (about 1.4x on a CPU), and adapters' rows run on the native engine."""
    vllm_start_timeout_s: float = Field(600.0, gt=0.0, le=3600.0)
    """How long vLLM's server may take to load the model and answer."""
    vllm_gpu_memory_utilization: float = Field(0.8, gt=0.0, lt=1.0)
    """The share of the GPU vLLM takes (its ``--gpu-memory-utilization``); the rest holds
    the replica's native engine, which serves what vLLM cannot."""
    num_cpus: float = Field(1.0, ge=0.0)
    """CPUs reserved per replica (``ray_actor_options``)."""
    num_gpus: float = Field(0.0, ge=0.0)
    """GPUs per replica; 0 runs on CPU."""
    request_log: bool = False
    """Write a JSON line per completion request to ``<storage>/request_logs/`` (per replica)."""
    log_payloads: bool = False
    """Also log prompts and outputs (needs ``request_log``); evaluations can then read them."""
    request_log_retention_days: int = Field(30, ge=1)
    """Days of request log kept (today included); older days are deleted, at a URI root too."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """``Host`` names the API answers to besides loopback (``"*"``: any, behind a proxy
    that checks them); the interface Serve binds is added (``serving.http_guard``)."""
    grace_period_s: float = Field(30.0, ge=0.0)
    """On shutdown, how long requests already admitted may take to finish."""

    @field_validator("max_queued_rows", mode="after")
    @classmethod
    def _queue_holds_an_evaluation(cls, value: int, info: ValidationInfo) -> int:
        rows = info.data.get("max_eval_rows")
        if rows is not None and value < rows:
            raise ValueError(
                f"max_queued_rows={value} is under max_eval_rows={rows}: an evaluation queues "
                "all its rows at once; raise max_queued_rows or lower max_eval_rows"
            )
        return value

    @field_validator("log_payloads")
    @classmethod
    def _payloads_need_the_log(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not info.data.get("request_log"):
            raise ValueError("log_payloads=true needs request_log=true (payloads go to that log)")
        return value


def parse_args(args: dict[str, Any] | ServeArgs | None) -> ServeArgs:
    """Validate builder arguments, reporting every problem with its key."""
    if isinstance(args, ServeArgs):
        return args
    try:
        return ServeArgs.model_validate(dict(args or {}))
    except ValidationError as err:
        from rayft.trainers.config import ConfigError
        from rayft.trainers.validation_errors import error_key

        problems = [(error_key(e["loc"], ServeArgs), e["msg"]) for e in err.errors()]
        raise ConfigError(problems, source="serve arguments") from None


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64)
@serve.ingress()
class ModelServer:
    """One replica: the base model, its adapter LRU and the OpenAI-compatible routes."""

    def __init__(
        self,
        args: dict[str, Any],
        api_key_sha256: str | None = None,
        routers: list[str] | None = None,
    ) -> None:
        from rayft.serving.http_guard import Admission
        from rayft.serving.metrics import replica_metrics
        from rayft.serving.request_log import RequestLog
        from rayft.serving.service import Limits, ModelService
        from rayft.trainers.compat import replica_grpc_on_loopback

        replica_grpc_on_loopback()  # before Serve starts this replica's gRPC server
        cfg = ServeArgs.model_validate(args)
        self.routers = list(routers or [])
        self.allowed_hosts = list(cfg.allowed_hosts)
        self.grace_period_s = cfg.grace_period_s
        self.admission = Admission()
        engine = _engine(cfg)
        limits = Limits(
            max_tokens_limit=cfg.max_tokens_limit,
            max_prompt_tokens=cfg.max_prompt_tokens,
            max_eval_rows=cfg.max_eval_rows,
            max_logprob_tokens=cfg.max_logprob_tokens,
            max_file_bytes=cfg.max_file_bytes,
            max_concurrent_uploads=cfg.max_concurrent_uploads,
            max_queued_rows=cfg.max_queued_rows,
            job_limits=cfg.job_limits,
            project_quotas=cfg.project_quotas,
        )
        self.service = ModelService(
            engine,
            limits,
            cfg.batch_wait_timeout_s,
            api_key_sha256=api_key_sha256,
            request_timeout_s=cfg.request_timeout_s,
            metrics=replica_metrics(),
            request_log=(
                RequestLog(
                    engine.storage,
                    log_payloads=cfg.log_payloads,
                    retention_days=cfg.request_log_retention_days,
                )
                if cfg.request_log
                else None
            ),
        )

    def __serve_build_asgi_app__(self):
        from rayft.serving.openai_api import create_api

        routers = [import_router(path) for path in self.routers]
        return create_api(
            self.service, routers, allowed_hosts=self.allowed_hosts, admission=self.admission
        )

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's ``user_config``: ``{"draining": true}`` stops admitting new requests.

        Returns once the requests already admitted finished, or after ``grace_period_s``;
        the redeploy that sets it (``drain_app``) returns when every replica has.
        """
        if config.get("draining"):
            await self.admission.drain(self.grace_period_s)

    def loaded_adapters(self) -> list[str]:
        """Adapters this replica holds now (least recently used first)."""
        return self.service.engine.loaded_adapters()

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine stopped is replaced."""
        self.service.engine.check_health()

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


def _engine(cfg: ServeArgs) -> Any:
    """The replica's engine: ``ModelEngine``, or ``VllmEngine`` for ``engine: vllm``."""
    from rayft.serving.engine import ModelEngine
    from rayft.serving.vllm_engine import VllmEngine, pick_engine

    common = {
        "storage": cfg.storage,
        "max_loaded_adapters": cfg.max_loaded_adapters,
        "dtype": cfg.dtype,
        "max_batch_size": cfg.max_batch_size,
    }
    if pick_engine(cfg.engine, cfg.vllm_python) == "native":
        return ModelEngine(cfg.model, **common)
    return VllmEngine(
        cfg.model,
        **common,
        vllm_python=cfg.vllm_python,
        max_lora_rank=cfg.max_lora_rank,
        start_timeout_s=cfg.vllm_start_timeout_s,
        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        cpus=int(cfg.num_cpus),
        lora=cfg.vllm_lora,
    )


def build_app(args: dict[str, Any] | ServeArgs | None = None) -> serve.Application:
    """Serve's application builder: ``serve run rayft.serving.app:build_app key=value ...``.

    Refuses, like ``rayft serve``, to serve beyond loopback without ``RAYFT_API_KEY``: the
    interface is the one Serve's HTTP proxy binds (``serve_http_host``).

    Args:
        args: ``ServeArgs`` fields as a dict (strings from the command line are coerced).

    Returns:
        The bound application, ready for ``serve.run``.

    Raises:
        InsecureServing: Serve binds beyond loopback and no API key is set.
    """
    return bind_app(args)


def bind_app(
    args: dict[str, Any] | ServeArgs | None = None,
    routers: list[str] | None = None,
    *,
    http_host: str | None = None,
    insecure: bool = False,
    draining: bool = False,
    version: str | None = None,
) -> serve.Application:
    """The rayft deployment bound to its arguments (what every builder returns).

    Args:
        args: ``ServeArgs`` fields as a dict (strings from the command line are coerced).
        routers: ``"module:attribute"`` import paths of FastAPI ``APIRouter`` objects each
            replica includes next to the inference routes.
        http_host: The interface Serve's HTTP proxy binds; default: ``serve_http_host()``.
        insecure: Serve beyond loopback even without ``RAYFT_API_KEY``.
        draining: Replicas admit no new request (the redeploy of a graceful stop).
        version: Serve's code version of the deployment; two deploys of one version
            that differ only in ``draining`` reconfigure the running replicas in place.

    Returns:
        The bound application, ready for ``serve.run``.

    Raises:
        InsecureServing: ``http_host`` is not loopback, no API key is set and not ``insecure``.
    """
    from ray.serve.config import BackpressureConfig

    from rayft.serving.http_guard import bind_host_names, check_exposure
    from rayft.serving.service import key_digest

    cfg = parse_args(args)
    host = http_host or serve_http_host()
    check_exposure(host, insecure, cfg.storage)
    routers = list(routers or [])
    for path in routers:
        import_router(path)  # a wrong path fails here, not in every replica
    options: dict[str, Any] = {
        "ray_actor_options": _actor_options(cfg),
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=cfg.retry_after_s),
        "graceful_shutdown_timeout_s": cfg.grace_period_s,
        "user_config": {"draining": draining},
    }
    if cfg.autoscaling_config is not None:
        options["autoscaling_config"] = cfg.autoscaling_config
    if cfg.num_replicas is not None:
        options["num_replicas"] = cfg.num_replicas
    served = cfg.model_dump(mode="json")
    served["allowed_hosts"] = [*cfg.allowed_hosts, *bind_host_names(host)]
    # The replica gets the key's digest as an init argument, never the key: runtime
    # environments (env_vars) are shown to anyone who can reach Ray's dashboard.
    key = os.environ.get("RAYFT_API_KEY")
    digest = key_digest(key) if key else None
    deployment = ModelServer.options(**options)
    if version is not None:
        from rayft.trainers.compat import with_serve_version

        deployment = with_serve_version(deployment, version)
    return deployment.bind(served, digest, routers)


def serve_http_host() -> str:
    """The interface Serve's HTTP proxy binds: the running proxy's, else Serve's default.

    Serve's default is ``$RAY_SERVE_DEFAULT_HTTP_HOST`` or loopback; a Serve config
    file's ``http_options.host`` is the running proxy's by the time its builders run.
    """
    import ray
    from ray.serve.config import HTTPOptions

    from rayft.trainers.compat import serve_proxy_address

    if ray.is_initialized():
        try:
            return serve_proxy_address()[0]
        except Exception:  # noqa: BLE001 - no Serve runs yet: it will start with its defaults
            pass
    # Serve reads its default when it is imported; the variable may have been set since.
    return os.environ.get(SERVE_HOST_ENV) or HTTPOptions().host or "127.0.0.1"


def import_router(path: str) -> Any:
    """The ``APIRouter`` at ``path``, written ``"package.module:attribute"``.

    Raises:
        ValueError: ``path`` is malformed, or names no ``APIRouter``.
    """
    import importlib

    from fastapi import APIRouter

    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"router {path!r}: write it as 'package.module:attribute'")
    try:
        router = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"router {path!r}: {err}") from None
    if not isinstance(router, APIRouter):
        raise ValueError(f"router {path!r} is a {type(router).__name__}, not a FastAPI APIRouter")
    return router


def _actor_options(cfg: ServeArgs) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": cfg.num_cpus}
    if cfg.num_gpus:
        options["num_gpus"] = cfg.num_gpus
    # Replicas resolve the registry from the driver's environment (the API key travels
    # as a digest in the deployment's init arguments instead).
    keys = ("RAYFT_HOME", "RAYFT_MODEL_CACHE", "HF_HUB_OFFLINE")
    env = {k: os.environ[k] for k in keys if os.environ.get(k)}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options
