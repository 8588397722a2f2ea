"""The sweep driver: a Ray Tune experiment whose trials are real rayft training runs.

Each trial is a Tune function trainable that starts a run with ``trainers.runs.start_run``
(a ``TorchTrainer`` with DeepSpeed, exactly as ``rayft train`` runs it) with the
trial's spec and a run id derived from the trial. Train V2 workers report through
Ray Train; ``TuneReportCallback`` on the run forwards each report to the trial, so
the scheduler (ASHA by default) sees the metric at every evaluation and stops
unpromising trials. A trial's run exports its artifact into its final checkpoint but
publishes nothing (unless ``tune.publish_all``); at the end the driver writes the results
table and plot under ``sweeps/<id>/`` and publishes the best trial's export, once, under
``output.name``.

Expects Ray to be initialised by the caller (``cluster.connect``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rayft.raytune import results as res
from rayft.raytune.schedulers import (
    REPORTED_METRICS,
    TRIAL_DRIVER_CPUS,
    TRIAL_NUMBER,
    build_scheduler,
    build_search,
    check_search,
    expected_trials,
    max_concurrent,
    scheduler_budget,
    scheduler_report,
)
from rayft.raytune.search_space import (
    apply_values,
    flatten_space,
    to_tune,
    trial_values,
    validate_search_space,
)
from rayft.trainers.compat import trials_of_this_run
from rayft.trainers.config import (
    ADAPTER_METHODS,
    ConfigError,
    JobSpec,
    valid_name,
    validate_spec,
)
from rayft.trainers.driver import new_run_id
from rayft.trainers.registry import artifact_location
from rayft.trainers.runs import free_stopped_runs, start_run
from rayft.trainers.storage import (
    MANIFEST_FILE,
    StorageRoot,
    atomic_write,
    run_relpath,
    staging_dir,
    sweep_relpath,
)

SWEEP_SPEC = "sweep.yaml"
TRIALS_DIR = "trials"
STARTS_SUFFIX = ".starts.jsonl"


class SweepInterrupted(RuntimeError):
    """The experiment stopped with trials unfinished; ``rayft tune --resume`` continues it."""


@dataclass
class SweepOutcome:
    """What a finished sweep produced."""

    sweep_id: str
    path: Path
    rows: list[dict[str, Any]]
    """One row per trial, best first (see ``raytune.results.table_columns``)."""
    columns: list[str]
    best: dict[str, Any] | None
    artifact: Path | None
    """The best trial's artifact, published under ``output.name``."""
    table_csv: Path
    table_json: Path
    plot: Path
    trial_artifacts: list[Path] = field(default_factory=list)

    def by_state(self, state: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["state"] == state]


def new_sweep_id(spec: JobSpec) -> str:
    return new_run_id(f"{spec.output.name or 'sweep'}-sweep")


def sweep_path(sweep_id: str, root: StorageRoot) -> Path:
    return root.sweep_dir(sweep_id)


def artifact_kind(spec: JobSpec) -> str:
    return "adapter" if spec.method in ADAPTER_METHODS else "model"


def trial_index(trial_id: str, config: dict[str, Any]) -> int:
    """The trial's number in its sweep.

    Tune's variant generator (random and grid search) ends trial ids in ``_<index>``,
    e.g. ``a1b2c_00003``; a model-based searcher's trials carry it in their config.
    """
    if TRIAL_NUMBER in config:
        return int(config[TRIAL_NUMBER])
    tail = trial_id.rsplit("_", 1)[-1]
    if not tail.isdigit():
        raise ValueError(
            f"trial {trial_id} has no number: neither an _<index> id nor {TRIAL_NUMBER!r}"
        )
    return int(tail)


def trial_run_id(sweep_id: str, index: int) -> str:
    return f"{sweep_id}-trial-{index}"


def trial_artifact_name(name: str, index: int) -> str:
    return f"{name}-trial-{index}"


def validate_sweep(spec: JobSpec) -> None:
    """Every check a sweep needs before Ray starts any trial.

    Raises:
        ConfigError: Naming the key to change (``tune.search_space.<key>`` for the space).
    """
    if spec.tune is None:
        raise ConfigError(
            [
                (
                    "tune",
                    "a sweep is a job spec with a tune: section "
                    "(search_space, scheduler, ...); use rayft train otherwise",
                )
            ]
        )
    problems: list[tuple[str, str]] = []
    try:
        validate_search_space(spec.to_dict(), flatten_space(spec.tune.search_space))
    except ConfigError as err:
        problems += err.problems
    problems += _ranking_problems(spec)
    for check in (check_search, _check_scheduler):
        try:
            check(spec)
        except ConfigError as err:
            problems += err.problems
    if not problems:
        try:
            to_tune(flatten_space(spec.tune.search_space), spec.tune.search)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)


def _ranking_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """What keeps a sweep from ranking and naming its trials: the metric, the evaluation
    data and the artifact name."""
    problems: list[tuple[str, str]] = []
    if spec.tune.metric not in REPORTED_METRICS:
        problems.append(
            (
                "tune.metric",
                f"{spec.tune.metric!r} is not reported by a trial; use "
                f"one of {', '.join(REPORTED_METRICS)}",
            )
        )
    if not spec.has_eval():
        problems.append(
            (
                "data.eval",
                "a sweep ranks trials by their evaluation: set data.eval or data.eval_fraction",
            )
        )
    name = spec.output.name
    if name is not None and not valid_name(f"{name}-trial-99999"):
        problems.append(
            ("output.name", "too long to name the sweep's trials (<name>-trial-<k>): shorten it")
        )
    return problems


def _check_scheduler(spec: JobSpec) -> None:
    if spec.tune.scheduler.type != "none":
        scheduler_budget(spec)


def load_sweep_spec(sweep_id: str, root: StorageRoot) -> JobSpec:
    """The spec a sweep was started with, for ``rayft tune --resume SWEEP_ID``."""
    path = sweep_path(sweep_id, root) / SWEEP_SPEC
    if not path.is_file():
        raise ConfigError(
            [("", f"no sweep {sweep_id!r} under {path.parent.parent} (missing {SWEEP_SPEC})")]
        )
    return validate_spec(yaml.safe_load(path.read_text()), source=str(path))


# --------------------------------------------------------------------------- trials


def _sweep_info(spec: JobSpec, sweep_id: str) -> dict[str, Any]:
    base = spec.to_dict()
    base["tune"] = None
    sched = spec.tune.scheduler
    space = list(flatten_space(spec.tune.search_space))
    pbt_every = None
    if sched.type == "pbt":
        space += [k for k in flatten_space(sched.mutations) if k not in space]
        pbt_every = sched.perturbation_interval * (spec.eval.every_steps or 1)
    return {
        "id": sweep_id,
        "base": base,
        "space": space,
        "pbt_every_steps": pbt_every,
        "name": spec.output.name or sweep_id,
        "metric": spec.tune.metric,
        "mode": spec.tune.mode,
        "eval_every": spec.eval.every_steps,
        "storage": spec.storage,
        "publish_all": spec.tune.publish_all,
    }


def trial_spec(sweep: dict[str, Any], values: dict[str, Any], index: int) -> JobSpec:
    """The job spec of trial ``index``: the sweep's base spec with the trial's values set.

    With ``tune.publish_all`` each trial publishes under ``<output.name>-trial-<index>``
    (replacing its own earlier attempt on resume); the sweep publishes the best one under
    ``output.name`` in any case.
    """
    data = apply_values(sweep["base"], values)
    data["output"] = {
        **data.get("output", {}),
        "name": trial_artifact_name(sweep["name"], index),
        "overwrite": True,
    }
    if sweep.get("pbt_every_steps"):
        # Population-based training clones the newest checkpoint a trial has reported:
        # one per perturbation interval keeps what an exploit copies current.
        data["checkpoint"] = {**data.get("checkpoint", {}), "every_steps": sweep["pbt_every_steps"]}
    return validate_spec(data)


def _train_report_callback(metric: str, mode: str, eval_every: int | None, bridge: Any = None):
    """The Train callback that feeds a run's reports to its Tune trial.

    Without ``bridge`` it is Tune's ``TuneReportCallback`` (metrics only; the checkpoint
    path rides along as a metric). Population-based training needs Tune to hold real
    checkpoints, so with ``bridge`` (a ``ray.util.queue.Queue``) every report goes there
    with its checkpoint, and the trial function reports both to Tune (``_relay_reports``).
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class SweepReportCallback(TuneReportCallback):
        """Forwards Train reports to the Tune trial, shaped by ``scheduler_report``."""

        def __init__(self) -> None:
            super().__init__()
            self._bridge = bridge

        def after_report(self, run_context, metrics, checkpoint):
            shaped = scheduler_report(metrics[0], metric, mode, eval_every)
            if shaped is None:
                return
            if self._bridge is not None:
                self._bridge.put({"metrics": shaped, "checkpoint": checkpoint})
            else:
                super().after_report(run_context, [shaped, *metrics[1:]], checkpoint)

    return SweepReportCallback()


def _keep_copy(checkpoint: Any, root: StorageRoot, run_id: str) -> Any:
    """Copy the checkpoint an exploited trial starts from into its own run directory.

    Tune keeps only a few checkpoints per trial and the donor trial keeps reporting,
    so the one PBT chose may be deleted before the new run's workers load it. When it
    is already gone, the donor trial's newest checkpoint is taken instead.
    """
    import pyarrow.fs as pafs
    from ray import tune

    relpath = run_relpath(run_id, "start_from")
    target = root.path(relpath)
    try:
        checkpoint.to_directory(str(target))
    except (FileNotFoundError, OSError):
        fs, parent = checkpoint.filesystem, checkpoint.path.rstrip("/").rsplit("/", 1)[0]
        found = fs.get_file_info(pafs.FileSelector(parent))
        newest = sorted(i.path for i in found if i.base_name.startswith("checkpoint_"))
        if not newest:
            raise
        tune.Checkpoint(path=newest[-1], filesystem=fs).to_directory(str(target))
    remote = root.remote(relpath)
    if remote is None:
        return tune.Checkpoint.from_directory(str(target))
    # An object-storage root: the run's workers may be on other machines.
    root.delete(relpath)
    root.upload_dir(target, relpath)
    return tune.Checkpoint(path=remote[1], filesystem=remote[0])


def _relay_reports(future: Any, bridge: Any) -> Any:
    """Report what the run's callback queued to Tune, checkpoints included, until it ends."""
    import ray
    from ray import tune

    while True:
        done, _ = ray.wait([future], timeout=0.5)
        while not bridge.empty():
            item = bridge.get()
            train_checkpoint = item["checkpoint"]
            checkpoint = None
            if train_checkpoint is not None:
                checkpoint = tune.Checkpoint(
                    path=train_checkpoint.path, filesystem=train_checkpoint.filesystem
                )
            tune.report(item["metrics"], checkpoint=checkpoint)
        if done:
            return ray.get(future)


def train_trial(config: dict[str, Any], sweep: dict[str, Any]) -> dict[str, Any]:
    """Tune function trainable: one trial is one rayft training run.

    The run id is derived from the trial, so a trial restarted by ``Tuner.restore``
    resumes its own Train run from its newest checkpoint (Train V2 resumes a run
    name that already has checkpoints in storage).
    """
    import ray
    from ray import tune

    from rayft.trainers.driver import run_recorded
    from rayft.trainers.loop import ReportEveryEval  # torch: imported where a trial runs

    trial_id = tune.get_context().get_trial_id()
    index = trial_index(trial_id, config)
    values = trial_values({k: None for k in sweep["space"]}, config)
    spec = trial_spec(sweep, values, index)
    run_id = trial_run_id(sweep["id"], index)
    root = StorageRoot.resolve(sweep["storage"])
    starts = f"{index}{STARTS_SUFFIX}"
    # A trial that starts again (PBT exploit or pause, Tuner.restore) had its previous
    # actors killed; the placement group of that start's Train workers may still hold
    # its CPUs, which the new run needs.
    free_stopped_runs(root, trial_run_ids(root, sweep["id"], index))
    pbt = bool(sweep.get("pbt_every_steps"))
    start_from = tune.get_checkpoint() if pbt else None
    donor = None
    bridge = None
    if start_from is not None:
        # Population-based training restarted this trial from the newest checkpoint of
        # a better trial (or, after an interruption, its own): a new Train run continues
        # those weights with this trial's current values.
        generation = len(read_trial_record(root, sweep["id"], starts).splitlines())
        run_id = f"{run_id}-g{generation}"
        donor = start_from.path
        start_from = _keep_copy(start_from, root, run_id)
    resume = start_from is None and run_recorded(run_id, root)
    # One line per start: a finished trial that was never rerun has exactly one.
    start = {
        "trial_id": trial_id,
        "run_id": run_id,
        "resume": resume,
        "started_from": donor,
        "values": values,
        "time": time.time(),
    }
    write_trial_record(
        root, sweep["id"], starts, json.dumps(start, default=str) + "\n", append=True
    )
    if pbt:
        from ray.util.queue import Queue

        bridge = Queue(actor_options={"num_cpus": 0})
    # Tune places a trial's child tasks inside the trial's placement group, where Ray
    # Data's tokenise/shuffle tasks (CPU and memory) cannot fit. The run's driver runs
    # in an actor that leaves the group, so the run places its tasks as under `rayft
    # train`. The actor is owned by this trial: when the scheduler stops the trial,
    # Ray kills the actor and with it the Train controller and its workers; the
    # sweep driver then frees their placement group (``TrialTeardown``).
    run = start_run(
        spec,
        run_id,
        in_actor=True,
        resume=resume,
        loop_callbacks=(ReportEveryEval(),),
        callbacks=(
            _train_report_callback(sweep["metric"], sweep["mode"], sweep["eval_every"], bridge),
        ),
        start_from=start_from,
        publish=bool(sweep.get("publish_all")),
    )
    try:
        outcome = run.result() if bridge is None else _relay_reports(run.future, bridge)
    except (ray.exceptions.RayActorError, ray.exceptions.TaskCancelledError):
        # The trial's run was torn down with the sweep (Ctrl-C, a stop): it is unfinished,
        # not errored, and ``rayft tune --resume`` continues it from its checkpoint.
        raise
    except Exception as err:
        # Recorded for the results table; re-raised so Tune marks the trial ERROR, the
        # sweep goes on with the others, and ``rayft tune --resume`` retries this one.
        failure = {
            "trial_id": trial_id,
            "index": index,
            "run_id": run_id,
            "params": values,
            "error": _error_line(err),
            "failed_at": time.time(),
        }
        write_trial_record(root, sweep["id"], f"{index}.json", json.dumps(failure, indent=2))
        raise
    record = {
        "trial_id": trial_id,
        "index": index,
        "run_id": run_id,
        "params": values,
        "artifact": artifact_location(
            artifact_kind(spec), spec.output.name, root, outcome.artifact
        ),
        # The final checkpoint, whose export/ the sweep publishes if this trial is the best.
        "checkpoint": Path(outcome.checkpoint_path).name if outcome.checkpoint_path else None,
        "metrics": outcome.metrics,
        "finished_at": time.time(),
    }
    write_trial_record(
        root, sweep["id"], f"{index}.json", json.dumps(record, indent=2, default=str)
    )
    return {}


def _error_line(err: BaseException) -> str:
    """The root cause of a trial's failure in one line (Ray wraps it in ``RayTaskError``)."""
    cause = getattr(err, "cause", None) or err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


def read_trial_record(root: StorageRoot, sweep_id: str, name: str) -> str:
    """A trial's record file under ``sweeps/<id>/trials/`` (empty when there is none).

    Under an object-storage root the file is read from there: a trial's actors may run
    on another machine than the sweep's driver, each with its own local mirror.
    """
    raw = root.read(_record_relpath(sweep_id, name))
    return raw.decode() if raw is not None else ""


def write_trial_record(
    root: StorageRoot, sweep_id: str, name: str, text: str, append: bool = False
) -> None:
    """Write (or append to) a trial's record file, locally and under an object-storage root.

    Each record has one writer at a time (the trial, or its Train run's controller).
    """
    if append:
        text = read_trial_record(root, sweep_id, name) + text
    root.write(_record_relpath(sweep_id, name), text)


def _record_relpath(sweep_id: str, name: str) -> str:
    return sweep_relpath(sweep_id, TRIALS_DIR, name)


def trial_run_ids(storage: StorageRoot, sweep_id: str, index: int) -> set[str]:
    """The id of every run trial ``index`` started (a PBT trial starts one per generation)."""
    started = read_trial_record(storage, sweep_id, f"{index}{STARTS_SUFFIX}").splitlines()
    return {json.loads(line)["run_id"] for line in started if line.strip()}


def _teardown_callback(sweep_id: str, storage: StorageRoot):
    from ray.tune import Callback

    class TrialTeardown(Callback):
        """Frees what a stopped or failed trial's Train run still holds."""

        def _free(self, trial) -> None:
            # The trial's actors are being killed; Tune's loop goes on meanwhile.
            index = trial_index(trial.trial_id, trial.config)
            free_stopped_runs(storage, trial_run_ids(storage, sweep_id, index), background=True)

        def on_trial_complete(self, iteration: int, trials, trial, **info) -> None:
            self._free(trial)

        def on_trial_error(self, iteration: int, trials, trial, **info) -> None:
            self._free(trial)

    return TrialTeardown()


# --------------------------------------------------------------------------- live table


def _live_table_callback(params: list[str], metric: str, every_s: float):
    from ray.tune import Callback

    class LiveTable(Callback):
        """Prints the trial table (trial, params, step, metric, state) while the sweep runs."""

        def __init__(self) -> None:
            self._last_print = 0.0
            self._printed_states: dict[str, str] = {}

        def _rows(self, trials) -> list[dict[str, Any]]:
            rows = []
            for t in trials:
                last = t.last_result or {}
                rows.append(
                    {
                        "trial": trial_index(t.trial_id, t.config),
                        **{p: t.config.get(p) for p in params},
                        "step": last.get("step"),
                        metric: last.get(metric),
                        "state": _live_state(t),
                    }
                )
            return sorted(rows, key=lambda r: r["trial"])

        def on_step_end(self, iteration: int, trials, **info) -> None:
            states = {t.trial_id: _live_state(t) for t in trials}
            changed = states != self._printed_states
            if time.time() - self._last_print < every_s and not (changed and states):
                return
            if not changed and time.time() - self._last_print < 4 * every_s:
                return
            self._last_print = time.time()
            self._printed_states = states
            columns = ["trial", *params, "step", metric, "state"]
            print(
                f"\n[rayft] sweep trials ({time.strftime('%H:%M:%S')})\n"
                + res.format_table(self._rows(trials), columns),
                file=sys.stderr,
                flush=True,
            )

    return LiveTable()


def _live_state(trial) -> str:
    if trial.status in ("TERMINATED", "ERROR"):
        return res.trial_state(trial.status, trial.last_result)
    return trial.status.lower()


# --------------------------------------------------------------------------- the sweep


def run_sweep(
    spec: JobSpec, sweep_id: str | None = None, resume: bool = False, show_progress: bool = True
) -> SweepOutcome:
    """Run (or resume) a hyperparameter sweep over ``spec.tune.search_space``.

    Args:
        spec: Validated job spec with a ``tune`` section.
        sweep_id: Name of the sweep under ``sweeps/``; a new one is made when omitted.
        resume: Continue ``sweep_id``: finished trials are kept, unfinished ones continue
            from their last checkpoint, errored ones are retried.
        show_progress: Print the live trial table.

    Returns:
        The results table, the plot and the best trial's published artifact.

    Raises:
        ConfigError: The sweep is invalid (before any trial starts).
        SweepInterrupted: The experiment stopped with unfinished trials.
    """
    import ray
    from ray import tune

    from rayft.trainers.registry import check_publishable

    validate_sweep(spec)
    sweep_id = sweep_id or new_sweep_id(spec)
    if not valid_name(sweep_id):
        raise ConfigError(
            [("", f"invalid sweep id {sweep_id!r}: use letters, digits, '.', '_' and '-'")]
        )
    root = StorageRoot.resolve(spec.storage)
    path = sweep_path(sweep_id, root)
    kind = artifact_kind(spec)
    name = spec.output.name or sweep_id
    space = flatten_space(spec.tune.search_space)
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise ConfigError(
                [("", f"sweep {sweep_id!r} has no saved Tune state in {path}; nothing to resume")]
            )
    else:
        if path.exists() and any(path.iterdir()):
            raise ConfigError(
                [
                    (
                        "",
                        f"sweep {sweep_id!r} already exists at {path}; resume it "
                        "with rayft tune --resume or choose another id",
                    )
                ]
            )
        check_publishable(kind, name, spec.output.overwrite, root)
        if spec.tune.publish_all:
            count = expected_trials(space, spec.tune.num_samples, spec.tune.search)
            for k in range(count):
                check_publishable(kind, trial_artifact_name(name, k), spec.output.overwrite, root)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / SWEEP_SPEC, yaml.safe_dump(spec.to_dict(), sort_keys=False))

    cluster = ray.cluster_resources()
    concurrent = max_concurrent(spec, cluster)
    sweep = _sweep_info(spec, sweep_id)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, sweep=sweep), {"CPU": TRIAL_DRIVER_CPUS}
    )
    callbacks = [_teardown_callback(sweep_id, root)]
    if show_progress:
        callbacks.append(_live_table_callback(list(space), spec.tune.metric, 10.0))
    say = _printer(show_progress)
    run_config = tune.RunConfig(
        name=sweep_id,
        storage_path=str(root.sweeps),
        callbacks=callbacks,
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=0),
        # PBT copies each reported checkpoint into the trial's directory; a few suffice
        # (an exploit clones the newest, and PBT warns below three).
        checkpoint_config=tune.CheckpointConfig(num_to_keep=4)
        if sweep["pbt_every_steps"]
        else None,
    )
    if resume:
        say(f"[rayft] resuming sweep {sweep_id} from {path}")
        tuner = tune.Tuner.restore(
            str(path), trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        say(
            f"[rayft] sweep {sweep_id}: {spec.tune.num_samples} sample(s) over "
            f"{', '.join(space)}; scheduler {spec.tune.scheduler.type}, search "
            f"{spec.tune.search}, {concurrent} trial(s) at a time, "
            f"{spec.scaling.num_workers} worker(s) each"
        )
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune(space, spec.tune.search),
            tune_config=tune.TuneConfig(
                metric=spec.tune.metric,
                mode=spec.tune.mode,
                num_samples=spec.tune.num_samples,
                scheduler=build_scheduler(spec),
                search_alg=build_search(spec, concurrent),
            ),
            run_config=run_config,
        )
    grid = tuner.fit()
    # The experiment state on disk can still read ERROR for a trial this (resumed) run
    # retried and finished; the controller's own view says how it ended.
    finished_now = {
        t.trial_id: t.last_result or {}
        for t in trials_of_this_run(grid)
        if t.status == "TERMINATED"
    }
    return _finish(spec, root, sweep_id, path, kind, name, say, finished_now)


@dataclass
class _Trials:
    """The sweep's trials as the results table shows them, best first."""

    rows: list[dict[str, Any]]
    curves: dict[str, list[tuple[int, float]]]
    states: dict[str, str]


def _finish(
    spec: JobSpec,
    root: StorageRoot,
    sweep_id: str,
    path: Path,
    kind: str,
    name: str,
    say,
    finished_now: dict[str, dict[str, Any]] | None = None,
) -> SweepOutcome:
    """Write the results table and plot, and publish the best trial of a complete sweep.

    Raises:
        SweepInterrupted: Trials are unfinished or were never started.
    """
    tune_spec = spec.tune
    metric = tune_spec.metric
    trials = _collect_trials(spec, root, sweep_id, path, name, finished_now or {})
    rows = trials.rows
    errored = _note_errors(root, sweep_id, rows)
    unfinished = [r for r in rows if r["state"] == res.UNFINISHED]
    # An interrupted sweep may not have created all its trials yet.
    not_started = max(
        0,
        expected_trials(tune_spec.search_space, tune_spec.num_samples, tune_spec.search)
        - len(rows),
    )
    complete = not unfinished and not not_started
    about = _about(spec, sweep_id, complete, errored)
    finished = [r for r in rows if r["state"] == res.FINISHED and _is_finite(r.get(metric))]
    best = finished[0] if finished and complete else None
    artifact, trial_artifacts = None, []
    if best is not None:
        artifact, trial_artifacts = _publish(spec, root, sweep_id, kind, name, best, finished)
        params = flatten_space(tune_spec.search_space)
        about["best"] = {k: best.get(k) for k in ("trial", "trial_id", "run_id", metric, *params)}
        about["best"]["adapter"] = name
        about["artifact"] = artifact_location(kind, name, root, artifact)
    columns = res.table_columns(rows, list(flatten_space(tune_spec.search_space)), metric)
    csv_path, json_path = res.write_tables(path, rows, columns, about)
    plot = res.plot_curves(
        path / res.PLOT_FILE,
        trials.curves,
        trials.states,
        metric,
        f"sweep {sweep_id}: {metric} by step ({tune_spec.scheduler.type})",
    )
    _mirror_results(root, sweep_id, path)
    say("\n[rayft] sweep results (best first)\n" + res.format_table(rows, columns))
    say(f"[rayft] table: {csv_path}  plot: {plot}")
    _say_errors(say, sweep_id, errored)
    if not complete:
        raise SweepInterrupted(
            f"sweep {sweep_id} stopped with {len(unfinished) + not_started} unfinished "
            f"trial(s); continue it with: rayft tune --resume {sweep_id}"
        )
    if artifact is not None:
        say(
            f"[rayft] best trial {best['trial']} ({metric} {best[metric]:.4f}) published as "
            f"{kind} {name!r}: {artifact}"
        )
    return SweepOutcome(
        sweep_id, path, rows, columns, best, artifact, csv_path, json_path, plot, trial_artifacts
    )


def _collect_trials(
    spec: JobSpec,
    root: StorageRoot,
    sweep_id: str,
    path: Path,
    name: str,
    finished_now: dict[str, dict[str, Any]],
) -> _Trials:
    """One row and one curve per trial of the experiment saved at ``path``, best first."""
    from ray.tune import ExperimentAnalysis

    metric = spec.tune.metric
    params = list(flatten_space(spec.tune.search_space))
    analysis = ExperimentAnalysis(str(path))
    trials = _Trials([], {}, {})
    for trial in analysis.trials:
        index = trial_index(trial.trial_id, trial.config)
        last = trial.last_result or {}
        status = trial.status
        if status == "ERROR" and trial.trial_id in finished_now:
            status, last = "TERMINATED", finished_now[trial.trial_id]
        state = res.trial_state(status, last)
        points = _curve(analysis.trial_dataframes.get(trial.trial_id), metric)
        finite = [v for _, v in points if math.isfinite(v)]
        best = (min(finite) if spec.tune.mode == "min" else max(finite)) if finite else None
        row = {
            "trial": index,
            **{p: trial.config.get(p) for p in params},
            "step": last.get("step"),
            metric: _number(last.get(metric)),
            "state": state,
            f"best_{metric}": best,
            "run_id": _last_run_id(root, sweep_id, index),
            "trial_id": trial.trial_id,
        }
        if state == res.FINISHED and spec.tune.publish_all:
            row["adapter"] = trial_artifact_name(name, index)
        trials.rows.append(row)
        label = f"trial {index}: " + ", ".join(f"{p}={_short(trial.config.get(p))}" for p in params)
        trials.curves[label], trials.states[label] = points, state
    trials.rows = res.sort_rows(trials.rows, metric, spec.tune.mode)
    return trials


def _about(
    spec: JobSpec, sweep_id: str, complete: bool, errored: list[dict[str, Any]]
) -> dict[str, Any]:
    """The results JSON's description of the sweep (``best`` and ``artifact`` come later)."""
    tune_spec = spec.tune
    return {
        "sweep_id": sweep_id,
        "metric": tune_spec.metric,
        "mode": tune_spec.mode,
        "scheduler": tune_spec.scheduler.type,
        "search": tune_spec.search,
        "search_space": flatten_space(tune_spec.search_space),
        "complete": complete,
        "errored": [r["trial"] for r in errored],
    }


def _say_errors(say, sweep_id: str, errored: list[dict[str, Any]]) -> None:
    for row in errored:
        say(f"[rayft] trial {row['trial']} failed: {row.get('error', '?')}")
    if errored:
        say(f"[rayft] retry the failed trial(s) with: rayft tune --resume {sweep_id}")


def _note_errors(
    root: StorageRoot, sweep_id: str, rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The errored rows, each given the ``error`` its trial recorded."""
    errored = [r for r in rows if r["state"] == res.ERROR]
    for row in errored:
        raw = read_trial_record(root, sweep_id, f"{row['trial']}.json")
        try:
            row["error"] = json.loads(raw).get("error") if raw else None
        except json.JSONDecodeError:
            row["error"] = None
    return errored


def _mirror_results(root: StorageRoot, sweep_id: str, path: Path) -> None:
    """With a URI root, upload the sweep's spec, tables and plot to ``sweeps/<id>/`` there."""
    for name in (SWEEP_SPEC, res.RESULTS_CSV, res.RESULTS_JSON, res.PLOT_FILE):
        if (path / name).is_file():
            root.mirror(sweep_relpath(sweep_id, name))


def _already_published(
    kind: str, name: str, sweep_id: str, best: dict[str, Any], root: StorageRoot
) -> Path | None:
    """``name``'s path when an earlier run of this sweep published this same best trial.

    A resumed sweep whose best trial is unchanged has nothing to publish again.
    """
    from rayft.trainers.registry import published_manifest, sync_artifact

    current = sync_artifact(kind, name, root)
    manifest = published_manifest(current)
    note = manifest.sweep if manifest is not None else None
    if note is None or note.id != sweep_id or note.trial != best["trial"]:
        return None
    return current if note.run_id == best["run_id"] else None


def _sweep_note(spec: JobSpec, sweep_id: str, row: dict[str, Any], best: dict[str, Any]):
    """What a sweep's artifact records under ``sweep``: its trial and how it scored."""
    from rayft.trainers.registry import SweepNote

    metric = spec.tune.metric
    return SweepNote(
        id=sweep_id,
        trial=row["trial"],
        trial_id=row["trial_id"],
        run_id=row["run_id"],
        params={p: row.get(p) for p in flatten_space(spec.tune.search_space)},
        metric=metric,
        mode=spec.tune.mode,
        value=row.get(metric),
        best_trial=best["trial"],
    )


def _publish(
    spec: JobSpec,
    root: StorageRoot,
    sweep_id: str,
    kind: str,
    name: str,
    best: dict[str, Any],
    finished: list[dict[str, Any]],
) -> tuple[Path, list[Path]]:
    """Publish the best trial under ``name`` (once); note each published trial artifact."""
    artifact = _already_published(kind, name, sweep_id, best, root)
    if artifact is None:
        artifact = _publish_best(spec, root, sweep_id, kind, name, best)
    if not spec.tune.publish_all:
        return artifact, []
    return artifact, _note_trial_artifacts(spec, root, sweep_id, kind, name, best, finished)


def _publish_best(
    spec: JobSpec, root: StorageRoot, sweep_id: str, kind: str, name: str, best: dict[str, Any]
) -> Path:
    """Publish the export in the best trial's final checkpoint under ``name``.

    The manifest is the one the trial's run wrote next to it (``runs/<id>/rayft.json``),
    with the sweep's note added. The trial's rank 0 checked the export serves when it
    wrote it (its note is read here); ``publish_dir`` records the base's fingerprint.
    """
    import shutil

    from rayft.trainers.loop import EXPORT_DIR, SERVABLE_FILE
    from rayft.trainers.registry import ArtifactManifest, RegistryError
    from rayft.trainers.servable import export_was_checked

    if spec.tune.publish_all:
        return _republish_best_trial(spec, root, sweep_id, kind, name, best)
    run_id = best["run_id"]
    relpath = run_relpath(run_id, MANIFEST_FILE)
    raw = root.read(relpath)
    record = json.loads(read_trial_record(root, sweep_id, f"{best['trial']}.json") or "{}")
    if raw is None or not record.get("checkpoint"):
        raise RegistryError(
            f"the best trial {best['trial']} of sweep {sweep_id} left no export to publish "
            f"({root.url(relpath)} or its trial record is missing); run the sweep again"
        )
    manifest = ArtifactManifest.parse(raw, root.url(relpath))
    export = run_relpath(run_id, record["checkpoint"], EXPORT_DIR)
    checked = export_was_checked(
        root.read(run_relpath(run_id, record["checkpoint"], SERVABLE_FILE))
    )
    if not root.is_remote:
        source = root.path(export)
        return _publish_as_best(spec, root, sweep_id, kind, name, best, source, manifest, checked)
    local = staging_dir(root.sweep_dir(sweep_id) / "best-export")
    try:
        root.download_dir(export, local)
        return _publish_as_best(spec, root, sweep_id, kind, name, best, local, manifest, checked)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _republish_best_trial(
    spec: JobSpec, root: StorageRoot, sweep_id: str, kind: str, name: str, best: dict[str, Any]
) -> Path:
    """With ``tune.publish_all`` every trial published itself: the best one's artifact is
    published again under ``name``, with the sweep's note."""
    from rayft.trainers.registry import RegistryError, published_manifest, sync_artifact

    trial_dir = sync_artifact(kind, trial_artifact_name(name, best["trial"]), root)
    manifest = published_manifest(trial_dir)
    if manifest is None:
        raise RegistryError(
            f"the best trial {best['trial']} of sweep {sweep_id} has no published artifact "
            f"({trial_dir}); run the sweep again"
        )
    # It was checked when the trial published it.
    return _publish_as_best(spec, root, sweep_id, kind, name, best, trial_dir, manifest, True)


def _publish_as_best(
    spec: JobSpec,
    root: StorageRoot,
    sweep_id: str,
    kind: str,
    name: str,
    best: dict[str, Any],
    source: Path,
    manifest: Any,
    checked: bool,
) -> Path:
    """Publish ``source`` (the best trial's export or artifact) under ``name``, its
    manifest carrying the sweep's note. Overwriting was checked before the first trial
    started; ``checked``: the servability check passed where the files were made."""
    from rayft.trainers.models import resolve_model
    from rayft.trainers.registry import publish_dir

    manifest.sweep = _sweep_note(spec, sweep_id, best, best)
    model_dir = resolve_model(spec.model.name, root.models, root)
    return publish_dir(source, kind, name, manifest, True, root, model_dir, checked=checked)


def _note_trial_artifacts(
    spec: JobSpec,
    root: StorageRoot,
    sweep_id: str,
    kind: str,
    name: str,
    best: dict[str, Any],
    finished: list[dict[str, Any]],
) -> list[Path]:
    """With ``tune.publish_all``: add the sweep's note to every published trial artifact."""
    from rayft.trainers.registry import published_manifest, sync_artifact, write_manifest

    kept: list[Path] = []
    for row in finished:
        trial_dir = sync_artifact(kind, trial_artifact_name(name, row["trial"]), root)
        manifest = published_manifest(trial_dir)
        if manifest is None:
            continue
        manifest.sweep = _sweep_note(spec, sweep_id, row, best)
        write_manifest(trial_dir, manifest, root)
        kept.append(trial_dir)
    return kept


def _last_run_id(storage: StorageRoot, sweep_id: str, index: int) -> str:
    """The Train run a trial last started (PBT starts a new one at every exploit)."""
    starts = read_trial_record(storage, sweep_id, f"{index}.starts.jsonl")
    lines = [line for line in starts.splitlines() if line]
    if lines:
        return json.loads(lines[-1])["run_id"]
    return trial_run_id(sweep_id, index)


def _curve(frame, metric: str) -> list[tuple[int, float]]:
    if frame is None or frame.empty or metric not in frame or "step" not in frame:
        return []
    points: dict[int, float] = {}
    for step, value in zip(frame["step"], frame[metric], strict=True):
        if _is_finite(step) and isinstance(value, (int, float)) and not math.isnan(value):
            points[int(step)] = float(value)
    return sorted(points.items())


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _printer(enabled: bool):
    def say(text: str) -> None:
        if enabled:
            print(text, file=sys.stderr, flush=True)

    return say
