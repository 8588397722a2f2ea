"""Trial schedulers, search algorithms and trial sizing for a sweep.

The scheduler's clock is ``eval_step``: the optimizer step of a periodic evaluation,
which a trial reports every ``eval.every_steps`` steps. A trial's final report does
not carry it, so no scheduler ever stops a trial that has already finished its
budget (that would kill it while its adapter is being published).
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from rayft.trainers.config import ConfigError, JobSpec, ScalingSpec

SCHEDULER_CLOCK = "eval_step"
"""The result key schedulers count time in (optimizer steps at periodic evaluations)."""

REPORTED_METRICS = ("eval_loss", "eval_perplexity")
"""Metrics a trial reports at every evaluation; ``tune.metric`` must be one of them."""

TRIAL_DRIVER_CPUS = 0.01
"""The trial function only drives its Train run; its workers hold the real resources."""

DATA_HEADROOM_CPUS = 1.0
"""CPUs kept free of training workers for the Ray Data tasks that tokenise and feed trials."""

TRIAL_NUMBER = "trial"
"""Config key with a trial's number when a model-based searcher (optuna, hyperopt) proposes it."""

SEARCH_PACKAGES = {"optuna": "optuna", "hyperopt": "hyperopt"}


def default_max_concurrent(cluster_cpus: float, cluster_gpus: float, scaling: ScalingSpec) -> int:
    """How many trials can run at once without starving each other.

    Every trial runs its own Train workers (``scaling.num_workers`` ×
    ``scaling.cpus_per_worker`` CPUs, one GPU each on GPU runs); one CPU of the cluster
    stays free for the Ray Data tasks that tokenise and feed the trials. More trials
    would start, then wait for workers that never come.

    Args:
        cluster_cpus: Logical CPUs of the cluster (``ray.cluster_resources()["CPU"]``).
        cluster_gpus: GPUs of the cluster.
        scaling: The trial's ``scaling`` section.

    Returns:
        At least 1.

    Raises:
        ConfigError: The cluster cannot hold even one trial's workers.
    """
    trial_cpus = scaling.num_workers * scaling.cpus_per_worker
    if trial_cpus > cluster_cpus + 1e-9:
        raise ConfigError(
            [
                (
                    "scaling.num_workers",
                    f"one trial needs {trial_cpus:g} CPUs ({scaling.num_workers} workers × "
                    f"{scaling.cpus_per_worker:g} scaling.cpus_per_worker) but the cluster has "
                    f"{cluster_cpus:g}; lower scaling.num_workers or scaling.cpus_per_worker",
                )
            ]
        )
    fits = int((cluster_cpus - DATA_HEADROOM_CPUS + 1e-9) // trial_cpus)
    use_gpu = scaling.use_gpu is True or (scaling.use_gpu == "auto" and cluster_gpus > 0)
    if use_gpu:
        if cluster_gpus < scaling.num_workers:
            raise ConfigError(
                [
                    (
                        "scaling.num_workers",
                        f"one trial needs {scaling.num_workers} GPUs (one per worker) but the cluster "
                        f"has {cluster_gpus:g}; lower scaling.num_workers or set scaling.use_gpu=false",
                    )
                ]
            )
        fits = min(fits, int(cluster_gpus // scaling.num_workers))
    return max(1, fits)


def scheduler_budget(spec: JobSpec) -> tuple[int, int]:
    """``(grace_steps, max_steps)`` of an early-stopping scheduler, in optimizer steps.

    ``tune.scheduler.grace_period`` counts evaluations; it becomes steps through
    ``eval.every_steps``. The budget is ``tune.scheduler.max_steps``, else
    ``optim.max_steps``.

    Raises:
        ConfigError: Evaluation is not periodic or the trial length is unknown.
    """
    every = spec.eval.every_steps
    if every is None:
        raise ConfigError(
            [
                (
                    "eval.every_steps",
                    "an early-stopping scheduler decides at every "
                    "evaluation: set eval.every_steps (or "
                    "tune.scheduler.type=none)",
                )
            ]
        )
    sched = spec.tune.scheduler
    budget = sched.max_steps or spec.optim.max_steps
    if budget is None:
        raise ConfigError(
            [
                (
                    "tune.scheduler.max_steps",
                    "the scheduler needs each trial's length "
                    "in steps: set tune.scheduler.max_steps "
                    "or optim.max_steps",
                )
            ]
        )
    grace = sched.grace_period * every
    if grace > budget:
        raise ConfigError(
            [
                (
                    "tune.scheduler.grace_period",
                    f"{sched.grace_period} evaluations × eval.every_steps={every} = {grace}"
                    f" steps exceeds the trial budget of {budget} steps",
                )
            ]
        )
    return grace, budget


def check_search(spec: JobSpec) -> None:
    """Fail early when ``tune.search`` names a searcher that is not installed."""
    package = SEARCH_PACKAGES.get(spec.tune.search)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(
            [
                (
                    "tune.search",
                    f"search {spec.tune.search!r} needs the "
                    f"{package!r} package, which is not installed: "
                    f"pip install {package}, or use random or grid",
                )
            ]
        )


def build_scheduler(spec: JobSpec):
    """The Tune trial scheduler for ``tune.scheduler`` (metric and mode come from TuneConfig)."""
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        PopulationBasedTraining,
    )

    sched = spec.tune.scheduler
    if sched.type == "none":
        return FIFOScheduler()
    grace, budget = scheduler_budget(spec)
    if sched.type == "asha":
        return ASHAScheduler(
            time_attr=SCHEDULER_CLOCK,
            grace_period=grace,
            max_t=budget,
            reduction_factor=sched.reduction_factor,
        )
    if sched.type == "hyperband":
        # Asynchronous HyperBand: ASHA over HyperBand's brackets, each starting successive
        # halving one rung later, down to one that runs every trial to the budget. Ray's
        # synchronous HyperBandScheduler pauses trials until a bracket is full and, with
        # trials created as concurrency allows, only ever fills its first bracket, which
        # stops nothing (ray-project/ray#37605).
        return _seeded_brackets(ASHAScheduler)(
            seed=spec.optim.seed,
            time_attr=SCHEDULER_CLOCK,
            grace_period=grace,
            max_t=budget,
            reduction_factor=sched.reduction_factor,
            brackets=hyperband_brackets(grace, budget, sched.reduction_factor),
        )
    return PopulationBasedTraining(
        time_attr=SCHEDULER_CLOCK,
        perturbation_interval=sched.perturbation_interval * spec.eval.every_steps,
        hyperparam_mutations=pbt_mutations(sched.mutations, spec),
        # The final report carries no clock (``scheduler_report``): nothing to perturb then.
        require_attrs=False,
        synch=sched.synch,
    )


def _seeded_brackets(scheduler_class):
    """``scheduler_class`` (Ray's ASHA) drawing each new trial's bracket from ``seed``.

    Ray draws the bracket from numpy's global random state; here the draws follow the
    sweep's ``optim.seed``, so a rerun puts the same trials in the same brackets.
    """
    import numpy as np

    class SeededBrackets(scheduler_class):
        def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._bracket_draws = np.random.default_rng(seed)

        def on_trial_add(self, tune_controller, trial) -> None:
            saved = np.random.get_state()
            np.random.seed(int(self._bracket_draws.integers(2**32)))
            try:
                super().on_trial_add(tune_controller, trial)
            finally:
                np.random.set_state(saved)

    return SeededBrackets


def hyperband_brackets(grace: int, budget: int, reduction_factor: float) -> int:
    """HyperBand's bracket count: one per rung from ``grace`` up to ``budget``."""
    return int(math.log(budget / grace) / math.log(reduction_factor) + 1e-9) + 1


# Keys population-based training may change between a checkpoint and the run that
# continues it (the model's shapes, the data order and the sharding stay the same).
PBT_MUTABLE = frozenset(
    {
        "optim.lr",
        "optim.weight_decay",
        "optim.max_grad_norm",
        "optim.warmup_ratio",
        "optim.scheduler",
        "lora.dropout",
        "lora.alpha",
    }
)


def pbt_mutations(mutations: dict[str, Any], spec: JobSpec) -> dict[str, Any]:
    """``tune.scheduler.mutations`` (same distribution syntax as the search space) for PBT."""
    from rayft.raytune.search_space import flatten_space, to_tune, validate_search_space

    mutations = flatten_space(mutations)
    refused = [k for k in mutations if k not in PBT_MUTABLE]
    if refused:
        raise ConfigError(
            [
                (
                    f"tune.scheduler.mutations.{key}",
                    "an exploited trial continues another trial's checkpoint, so only "
                    "settings that keep its weights and data position valid can mutate: "
                    + ", ".join(sorted(PBT_MUTABLE)),
                )
                for key in refused
            ]
        )
    if not mutations:
        raise ConfigError(
            [
                (
                    "tune.scheduler.mutations",
                    "pbt needs at least one key to mutate, "
                    "e.g. optim.lr: {loguniform: [1e-5, 1e-2]}",
                )
            ]
        )
    try:
        validate_search_space(spec.to_dict(), mutations)
    except ConfigError as err:
        prefix = "tune.search_space."
        raise ConfigError(
            [(k.replace(prefix, "tune.scheduler.mutations.", 1), m) for k, m in err.problems]
        ) from None
    return to_tune(mutations)


def build_search(spec: JobSpec, max_concurrent: int):
    """The Tune search algorithm for ``tune.search``, running at most ``max_concurrent`` trials.

    ``random`` and ``grid`` both use Tune's variant generator (grids come from the
    search space's ``grid`` entries), seeded with ``optim.seed`` so a sweep samples the
    same trials when rerun; ``optuna`` and ``hyperopt`` use their Tune searchers.
    The concurrency limit lives here because Tune ignores ``max_concurrent_trials``
    for an explicitly given variant generator.
    """
    check_search(spec)
    seed = spec.optim.seed
    if spec.tune.search in ("random", "grid"):
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed)
    from ray.tune.search import ConcurrencyLimiter

    if spec.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=seed)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(random_state_seed=seed)

    class NumberedTrials(ConcurrencyLimiter):
        """Numbers the trials the searcher proposes 0, 1, 2, ... in their configs.

        Tune names a variant generator's trials ``<id>_<index>``, but a searcher's only by
        a random id; the number in ``TRIAL_NUMBER`` names the trial's run and artifacts.
        The counter is part of the searcher state a resumed sweep restores.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.numbered = 0

        def suggest(self, trial_id: str):
            config = super().suggest(trial_id)
            if isinstance(config, dict):
                config = {**config, TRIAL_NUMBER: self.numbered}
                self.numbered += 1
            return config

    return NumberedTrials(searcher, max_concurrent=max_concurrent)


def max_concurrent(spec: JobSpec, cluster: dict[str, float]) -> int:
    """``tune.max_concurrent_trials``, else what the cluster's resources allow."""
    if spec.tune.max_concurrent_trials is not None:
        return spec.tune.max_concurrent_trials
    return default_max_concurrent(cluster.get("CPU", 0.0), cluster.get("GPU", 0.0), spec.scaling)


def expected_trials(space: dict[str, Any], num_samples: int, search: str) -> int:
    """Trials a sweep runs: ``num_samples`` × the size of the grid entries (if any)."""
    if search not in ("random", "grid"):
        return num_samples
    from rayft.raytune.search_space import flatten_space, parse_entry

    size = 1
    for key, entry in flatten_space(space).items():
        kind, args = parse_entry(key, entry)
        if kind == "grid" or (kind == "choice" and search == "grid"):
            size *= len(args)
    return num_samples * size


def scheduler_report(
    metrics: dict[str, Any], metric: str, mode: str, eval_every: int | None
) -> dict[str, Any] | None:
    """Shape one Train report for Tune, or ``None`` to leave it out.

    * A periodic evaluation (a non-final report at a multiple of ``eval.every_steps``)
      gets the scheduler clock ``eval_step``; checkpoint reports between evaluations
      and the final report do not, so schedulers act on fresh evaluations only.
    * A non-final report without the metric (a checkpoint before any evaluation) is
      left out: Tune requires the metric in every result.
    * A diverged metric (NaN) becomes the worst value, so schedulers stop that trial
      instead of ignoring it.
    """
    out = dict(metrics)
    final = bool(out.get("final"))
    if metric not in out:
        return out if final else None
    value = out[metric]
    if isinstance(value, float) and math.isnan(value):
        out[metric] = math.inf if mode == "min" else -math.inf
    step = out.get("step")
    if not final and eval_every and isinstance(step, int) and step > 0 and step % eval_every == 0:
        out[SCHEDULER_CLOCK] = step
    return out
