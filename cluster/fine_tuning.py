"""Fine-tuning jobs: OpenAI's ``fine_tuning.job`` objects, each run as a rayft training run.

* The record ``fine_tuning/jobs/<job id>.json`` in the rayft root is the job's source of
  truth: the OpenAI job object, the job spec it runs and its status history, rewritten
  atomically on every change. Any replica, and a restarted one, reads jobs back from it.
* Each job runs in its own detached, named Ray actor (``JobRunner``, namespace
  ``NAMESPACE``, no CPUs of its own) on the cluster that serves: it checks the files,
  starts the run with ``trainers.runs.start_run`` (Ray Train workers, owned by the actor; the
  one lifecycle of every rayft run, whose placement-group clean-up ``cancel`` uses) and the
  driver publishes the adapter under the job's ``fine_tuned_model`` name, where the
  serving engine finds it on the next request. A detached actor outlives the HTTP
  replica that started it, and killing it takes the whole run with it (Ray Train's
  controller and workers are its children), which is what cancel needs.
* The run's ``runs/<job id>/events.jsonl`` (``trainers.records.RunLog``) holds the train
  and eval losses and checkpoints that ``/events`` and ``/checkpoints`` report.

Statuses move ``validating_files → queued → running → succeeded | failed | cancelled``;
a terminal record is never changed again. A job whose actor is gone while it is not
terminal (the cluster restarted, the node died) is marked failed when it is next read.

``pause`` asks the run to checkpoint at its next optimizer step and end there
(``trainers.loop.PauseOnRequest``): the job is ``paused``, its runner exits and its CPUs go
to the jobs waiting in the queue; nothing is published. ``resume`` puts it back in the
queue, and its new runner continues the run from its newest complete checkpoint with the
same steps and data order. A paused job holds no actor, like a waiting one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rayft.cluster import job_queue
from rayft.cluster.files_service import list_names, page, read_json
from rayft.cluster.job_body import check_extension
from rayft.serving.auth import DEFAULT_PROJECT
from rayft.serving.errors import BadRequest, Conflict, NotFound
from rayft.trainers.locks import held
from rayft.trainers.records import (
    EVENTS_FILE,
    clear_pause,
    live_state,
    newest_checkpoint,
    read_record,
    request_pause,
)
from rayft.trainers.records import RUNNING as RUN_RUNNING
from rayft.trainers.runs import free_stopped_runs, start_run
from rayft.trainers.storage import JOBS_DIR, StorageRoot, run_relpath
from rayft.trainers.storage import job_relpath as _job_file
from rayft.trainers.validation_errors import error_key

NAMESPACE = "rayft-fine-tuning"
VALIDATING, QUEUED, RUNNING = "validating_files", "queued", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
PAUSED = "paused"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
PAUSABLE = (VALIDATING, QUEUED, RUNNING)
PAUSE_POLL_S = 0.5
MAX_SUFFIX_CHARS = 40
MAX_BASE_CHARS = 40
# The job-spec key each OpenAI hyperparameter sets.
HYPERPARAMETER_KEYS = {
    "optim.epochs": "n_epochs",
    "optim.batch_size": "batch_size",
    "optim.lr": "learning_rate_multiplier",
    "dpo.beta": "beta",
}

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Hyperparameters(_Body):
    """OpenAI's supervised hyperparameters; ``"auto"`` (or absent) takes rayft's default."""

    n_epochs: Literal["auto"] | PositiveInt | None = None
    batch_size: Literal["auto"] | PositiveInt | None = None
    learning_rate_multiplier: Literal["auto"] | PositiveFloat | None = None


class DpoHyperparameters(Hyperparameters):
    """OpenAI's DPO hyperparameters: the supervised ones and ``beta`` (``dpo.beta``)."""

    beta: Literal["auto"] | PositiveFloat | None = None


class ReinforcementHyperparameters(Hyperparameters):
    """OpenAI's reinforcement hyperparameters (``objective: grpo``).

    ``eval_interval`` is ``eval.every_steps``; ``compute_multiplier`` scales the answers
    sampled per prompt (``grpo.num_generations``, 4 at 1.0). ``eval_samples`` (answers per
    validation prompt) and ``reasoning_effort`` are accepted and reported: rayft grades one
    greedy answer per validation prompt, and an open model has no reasoning-effort setting
    (its chat template decides whether it reasons).
    """

    eval_interval: Literal["auto"] | PositiveInt | None = None
    eval_samples: Literal["auto"] | PositiveInt | None = None
    compute_multiplier: Literal["auto"] | PositiveFloat | None = None
    reasoning_effort: Literal["default", "low", "medium", "high"] | None = None


class ReinforcementMethod(_Body):
    grader: dict[str, Any]
    hyperparameters: ReinforcementHyperparameters | None = None


class SupervisedMethod(_Body):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(_Body):
    hyperparameters: DpoHyperparameters | None = None


class Method(_Body):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None


class JobRequest(_Body):
    """``POST /v1/fine_tuning/jobs``: OpenAI's body plus rayft's ``rayft`` extension."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    training_file: str
    validation_file: str | None = None
    suffix: Annotated[str, Field(max_length=MAX_SUFFIX_CHARS)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: (
        Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
            Field(max_length=16),
        ]
        | None
    ) = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None
    integrations: list[Any] | None = None
    rayft: dict[str, Any] | None = None
    """Job-spec sections (``method``, ``lora``, ``deepspeed``, ``scaling``, ``optim``, ...)."""


def parse_request(body: Any) -> JobRequest:
    """The job request in ``body`` (parsed JSON).

    Raises:
        BadRequest: Naming the first field that is wrong (``param``) and every problem.
    """
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_request")
    try:
        request = JobRequest.model_validate(body)
    except ValidationError as err:
        problems = []
        for e in err.errors()[:5]:
            where = error_key(e["loc"], JobRequest) or "body"
            what = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append((where, what))
        message = "; ".join(f"{k}: {m}" for k, m in problems)
        raise BadRequest(message, code="invalid_request", param=problems[0][0]) from None
    if request.integrations:
        raise BadRequest("integrations are not supported", param="integrations")
    return request


# ----------------------------------------------------------- body → job spec


def take_shared(request: JobRequest) -> bool:
    """``rayft.shared``: publish the job's model for every project, not only its own.

    A job option, not a job-spec key: it is taken out of the extension before the spec is
    built from it.

    Raises:
        BadRequest: ``rayft.shared`` is not ``true`` or ``false``.
    """
    if not request.rayft or "shared" not in request.rayft:
        return False
    shared = request.rayft.pop("shared")
    if not isinstance(shared, bool):
        raise BadRequest(
            f"rayft.shared is {shared!r}; write true (every project may call the model) "
            "or false (only this job's project)",
            param="rayft.shared",
        )
    return shared


def artifact_project(record: dict[str, Any]) -> str | None:
    """The project a job's published model serves; ``None`` (every project) when shared."""
    return None if record.get("rayft", {}).get("shared") else job_project(record)


def fine_tuned_name(base_model: str, suffix: str | None, job_id: str) -> str:
    """The OpenAI-shaped registry name of a job's result: ``ft:<base>:<suffix>:<job id>``.

    The base part is the model's last path component with anything outside the
    registry's characters replaced, so a local directory or hub id makes a valid name.
    """
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(base_model).name or base_model)
    base = base.strip(".-")[:MAX_BASE_CHARS] or "model"
    parts = ["ft", base, *([suffix] if suffix else []), job_id]
    return ":".join(parts)


def method_type(request: JobRequest) -> str:
    """``supervised`` or ``dpo``: what ``method.type`` asks for (``supervised`` when absent)."""
    method = request.method
    if method is None:
        return "supervised"
    for other in ("supervised", "dpo", "reinforcement"):
        if other != method.type and getattr(method, other) is not None:
            raise BadRequest(
                f"method.{other} is given but method.type is {method.type!r}; give the "
                f"hyperparameters under method.{method.type}",
                param=f"method.{other}",
            )
    if method.type == "reinforcement" and method.reinforcement is None:
        raise BadRequest(
            "method.type 'reinforcement' needs method.reinforcement with its grader",
            param="method.reinforcement",
        )
    return method.type


def _hyperparameters(request: JobRequest) -> tuple[Hyperparameters, str]:
    """The hyperparameters given and the body path they came from."""
    kind = method_type(request)
    section = getattr(request.method, kind, None) if request.method else None
    nested = section.hyperparameters if section is not None else None
    if nested is not None and request.hyperparameters is not None:
        raise BadRequest(
            f"give hyperparameters once: in method.{kind}.hyperparameters (preferred) or "
            "the legacy top-level hyperparameters",
            param="hyperparameters",
        )
    if nested is not None:
        return nested, f"method.{kind}.hyperparameters"
    empty = {"dpo": DpoHyperparameters, "reinforcement": ReinforcementHyperparameters}.get(
        kind, Hyperparameters
    )()
    return request.hyperparameters or empty, "hyperparameters"


def _method(spec: dict[str, Any], request: JobRequest, hyper: Hyperparameters) -> None:
    """Set ``objective`` (and ``dpo``) of ``spec`` from ``method.type``.

    ``method.type: dpo`` is ``objective: dpo``; what trains is ``rayft.method``: LoRA
    weights unless it (or the older ``rayft.dpo.weights``) says ``full``; ``beta`` sets
    ``dpo.beta``. ``rayft.method: dpo`` is the older spelling of ``method.type: dpo``.
    """
    given = spec.get("method")
    kind = method_type(request)
    if kind == "reinforcement":
        _reinforcement(spec, request, hyper)
        return
    if kind == "supervised":
        for key in ("method", "objective"):
            if spec.get(key) == "dpo":
                raise BadRequest(
                    f"rayft.{key} 'dpo' is chosen with method.type 'dpo' (and preference data)",
                    param=f"rayft.{key}",
                )
        return
    if given not in (None, "dpo", "lora", "full"):
        raise BadRequest(
            f"a DPO job trains LoRA or full weights, not {given!r}; set rayft.method to "
            "'lora' or 'full', or leave it out",
            param="rayft.method",
        )
    if spec.get("objective", "dpo") != "dpo":
        raise BadRequest(
            f"method.type 'dpo' is objective dpo, not {spec['objective']!r}; leave "
            "rayft.objective out",
            param="rayft.objective",
        )
    if given == "dpo":
        del spec["method"]  # rayft.dpo.weights, if given, chooses it (trainers.config)
    spec["objective"] = "dpo"
    dpo = spec["dpo"] = _section(spec, "dpo")
    beta = getattr(hyper, "beta", None)
    if isinstance(beta, (int, float)):
        dpo["beta"] = float(beta)


def _method_record(request: JobRequest, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The job's ``method`` as OpenAI reports it (a reinforcement job's grader included)."""
    kind = method_type(request)
    section: dict[str, Any] = {"hyperparameters": hyperparameters}
    if kind == "reinforcement" and request.method and request.method.reinforcement:
        section["grader"] = request.method.reinforcement.grader
    return {"type": kind, kind: section}


def _reinforcement(spec: dict[str, Any], request: JobRequest, hyper: Hyperparameters) -> None:
    """``method.type: reinforcement`` is ``objective: grpo`` with the method's grader."""
    from rayft.trainers.graders import GraderError, parse_grader

    if spec.get("objective", "grpo") != "grpo":
        raise BadRequest(
            f"method.type 'reinforcement' is objective grpo, not {spec['objective']!r}; "
            "leave rayft.objective out",
            param="rayft.objective",
        )
    if spec.get("method") not in (None, "lora", "full"):
        raise BadRequest(
            f"a reinforcement job trains LoRA or full weights, not {spec['method']!r}",
            param="rayft.method",
        )
    assert request.method is not None and request.method.reinforcement is not None
    grader = request.method.reinforcement.grader
    try:
        parse_grader(grader)
    except GraderError as err:
        param = err.param.replace("grader", "method.reinforcement.grader", 1)
        raise BadRequest(str(err), param=param) from None
    spec["objective"] = "grpo"
    grpo = spec["grpo"] = _section(spec, "grpo")
    grpo["grader"] = grader
    multiplier = getattr(hyper, "compute_multiplier", None)
    if isinstance(multiplier, (int, float)):
        grpo["num_generations"] = min(64, max(2, round(4 * float(multiplier))))
    interval = getattr(hyper, "eval_interval", None)
    if isinstance(interval, int) and request.validation_file is not None:
        spec["eval"] = {**_section(spec, "eval"), "every_steps": interval}


def build_spec(
    request: JobRequest,
    *,
    base_model: str,
    parent_adapter: str | None,
    train_url: str,
    eval_url: str | None,
    storage: str,
    output_name: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job spec (a plain dict, not yet validated) of a job request.

    OpenAI's hyperparameters map onto ``optim``: ``n_epochs`` → ``optim.epochs``;
    ``batch_size`` (examples per optimizer step, as OpenAI counts it) →
    ``optim.batch_size`` per worker = batch_size / (workers × grad_accum);
    ``learning_rate_multiplier`` scales ``optim.lr`` (rayft's, or the extension's). ``auto``
    keeps rayft's defaults. The ``rayft`` extension supplies every other section.

    Returns:
        ``(spec, hyperparameters)``: the spec dict, and the hyperparameters as the job
        object reports them (``auto`` resolved).

    Raises:
        BadRequest: A key the extension may not set (``job_body.ALLOWED``), an
            unsupported method, or a batch size the workers cannot share.
    """
    from rayft.trainers.config import OptimSpec, ScalingSpec

    extension = copy.deepcopy(request.rayft or {})
    check_extension(extension)  # the allow-list: no path, URI or unknown key
    hyper, where = _hyperparameters(request)
    spec = extension
    _method(spec, request, hyper)
    spec["model"] = {**_section(spec, "model"), "name": base_model}
    if parent_adapter is not None:
        spec["model"]["adapter"] = parent_adapter
    spec["data"] = {**_section(spec, "data"), "train": train_url}
    if eval_url is not None:
        spec["data"]["eval"] = eval_url
    optim = spec["optim"] = _section(spec, "optim")
    if isinstance(hyper.n_epochs, int):
        optim["epochs"] = hyper.n_epochs
    if isinstance(hyper.batch_size, int):
        optim["batch_size"] = _per_worker_batch(hyper.batch_size, spec, where)
    multiplier = hyper.learning_rate_multiplier
    if isinstance(multiplier, (int, float)):
        base_lr = optim.get("lr", _default_lr(spec))
        if isinstance(base_lr, (int, float)):
            optim["lr"] = float(base_lr) * float(multiplier)
    if request.seed is not None:
        optim["seed"] = request.seed
    spec["output"] = {"name": output_name}
    spec["storage"] = storage
    workers = _section(spec, "scaling").get("num_workers", ScalingSpec().num_workers)
    reported = {
        "n_epochs": optim.get("epochs", OptimSpec().epochs),
        "batch_size": _global_batch(optim, workers),
        "learning_rate_multiplier": float(multiplier) if isinstance(multiplier, float) else 1.0,
    }
    if spec.get("objective") == "dpo":
        from rayft.trainers.config import DpoSpec

        reported["beta"] = spec["dpo"].get("beta", DpoSpec().beta)
    if spec.get("objective") == "grpo":
        reported.update(_reported_reinforcement(spec, hyper))
    return spec, reported


def _reported_reinforcement(spec: dict[str, Any], hyper: Hyperparameters) -> dict[str, Any]:
    from rayft.trainers.config import GrpoSpec

    multiplier = getattr(hyper, "compute_multiplier", None)
    samples = getattr(hyper, "eval_samples", None)
    return {
        "compute_multiplier": float(multiplier) if isinstance(multiplier, (int, float)) else 1.0,
        "eval_interval": spec.get("eval", {}).get("every_steps") or "auto",
        "eval_samples": samples if isinstance(samples, int) else 1,
        "reasoning_effort": getattr(hyper, "reasoning_effort", None) or "default",
        "num_generations": spec["grpo"].get("num_generations", GrpoSpec().num_generations),
    }


def _default_lr(spec: dict[str, Any]) -> float:
    """The learning rate the spec gets when it sets none (``trainers.defaults.default_lr``)."""
    from rayft.trainers.config import JobSpec
    from rayft.trainers.defaults import default_lr

    weights = spec["dpo"].get("weights") if isinstance(spec.get("dpo"), dict) else None
    method = spec.get("method") or weights or JobSpec.model_fields["method"].default
    return default_lr(str(spec.get("objective") or ""), str(method))


def _section(spec: dict[str, Any], name: str) -> dict[str, Any]:
    node = spec.get(name, {})
    if not isinstance(node, dict):
        raise BadRequest(f"rayft.{name} must be a mapping of keys", param=f"rayft.{name}")
    return dict(node)


def _per_worker_batch(batch_size: int, spec: dict[str, Any], where: str) -> int:
    from rayft.trainers.config import OptimSpec, ScalingSpec

    workers = _section(spec, "scaling").get("num_workers", ScalingSpec().num_workers)
    accum = _section(spec, "optim").get("grad_accum", OptimSpec().grad_accum)
    if not (isinstance(workers, int) and isinstance(accum, int) and workers > 0 and accum > 0):
        return batch_size  # the spec's own validation names the bad key
    share, rest = divmod(batch_size, workers * accum)
    if share < 1 or rest:
        raise BadRequest(
            f"batch_size {batch_size} is not a multiple of {workers} worker(s) x grad_accum "
            f"{accum}; choose a multiple of {workers * accum} or set rayft.scaling.num_workers",
            param=f"{where}.batch_size",
        )
    return share


def _global_batch(optim: dict[str, Any], workers: Any) -> Any:
    from rayft.trainers.config import OptimSpec

    if "batch_size" not in optim and "grad_accum" not in optim:
        # Both are split from optim.effective_batch (trainers.config.resolve_defaults).
        return optim.get("effective_batch", OptimSpec().effective_batch)
    per_worker = optim.get("batch_size", OptimSpec().batch_size)
    accum = optim.get("grad_accum", OptimSpec().grad_accum)
    if all(isinstance(v, int) for v in (per_worker, accum, workers)):
        return per_worker * accum * workers
    return per_worker


def validate_job_spec(spec: dict[str, Any], request: JobRequest) -> Any:
    """``trainers.config.validate_spec`` with its dotted keys named as the body names them.

    Raises:
        BadRequest: ``param`` is the body field to change (``rayft.<key>`` for the
            extension, the hyperparameter for ``optim`` keys it set, ``model`` for the model).
    """
    from rayft.trainers.config import ConfigError, validate_spec

    try:
        return validate_spec(spec, source="of this fine-tuning job")
    except ConfigError as err:
        params = [body_param(key, request) for key, _ in err.problems]
        message = "; ".join(f"{p}: {m}" for p, (_, m) in zip(params, err.problems, strict=True))
        raise BadRequest(message, code="invalid_job_spec", param=params[0]) from None


def body_param(key: str, request: JobRequest) -> str:
    """The request field that set job-spec ``key``."""
    if key.startswith("model."):
        return "model"
    if key in ("data.train", "data.eval"):
        return "training_file" if key == "data.train" else "validation_file"
    extension = request.rayft or {}
    section, _, leaf = key.partition(".")
    given = isinstance(extension.get(section), dict) and leaf.split(".")[0] in extension[section]
    if key in HYPERPARAMETER_KEYS and not given:
        _, where = _hyperparameters(request)
        return f"{where}.{HYPERPARAMETER_KEYS[key]}"
    if key == "optim.seed" and not given:
        return "seed"
    return f"rayft.{key}" if key else "rayft"


# ------------------------------------------------------------------- records


def new_job_id() -> str:
    """A fresh job id in OpenAI's shape, ``ftjob-<24 hex digits>``."""
    return f"ftjob-{secrets.token_hex(12)}"


def job_relpath(job_id: str) -> str:
    return _job_file(job_id)


def _checked_job_id(job_id: str) -> str:
    if not (job_id.startswith("ftjob-") and job_id[6:].isalnum() and len(job_id) <= 64):
        raise NotFound(f"no fine-tuning job {job_id!r}", code="job_not_found", param="job_id")
    return job_id


def artifact_kind(spec: dict[str, Any]) -> str:
    """``adapter`` or ``model``: what a job with this (validated) spec publishes."""
    from rayft.trainers.config import ADAPTER_METHODS, JobSpec

    return "adapter" if JobSpec.from_dict(spec).method in ADAPTER_METHODS else "model"


def new_record(
    job_id: str,
    request: JobRequest,
    spec: dict[str, Any],
    hyperparameters: dict[str, Any],
    labels: dict[str, str],
    project: str = DEFAULT_PROJECT,
    key_id: str | None = None,
) -> dict[str, Any]:
    """A new job's record: the OpenAI job object (``validating_files``) and rayft's part.

    Args:
        labels: How messages name each data file: its URL → e.g. ``training_file file-… (a.jsonl)``.
        project: The project the job belongs to (``serving.auth``).
        key_id: The id of the key that created it (never the key).
    """
    from rayft.trainers.config import JobSpec

    now = time.time()
    # `rayft.method` keeps its older meaning for clients: `dpo` for a DPO job.
    older = JobSpec.from_dict(spec).older_keys()
    return {
        "id": job_id,
        "object": "fine_tuning.job",
        "created_at": int(now),
        "error": None,
        "fine_tuned_model": None,
        "finished_at": None,
        "hyperparameters": hyperparameters,
        "model": request.model,
        "organization_id": "rayft",
        "result_files": [],
        "seed": spec["optim"].get("seed", 42),
        "status": VALIDATING,
        "trained_tokens": None,
        "training_file": request.training_file,
        "validation_file": request.validation_file,
        "estimated_finish": None,
        "integrations": [],
        "metadata": request.metadata,
        "method": _method_record(request, hyperparameters),
        "user_provided_suffix": request.suffix,
        "rayft": {
            "run_id": job_id,
            "output_name": spec["output"]["name"],
            "method": older["method"],
            "kind": artifact_kind(spec),
            "parent_adapter": spec["model"].get("adapter"),
            "spec": spec,
            "labels": labels,
            "project": project,
            "key_id": key_id,
        },
        "history": [
            {
                "time": now,
                "status": VALIDATING,
                "message": "validating training files",
                "key_id": key_id,
            }
        ],
    }


def save_job(root: StorageRoot, record: dict[str, Any]) -> None:
    """Write a job's record atomically (and to a URI root)."""
    root.write(job_relpath(record["id"]), json.dumps(record, indent=2, default=str))


def read_job(root: StorageRoot, job_id: str, scope: str | None = None) -> dict[str, Any]:
    """The record of ``job_id``; with ``scope``, only a job of that project is found.

    Raises:
        NotFound: No such job (or one of another project, answered alike).
    """
    record = read_json(root, job_relpath(_checked_job_id(job_id)))
    if record is None or (scope is not None and job_project(record) != scope):
        raise NotFound(
            f"no fine-tuning job {job_id!r}; GET /v1/fine_tuning/jobs lists them",
            code="job_not_found",
            param="job_id",
        )
    return record


def job_project(record: dict[str, Any]) -> str:
    """The project a job belongs to (``default`` for a job made before projects)."""
    return record.get("rayft", {}).get("project") or DEFAULT_PROJECT


def list_jobs(root: StorageRoot) -> list[dict[str, Any]]:
    """Every job record, newest first."""
    records = [read_json(root, job_relpath(n)) for n in list_names(root, JOBS_DIR, ".json")]
    found = [r for r in records if r is not None]
    return sorted(found, key=lambda r: (r.get("created_at", 0), r["id"]), reverse=True)


def transition(
    root: StorageRoot, job_id: str, status: str, message: str, **fields: Any
) -> dict[str, Any]:
    """Move a job to ``status`` (with ``fields``), unless it already ended.

    Returns:
        The record as it now stands (unchanged when it was terminal already).
    """
    # Read, decide and write under the record's lock: the runner, its watcher, cancel
    # and refresh may all move one job at once, and only the first end counts.
    with held(root, job_lock_relpath(job_id)):
        record = read_job(root, job_id)
        if record["status"] in TERMINAL:
            return record
        record.update(status=status, **fields)
        record["history"].append({"time": time.time(), "status": status, "message": message})
        save_job(root, record)
    return record


def job_lock_relpath(job_id: str) -> str:
    """The lock of a job's record (``trainers.locks``), next to the record."""
    return _job_file(_checked_job_id(job_id), ".lock")


def fail(root: StorageRoot, job_id: str, code: str, message: str, param: str | None = None) -> dict:
    """Mark a job failed with an error a person can act on."""
    error = {"code": code, "message": message, "param": param}
    return transition(root, job_id, FAILED, message, error=error, finished_at=int(time.time()))


def job_object(record: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI ``fine_tuning.job`` object of a record (rayft's part kept as ``rayft``)."""
    out = {k: v for k, v in record.items() if k not in ("history", "rayft")}
    extra = record.get("rayft", {})
    keys = ("run_id", "output_name", "method", "parent_adapter", "project", "queue_position")
    out["rayft"] = {k: extra.get(k) for k in keys}
    out["rayft"]["spec"] = extra.get("spec")
    return out


# ------------------------------------------------------- events, checkpoints


def _event_id(job_id: str, *parts: Any) -> str:
    digest = hashlib.sha1(json.dumps([job_id, *parts], default=str).encode()).hexdigest()
    return f"ftevent-{digest[:24]}"


def _event(job_id: str, when: float, message: str, level: str = "info", **extra: Any) -> dict:
    kind = extra.pop("type", "message")
    return {
        "id": _event_id(job_id, when, message),
        "object": "fine_tuning.job.event",
        "created_at": int(when),
        "level": level,
        "message": message,
        "data": extra or None,
        "type": kind,
    }


def _run_event(job_id: str, event: dict[str, Any]) -> dict[str, Any] | None:
    """The job event of one line of the run's ``events.jsonl`` (``None``: not reported)."""
    kind, when, step = event.get("type"), float(event.get("time", 0)), event.get("step")
    total = event.get("total_steps")
    at = f"Step {step}/{total}" if total else f"Step {step}"
    if kind == "train" and isinstance(event.get("loss"), (int, float)):
        data = {"step": step, "total_steps": total, "train_loss": event["loss"]}
        data.update({k: event[k] for k in ("lr", "tokens_per_s", "tokens_seen") if k in event})
        message = f"{at}: training loss={event['loss']:.4f}"
        if isinstance(event.get("reward"), (int, float)):  # a reinforcement job
            data["train_reward_mean"] = event["reward"]
            message += f", mean grade={event['reward']:.4f}"
        return _event(job_id, when, message, type="metrics", **data)
    if kind == "eval" and isinstance(event.get("eval_loss"), (int, float)):
        data = {"step": step, "total_steps": total, "valid_loss": event["eval_loss"]}
        if "eval_perplexity" in event:
            data["valid_perplexity"] = event["eval_perplexity"]
        message = f"{at}: validation loss={event['eval_loss']:.4f}"
        if isinstance(event.get("eval_reward"), (int, float)):
            data["valid_reward_mean"] = event["eval_reward"]
            message = f"{at}: validation mean grade={event['eval_reward']:.4f}"
        return _event(job_id, when, message, type="metrics", **data)
    if kind == "checkpoint":
        return _event(job_id, when, f"Checkpoint saved at step {step}", step=step)
    if kind == "resumed":
        return _event(job_id, when, f"Resumed from step {step}", step=step)
    if kind == "artifact":
        return _event(job_id, when, f"Published {event.get('name')} at {event.get('location')}")
    if kind == "error":
        text = f"{event.get('error')}: {event.get('message')}"
        return _event(job_id, when, text, level="error")
    return None  # the run's own state lines repeat the job's status changes


def job_events(root: StorageRoot, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Status changes, train loss per logging step, eval loss per evaluation, checkpoints:
    newest first, as OpenAI lists them."""
    from rayft.trainers.records import read_events

    job_id = record["id"]
    timed: list[tuple[float, int, dict[str, Any]]] = []
    for item in record.get("history", []):
        level = "error" if item["status"] == FAILED else "info"
        message = f"Job {item['status']}: {item['message']}"
        who = {"key_id": item["key_id"]} if item.get("key_id") else {}
        event = _event(job_id, item["time"], message, level, status=item["status"], **who)
        timed.append((float(item["time"]), len(timed), event))
    for line in read_events(root, record["rayft"]["run_id"]):
        event = _run_event(job_id, line)
        if event is not None:
            timed.append((float(line.get("time", 0)), len(timed), event))
    # Sorted by the exact time (created_at is whole seconds), written order within a tie.
    timed.sort(key=lambda t: (t[0], t[1]))
    return [event for _, _, event in reversed(timed)]


def job_checkpoints(root: StorageRoot, record: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's checkpoints with the train and eval loss at their step, newest first."""
    from rayft.trainers.records import read_events

    train_loss: float | None = None
    valid: dict[Any, float] = {}
    grades: dict[Any, float] = {}  # a reinforcement job's validation mean grade
    out = []
    for event in read_events(root, record["rayft"]["run_id"]):
        kind = event.get("type")
        if kind == "train" and isinstance(event.get("loss"), (int, float)):
            train_loss = float(event["loss"])
        elif kind == "eval" and isinstance(event.get("eval_loss"), (int, float)):
            valid[event.get("step")] = float(event["eval_loss"])
            if isinstance(event.get("eval_reward"), (int, float)):
                grades[event.get("step")] = float(event["eval_reward"])
        elif kind == "checkpoint" and isinstance(event.get("step"), int):
            step = event["step"]
            out.append(
                {
                    "id": f"ftckpt-{_event_id(record['id'], 'ckpt', step)[8:]}",
                    "object": "fine_tuning.job.checkpoint",
                    "created_at": int(event.get("time", 0)),
                    "fine_tuned_model_checkpoint": str(event.get("path")),
                    "fine_tuning_job_id": record["id"],
                    "metrics": {
                        "step": step,
                        "train_loss": train_loss,
                        "valid_loss": valid.get(step),
                        **({"valid_reward_mean": grades[step]} if step in grades else {}),
                    },
                    "step_number": step,
                }
            )
    return out[::-1]


def listing(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """An OpenAI list object of one page of ``items``."""
    data, more = page(items, after, limit)
    return {"object": "list", "data": data, "has_more": more}


# ------------------------------------------------------------ the runner


def runner_name(job_id: str) -> str:
    """The Ray actor name of a job's runner (in ``NAMESPACE``)."""
    return f"rayft-job-{job_id}"


def runner(job_id: str) -> Any | None:
    """The live runner actor of ``job_id``, or ``None`` when there is none."""
    import ray

    if not ray.is_initialized():  # get_actor would start a local Ray cluster to look
        return None
    try:
        return ray.get_actor(runner_name(job_id), namespace=NAMESPACE)
    except ValueError:
        return None


def start_runner(root: StorageRoot, job_id: str, env: dict[str, str]) -> None:
    """Start the job's detached runner actor on the connected Ray cluster.

    Args:
        env: Environment variables the run needs (model cache, offline mode, ...).

    Raises:
        RuntimeError: This process is not connected to a Ray cluster (a request handler
            must never start a local one on the side).
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("this server is not connected to a Ray cluster")
    actor = ray.remote(JobRunner).options(
        name=runner_name(job_id),
        namespace=NAMESPACE,
        lifetime="detached",
        num_cpus=0,
        max_restarts=0,
        runtime_env={"env_vars": env} if env else None,
    )
    handle = actor.remote(root, job_id)
    handle.run.remote()  # nobody waits: the record says how it went


RUNNER_ENV = ("RAYFT_HOME", "RAYFT_CACHE", "RAYFT_MODEL_CACHE", "HF_HUB_OFFLINE", "HF_HOME")
"""What a job's runner needs from the server's environment to find models and data."""


def runner_env() -> dict[str, str]:
    """The ``RUNNER_ENV`` variables set in this process."""
    import os

    return {k: os.environ[k] for k in RUNNER_ENV if os.environ.get(k)}


def with_queue_positions(everyone: list[dict[str, Any]], record: Any = None) -> Any:
    """Waiting records with ``rayft.queue_position`` set (1 starts next), computed over
    ``everyone`` (every project's jobs: the queue is the cluster's).

    With ``record``, that one record; without, every record of ``everyone``.
    """
    order = {r["id"]: i for i, r in enumerate(job_queue.waiting_in_order(everyone), start=1)}

    def placed(one: dict[str, Any]) -> dict[str, Any]:
        if one["id"] not in order or not job_queue.is_waiting(one):
            return one
        return {**one, "rayft": {**one["rayft"], "queue_position": order[one["id"]]}}

    return placed(record) if record is not None else [placed(r) for r in everyone]


def enqueue(root: StorageRoot, job_id: str, env: dict[str, str]) -> dict[str, Any]:
    """Put a recorded job in the queue and admit what fits: the job as it now stands.

    A job that fits in the cluster's free CPUs and GPUs (and has no job waiting before it)
    starts its runner at once and stays ``validating_files``; any other waits in ``queued``
    with its position, holding nothing on the cluster (``cluster.job_queue``).
    """
    with held(root, job_lock_relpath(job_id)):
        record = read_job(root, job_id)
        if record["status"] in TERMINAL:
            return record
        record["rayft"]["waiting"] = True
        save_job(root, record)
    admit_waiting(root, env)
    record = read_job(root, job_id)
    if job_queue.is_waiting(record) and record["status"] != QUEUED:
        needs = job_queue.job_needs(record["rayft"]["spec"])
        want = f"{needs['CPU']:g} CPUs" + (f" and {needs['GPU']:g} GPUs" if needs["GPU"] else "")
        record = transition(
            root, job_id, QUEUED, f"waiting for {want} on the cluster (jobs start in order)"
        )
    return record


def admit_waiting(root: StorageRoot, env: dict[str, str]) -> list[str]:
    """Start the runners of waiting jobs that now fit, in order (``job_queue.admit``)."""

    def start(job_id: str) -> None:
        try:
            start_runner(root, job_id, env)
        except Exception as err:  # noqa: BLE001 - the job records why it could not start
            fail(root, job_id, "runner_not_started", f"the job could not start on Ray: {err}")

    return job_queue.admit(
        root,
        lambda: list_jobs(root),
        lambda job_id: mark_admitted(root, job_id) is not None,
        job_queue.free_resources,
        start,
    )


def mark_admitted(root: StorageRoot, job_id: str) -> dict[str, Any] | None:
    """Record that a waiting job leaves the queue; ``None`` when it ended meanwhile."""
    with held(root, job_lock_relpath(job_id)):
        record = read_job(root, job_id)
        if record["status"] in TERMINAL or record["status"] == PAUSED:
            return None
        record["rayft"]["waiting"] = False
        if record["status"] != VALIDATING:  # it waited in the queue: say it left it
            record["status"] = VALIDATING  # its runner checks the files first, as any job's
            record["history"].append(
                {"time": time.time(), "status": VALIDATING, "message": "admitted: starting"}
            )
        save_job(root, record)
    return record


def refresh(root: StorageRoot, record: dict[str, Any]) -> dict[str, Any]:
    """``record``, marked failed first when it is not terminal and its runner is gone."""
    if record["status"] in (*TERMINAL, PAUSED) or job_queue.is_waiting(record):
        return record  # a waiting or paused job has no runner, by design
    if runner(record["id"]) is not None:
        return record
    # The runner may have written its last status and exited since ``record`` was read.
    record = read_job(root, record["id"])
    if record["status"] in (*TERMINAL, PAUSED):
        return record
    return fail(
        root,
        record["id"],
        "runner_lost",
        "the job's runner stopped before the job finished (the Ray cluster restarted or its "
        "node died); create the job again",
    )


def cancel(root: StorageRoot, job_id: str, key_id: str | None = None) -> dict[str, Any]:
    """Stop a job's Ray work and mark it cancelled; nothing of it stays published.

    ``key_id`` (the key that asked) is named in the job's cancelled event.

    Raises:
        BadRequest: The job already ended.
    """
    import ray

    from rayft.trainers.registry import RegistryError, remove_artifact

    record = read_job(root, job_id)
    if record["status"] in TERMINAL:
        raise BadRequest(
            f"job {job_id} is already {record['status']}; only validating_files, queued or "
            "running jobs can be cancelled",
            code="job_not_cancellable",
            param="job_id",
        )
    handle = runner(job_id)
    if handle is not None:
        # The run's Train controller and workers are the actor's children: they die with it.
        ray.kill(handle, no_restart=True)
    free_stopped_runs(root, [job_id], background=True)  # the run's id is the job's
    message = f"cancelled with key {key_id}" if key_id else "cancelled"
    record = transition(root, job_id, CANCELLED, message, finished_at=int(time.time()))
    if record["status"] == CANCELLED:
        kind = record["rayft"].get("kind") or artifact_kind(record["rayft"]["spec"])
        try:
            remove_artifact(kind, record["rayft"]["output_name"], root)
        except RegistryError:
            pass
    return record


def check_pausable(record: dict[str, Any]) -> None:
    """Refuse to pause a job that has ended or is paused already.

    Raises:
        Conflict: The job is not ``validating_files``, ``queued`` or ``running``.
    """
    if record["status"] not in PAUSABLE:
        raise Conflict(
            f"job {record['id']} is {record['status']}; only validating_files, queued or "
            "running jobs can be paused",
            code="job_not_pausable",
            param="job_id",
        )


def check_resumable(record: dict[str, Any]) -> None:
    """Refuse to resume a job that is not paused.

    Raises:
        Conflict: The job is not ``paused``.
    """
    if record["status"] != PAUSED:
        raise Conflict(
            f"job {record['id']} is {record['status']}; only a paused job can be resumed "
            "(POST /v1/fine_tuning/jobs/{job_id}/pause pauses a running one)",
            code="job_not_resumable",
            param="job_id",
        )


def _by(key_id: str | None) -> str:
    return f" with key {key_id}" if key_id else ""


def _record_change(record: dict[str, Any], status: str, message: str, key_id: str | None) -> None:
    """Set ``status`` on ``record`` (held under its lock) and add it to the history."""
    record["status"] = status
    entry = {"time": time.time(), "status": status, "message": message}
    record["history"].append({**entry, "key_id": key_id} if key_id else entry)


def pause(
    root: StorageRoot, job_id: str, key_id: str | None = None, wait_s: float = 60.0
) -> dict[str, Any]:
    """Pause a job: its run checkpoints at its next optimizer step and ends, unpublished.

    A job still waiting in the queue is paused at once. A training job's run is asked to
    pause (``trainers.records.request_pause``) and this waits up to ``wait_s`` for its
    runner to record ``paused``; a job whose run has not started yet (its files are being
    checked), or does not reach a step in time, is stopped (as cancel stops it) and resumes
    from its newest complete checkpoint. Either way its CPUs are free for the queue
    (``admit_waiting``).

    Args:
        key_id: The key that asked (named in the job's events).
        wait_s: ``JobLimits.pause_wait_s``.

    Raises:
        Conflict: The job cannot be paused (``check_pausable``).
    """
    with held(root, job_lock_relpath(job_id)):
        record = read_job(root, job_id)
        check_pausable(record)
        if job_queue.is_waiting(record):  # no runner, nothing trained: nothing to stop
            record["rayft"]["waiting"] = False
            _record_change(record, PAUSED, f"paused{_by(key_id)} before it started", key_id)
            save_job(root, record)
            return record
        # Its run has started (workers starting or training): it reaches a step soon.
        trained = live_state(read_record(root, job_id)) == RUN_RUNNING
        message = f"pause requested{_by(key_id)}: checkpointing at the next step"
        _record_change(record, record["status"], message, key_id)
        save_job(root, record)
    request_pause(root, job_id)  # the run's PauseOnRequest reads it
    deadline = time.monotonic() + (wait_s if trained else 0.0)
    while True:
        record = read_job(root, job_id)
        if record["status"] in (*TERMINAL, PAUSED) or time.monotonic() >= deadline:
            break
        time.sleep(PAUSE_POLL_S)
    if record["status"] in (*TERMINAL, PAUSED):
        return record
    return _stop_for_pause(root, job_id, wait_s if trained else None)


def _stop_for_pause(root: StorageRoot, job_id: str, waited_s: float | None) -> dict[str, Any]:
    """Stop a job's runner and run, and mark it paused at its newest complete checkpoint."""
    import ray

    handle = runner(job_id)
    if handle is not None:
        ray.kill(handle, no_restart=True)
    free_stopped_runs(root, [job_id], background=True)
    record = read_job(root, job_id)
    if record["status"] in (*TERMINAL, PAUSED):  # it ended or paused before it was stopped
        return record
    newest = newest_checkpoint(root, job_id)
    where = f"checkpoint step {newest[1]}" if newest else "the first step (no checkpoint yet)"
    why = f"no step within {waited_s:g} s" if waited_s is not None else "its run had not started"
    return transition(root, job_id, PAUSED, f"paused ({why}: stopped); resumes at {where}")


def resume(root: StorageRoot, job_id: str, key_id: str | None = None) -> dict[str, Any]:
    """Put a paused job back in the queue (``queued``, waiting); ``admit_waiting`` starts
    its next runner, which continues the run from its newest complete checkpoint.

    Raises:
        Conflict: The job is not paused (``check_resumable``).
    """
    with held(root, job_lock_relpath(job_id)):
        record = read_job(root, job_id)
        check_resumable(record)
        clear_pause(root, job_id)
        record["rayft"]["waiting"] = True  # admitted in order, as a new job is
        _record_change(record, QUEUED, f"resumed{_by(key_id)}: waiting to start", key_id)
        save_job(root, record)
    return record


class JobRunner:
    """The body of a job's Ray actor: check the files, run the training, publish.

    Args:
        root: The rayft root (it pickles as its location and is resolved again in the actor).
        job_id: The job whose record this actor advances.
    """

    def __init__(self, root: StorageRoot, job_id: str) -> None:
        self.root = root
        self.job_id = job_id

    def run(self) -> str:
        """Run the job to its end; the record holds the outcome. Returns the final status."""
        import ray

        try:
            status = self._run()
        finally:
            try:
                # What this run held is free: the jobs waiting behind it may start now.
                admit_waiting(self.root, runner_env())
            finally:
                ray.actor.exit_actor()  # a finished runner frees its process at once
        return status

    def _run(self) -> str:
        from rayft.trainers.config import ConfigError, validate_spec
        from rayft.trainers.data import DataError, scan_sources
        from rayft.trainers.models import ModelError

        record = read_job(self.root, self.job_id)
        labels = record["rayft"].get("labels", {})
        try:
            spec = validate_spec(record["rayft"]["spec"])
            # Tokenizes every row with the base model's tokenizer (the spec's storage is this root).
            scanned = scan_sources(spec, root=self.root)
        except (DataError, ConfigError, ModelError) as err:
            return self._fail(err, labels)["status"]
        rows = sum(r.rows for r in scanned.train)
        transition(
            self.root,
            self.job_id,
            QUEUED,
            f"{rows} training rows ({scanned.format}) validated; waiting for Ray Train workers",
        )
        done = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(done,), daemon=True)
        watcher.start()
        try:
            outcome = self._train(spec, scanned, artifact_project(record))
        except Exception as err:  # noqa: BLE001 - every failure becomes the job's error
            return self._fail(err, labels)["status"]
        finally:
            done.set()
        if outcome.paused:
            return self._paused(outcome)["status"]
        return self._succeed(outcome)["status"]

    def _train(self, spec: Any, scanned: Any, project: str | None) -> Any:
        from rayft.trainers.loop import PauseOnRequest

        run = start_run(
            spec,
            self.job_id,
            # A paused job's run goes on from its newest complete checkpoint.
            resume=bool(read_record(self.root, self.job_id)),
            scanned=scanned,
            project=project,  # the adapter serves this project's keys only (None: all)
            loop_callbacks=(PauseOnRequest(self.root, self.job_id),),
        )
        return run.result()

    def _paused(self, outcome: Any) -> dict[str, Any]:
        step = outcome.metrics.get("step")
        return transition(
            self.root,
            self.job_id,
            PAUSED,
            f"paused after step {step}; POST /v1/fine_tuning/jobs/{self.job_id}/resume "
            "continues from its checkpoint",
        )

    def _watch(self, done: threading.Event) -> None:
        """``running`` once this runner's first training or evaluation step is recorded."""
        from rayft.trainers.records import read_events

        started = time.time()  # a resumed run's log holds the steps before its pause
        while not done.wait(1.0):
            events = read_events(self.root, self.job_id)
            kinds = {e.get("type") for e in events if float(e.get("time", 0)) >= started}
            if kinds & {"train", "eval"}:
                transition(self.root, self.job_id, RUNNING, "training started")
                return

    def _succeed(self, outcome: Any) -> dict[str, Any]:
        record = read_job(self.root, self.job_id)
        tokens = [h.get("tokens_seen") for h in outcome.history if h.get("kind") == "train"]
        if record["status"] not in (RUNNING,):
            transition(self.root, self.job_id, RUNNING, "training started")
        name = record["rayft"]["output_name"]
        return transition(
            self.root,
            self.job_id,
            SUCCEEDED,
            f"published {name}",
            fine_tuned_model=name,
            finished_at=int(time.time()),
            trained_tokens=int(tokens[-1]) if tokens and tokens[-1] is not None else None,
        )

    def _fail(self, err: BaseException, labels: dict[str, str]) -> dict[str, Any]:
        code, message, param = failure(err, labels, self.job_id)
        return fail(self.root, self.job_id, code, message, param)


def failure(err: BaseException, labels: dict[str, str], run_id: str) -> tuple[str, str, str | None]:
    """``(code, message, param)`` of a job's failure, with data files named as the body names them."""
    from rayft.trainers.config import ConfigError
    from rayft.trainers.data import DataError
    from rayft.trainers.registry import RegistryError

    text = str(err)
    for url, label in labels.items():
        text = text.replace(url, label)
    if isinstance(err, DataError):
        param = "validation_file" if "validation_file" in text.split(":")[0] else "training_file"
        return f"invalid_{param}", text, param
    if isinstance(err, ConfigError):
        key = err.problems[0][0] if err.problems else ""
        return "invalid_job_spec", text, f"rayft.{key}" if key else None
    if isinstance(err, RegistryError):
        return "publish_refused", text, None
    message = (
        f"training failed: {type(err).__name__}: {text[:1500]}; the run's events are in "
        f"{run_relpath(run_id, EVENTS_FILE)} under the storage root"
    )
    return "training_failed", message, None
