"""Per-job bounds a server puts on the jobs it accepts over HTTP.

A spec that validates can still ask for more than a shared server should give one
request: 100,000 workers, 10^12 steps, a checkpoint every step kept forever.
``JobLimits`` holds the server's bounds (``ServeArgs.job_limits``); ``limit_problems``
checks a validated spec against them and the cluster's size, naming each key.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from rayft.trainers.config import JobSpec, Problems


class JobLimits(BaseModel):
    """Bounds on one fine-tuning job; a job past any of them is answered 400."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_workers: int | None = Field(None, ge=1)
    """Most Ray Train workers per job (``scaling.num_workers``); default: the cluster's CPUs."""
    max_cpus_per_worker: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Most CPUs per worker (``scaling.cpus_per_worker``); default: the cluster's CPUs."""
    max_gpus: int | None = Field(None, ge=0)
    """Most GPUs per job (one per worker on GPU runs); default: the cluster's GPUs."""
    max_steps: int = Field(100_000, ge=1)
    """Most optimizer steps (``optim.max_steps``)."""
    max_epochs: int = Field(50, ge=1)
    """Most passes over the data (``optim.epochs``, ``n_epochs``)."""
    max_batch_size: int = Field(1024, ge=1)
    """Most examples per optimizer step: batch_size x grad_accum x num_workers."""
    max_checkpoints_kept: int = Field(20, ge=1)
    """Largest ``checkpoint.keep``."""
    max_checkpoints: int = Field(1000, ge=1)
    """Most checkpoints one run writes (``max_steps / checkpoint.every_steps``)."""
    min_checkpoint_every_steps: int = Field(1, ge=1)
    """Smallest ``checkpoint.every_steps``."""
    max_failures: int = Field(3, ge=0)
    """Most worker-group restarts (``scaling.max_failures``; -1, unlimited, is refused)."""
    pause_wait_s: float = Field(60.0, gt=0, le=600, allow_inf_nan=False)
    """How long ``POST .../pause`` waits for the run to checkpoint at its next step; past
    it the run is stopped and resumes from its newest complete checkpoint."""
    eval_max_rows: int = Field(1000, ge=1)
    """Most data-source rows one eval run grades (``POST /v1/evals/{id}/runs``)."""
    eval_max_criteria: int = Field(16, ge=1)
    """Most ``testing_criteria`` of one eval."""
    eval_max_completion_tokens: int = Field(512, ge=1)
    """Largest ``sampling_params.max_completion_tokens`` of an eval run (the server's
    ``max_tokens_limit`` also applies)."""
    eval_max_concurrent_runs: int = Field(2, ge=1)
    """Eval runs one replica computes at once; one more is answered 429."""
    eval_run_timeout_s: float = Field(3600.0, gt=0, allow_inf_nan=False)
    """Longest an eval run may compute; past it the run fails with ``run_timeout``."""


@dataclass(frozen=True)
class ClusterSize:
    """What the Ray cluster that runs the jobs has."""

    cpus: float
    gpus: float


def cluster_size() -> ClusterSize:
    """The connected Ray cluster's CPUs and GPUs, or this machine's CPUs without Ray."""
    import ray

    if ray.is_initialized():
        resources = ray.cluster_resources()
        return ClusterSize(resources.get("CPU", 0.0), resources.get("GPU", 0.0))
    return ClusterSize(float(os.cpu_count() or 1), 0.0)


def limit_problems(spec: JobSpec, limits: JobLimits, cluster: ClusterSize) -> Problems:
    """``(dotted key, message)`` for each setting of ``spec`` past ``limits`` or the cluster."""
    return scaling_problems(spec, limits, cluster) + length_problems(spec, limits)


def _over(key: str, value: float, bound: float, what: str) -> tuple[str, str]:
    return key, f"{value:g} is more than this server allows: at most {bound:g} {what}"


def scaling_problems(spec: JobSpec, limits: JobLimits, cluster: ClusterSize) -> Problems:
    """Workers, CPUs and GPUs past the server's bounds or the cluster's size."""
    scaling = spec.scaling
    problems: Problems = []
    max_workers = limits.max_workers or max(1, int(cluster.cpus))
    if scaling.num_workers > max_workers:
        problems.append(_over("scaling.num_workers", scaling.num_workers, max_workers, "workers"))
    max_cpus = limits.max_cpus_per_worker or max(1.0, cluster.cpus)
    if scaling.cpus_per_worker > max_cpus:
        problems.append(
            _over("scaling.cpus_per_worker", scaling.cpus_per_worker, max_cpus, "CPUs per worker")
        )
    on_gpus = scaling.use_gpu is True or (scaling.use_gpu == "auto" and cluster.gpus > 0)
    max_gpus = limits.max_gpus if limits.max_gpus is not None else int(cluster.gpus)
    if on_gpus and scaling.num_workers > max_gpus:
        problems.append(
            (
                "scaling.num_workers",
                f"{scaling.num_workers} workers take one GPU each; this server gives a job at "
                f"most {max_gpus} GPUs",
            )
        )
    if scaling.max_failures < 0 or scaling.max_failures > limits.max_failures:
        problems.append(
            (
                "scaling.max_failures",
                f"{scaling.max_failures} restarts: this server allows 0 to {limits.max_failures}",
            )
        )
    return problems


def length_problems(spec: JobSpec, limits: JobLimits) -> Problems:
    """Steps, epochs, batch size and checkpoints past the server's bounds."""
    optim, checkpoint = spec.optim, spec.checkpoint
    problems: Problems = []
    if optim.max_steps is not None and optim.max_steps > limits.max_steps:
        problems.append(_over("optim.max_steps", optim.max_steps, limits.max_steps, "steps"))
    if optim.epochs > limits.max_epochs:
        problems.append(_over("optim.epochs", optim.epochs, limits.max_epochs, "epochs"))
    examples = optim.batch_size * optim.grad_accum * spec.scaling.num_workers
    if examples > limits.max_batch_size:
        problems.append(
            (
                "optim.batch_size",
                f"{examples} examples per optimizer step (batch_size {optim.batch_size} x "
                f"grad_accum {optim.grad_accum} x {spec.scaling.num_workers} workers) is more "
                f"than this server allows: at most {limits.max_batch_size}",
            )
        )
    if checkpoint.keep > limits.max_checkpoints_kept:
        problems.append(
            _over("checkpoint.keep", checkpoint.keep, limits.max_checkpoints_kept, "checkpoints")
        )
    every = checkpoint.every_steps
    if every is not None and every < limits.min_checkpoint_every_steps:
        problems.append(
            (
                "checkpoint.every_steps",
                f"{every}: this server checkpoints at most every "
                f"{limits.min_checkpoint_every_steps} steps",
            )
        )
    elif every is not None and optim.max_steps is not None:
        written = math.ceil(optim.max_steps / every)
        if written > limits.max_checkpoints:
            problems.append(
                (
                    "checkpoint.every_steps",
                    f"{optim.max_steps} steps with a checkpoint every {every} write {written} "
                    f"checkpoints; this server allows at most {limits.max_checkpoints} per job",
                )
            )
    return problems


GIB = 1024**3


class ProjectQuotas(BaseModel):
    """Bounds on what one project may hold and ask for on a server (``ServeArgs.project_quotas``).

    Past a quota a request is answered 429 ``quota_exceeded`` naming the quota and the
    project's current use. Admin keys and a server without keys count as project ``default``
    for ``requests_per_s``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_files: int = Field(1000, ge=1)
    """Most uploaded files a project keeps (``POST /v1/files``)."""
    max_file_bytes_total: int = Field(10 * GIB, ge=1)
    """Most bytes of uploaded files a project keeps."""
    max_active_jobs: int = Field(4, ge=1)
    """Most fine-tuning jobs of a project that have not ended (validating, queued, running)."""
    requests_per_s: float = Field(50.0, ge=0, allow_inf_nan=False)
    """Requests per second one replica takes from a project (a token bucket); 0: no bound."""
    burst: int = Field(100, ge=1)
    """Requests a project may send at once before ``requests_per_s`` applies."""
    checkpoint_retention_hours: float = Field(72.0, ge=0, allow_inf_nan=False)
    """Hours a finished job's checkpoints are kept (its published artifact stays); 0 keeps
    them for good."""
