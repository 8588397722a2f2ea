"""rayft's Python API: train, sweep, submit, serve and load what was trained.

``import rayft`` exposes these functions (``rayft.train``, ``rayft.tune``, ``rayft.submit``,
``rayft.serve``, ``rayft.load_adapter``); the ``rayft`` command line is a thin client of
them, so every pre-flight check and every error type lives here once.

Ray starts embedded for the duration of a call unless ``address`` (or ``RAY_ADDRESS``)
names a cluster, or Ray is already initialised in this process, in which case the call
uses that cluster and leaves it running.

Errors are typed: bad input raises :class:`~rayft.trainers.config.ConfigError`,
:class:`~rayft.trainers.data.DataError`, :class:`~rayft.trainers.models.ModelError`,
:class:`~rayft.trainers.registry.RegistryError` or :class:`~rayft.cluster.errors.UserError`
before any cluster work; a run that fails while running raises
:class:`~rayft.cluster.errors.TrainingFailed` (a :class:`~rayft.cluster.errors.ClusterError`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias

from rayft.cluster.errors import TrainingFailed, UserError, is_bad_input, root_cause
from rayft.raytune.sweep import SweepOutcome
from rayft.trainers.config import JobSpec, apply_overrides, read_yaml, validate_spec
from rayft.trainers.manifest import ArtifactManifest
from rayft.trainers.registry import artifact_location
from rayft.trainers.storage import StorageRoot

if TYPE_CHECKING:
    from rayft.cluster.jobs import JobView
    from rayft.serving.app import ServeArgs

__all__ = [
    "Artifact",
    "RunHandle",
    "SweepResult",
    "TrainResult",
    "load_adapter",
    "resolve_spec",
    "serve",
    "stop_serving",
    "submit",
    "train",
    "tune",
    "write_rows",
]

SpecLike: TypeAlias = "JobSpec | Mapping[str, Any] | str | os.PathLike[str]"
"""A job spec: a typed ``JobSpec``, a plain dict of sections, or the path of a YAML file."""
RowsLike: TypeAlias = "Iterable[Mapping[str, Any]] | str | os.PathLike[str] | Any"
"""Training rows: a list of row dicts, a ``datasets.Dataset``, a Ray Dataset, or a file path."""

PENDING_ROWS = "rows-given-in-python.jsonl"
"""Stands in for ``data.train``/``data.eval`` until rows given in Python are written."""

# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Artifact:
    """A published adapter or model.

    Attributes:
        name: Registry name (``rayft.load_adapter(name)``, the served model name).
        kind: ``adapter`` or ``model``.
        path: Its directory on this machine.
        location: Where it lives for every machine (the URI under a URI root).
        manifest: Its ``rayft.json``: base model, spec, data fingerprint, metrics, lineage.
    """

    name: str
    kind: str
    path: Path
    location: str
    manifest: ArtifactManifest

    @classmethod
    def at(cls, path: Path, root: StorageRoot) -> Artifact:
        """The published artifact whose directory is ``path``.

        Raises:
            ManifestError: Its ``rayft.json`` is missing or corrupt.
        """
        manifest = ArtifactManifest.read(path)
        location = artifact_location(manifest.kind, path.name, root, path) or str(path)
        return cls(path.name, manifest.kind, Path(path), location, manifest)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        run_id: The run's id (``runs/<run_id>/`` in storage; ``train(resume=run_id)``).
        artifact: The published adapter or model.
        metrics: The run's final metrics.
        evals: Every evaluation, first (step 0, before training) to last.
        history: Every logged train and eval record.
        checkpoint: The run's last checkpoint.
    """

    run_id: str
    artifact: Artifact | None
    metrics: dict[str, Any]
    evals: list[dict[str, Any]]
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    checkpoint: str | None = None


@dataclass
class SweepResult(SweepOutcome):
    """What :func:`tune` produced: the sweep's outcome, with its best artifact typed.

    Attributes:
        sweep_id: The sweep's id (``sweeps/<sweep_id>/``; ``tune(resume=sweep_id)``).
        path: The sweep's directory: Tune's state, the results table and plot.
        trials: One row per trial, best first: rank, trial, the searched keys, step,
            the metric, state, run id and artifact (:meth:`frame` gives a DataFrame);
            ``rows`` is the same list.
        columns: The table's column order.
        best: The best trial's row (its searched keys and metrics), if any finished.
        best_artifact: The best trial's artifact, published under ``output.name``, with
            its manifest (``artifact`` is its path).
        table_csv: ``results.csv``; ``table_json`` the same as JSON.
        plot: The sweep's plot.
        trial_artifacts: Every trial's artifact with ``tune.publish_all``.
    """

    best_artifact: Artifact | None = None

    @property
    def trials(self) -> list[dict[str, Any]]:
        return self.rows

    def frame(self) -> Any:
        """The trials table as a ``pandas.DataFrame`` (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.trials, columns=self.columns)


# --------------------------------------------------------------------------- specs and rows


def spec_source(spec: SpecLike) -> tuple[dict[str, Any], str | None]:
    """The plain dict of ``spec`` and the file it came from (``None`` for objects).

    Raises:
        ConfigError: A YAML file that is missing or does not parse.
        UserError: ``spec`` is none of the accepted types.
    """
    if isinstance(spec, JobSpec):
        return spec.to_dict(), None
    if isinstance(spec, Mapping):
        return dict(spec), None
    if isinstance(spec, (str, os.PathLike)):
        return read_yaml(spec), os.fspath(spec)
    raise UserError(
        f"a job spec is a JobSpec, a dict of sections or a YAML path, got {type(spec).__name__}"
    )


def resolve_spec(spec: SpecLike, overrides: list[str] | None = None) -> JobSpec:
    """Validate ``spec`` with ``dotted.key=value`` overrides applied, as the CLI does.

    The same spec given as a YAML path, as its dict or as a ``JobSpec`` gives the same
    ``JobSpec``.

    Raises:
        ConfigError: Listing every key at fault.
    """
    data, source = spec_source(spec)
    return validate_spec(apply_overrides(data, overrides or []), source=source)


def iter_rows(rows: Any) -> Iterator[Mapping[str, Any]]:
    """The rows of a list of dicts, a ``datasets.Dataset`` or a Ray Dataset.

    Raises:
        DataError: ``rows`` is a single mapping (such as a ``DatasetDict``) or not iterable.
    """
    from rayft.trainers.data import DataError

    if callable(getattr(rows, "iter_rows", None)):  # a Ray Dataset
        return iter(rows.iter_rows())
    if isinstance(rows, Mapping) or not isinstance(rows, Iterable):
        raise DataError(
            f"data: give a list of row dicts, a datasets.Dataset or a Ray Dataset, got "
            f"{type(rows).__name__} (for a DatasetDict pass one split, e.g. dataset['train'])"
        )
    return iter(rows)


def _json_value(value: Any) -> Any:
    # numpy arrays and scalars (Ray Data and datasets rows) become lists and numbers.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_rows(rows: Any, path: Path) -> int:
    """Write training rows as a JSONL file, one row per line; returns the row count.

    Args:
        rows: A list of row dicts, a ``datasets.Dataset`` or a Ray Dataset; every row is
            a mapping in one of the formats ``data.format`` reads.
        path: The file to write (its directory is created).

    Raises:
        DataError: A row is not a mapping or not JSON-serialisable (its index is named),
            or there are no rows.
    """
    from rayft.trainers.data import DataError

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    count = 0
    with open(partial, "w", encoding="utf-8") as handle:
        for count, row in enumerate(iter_rows(rows), start=1):
            if not isinstance(row, Mapping):
                raise DataError(f"data: row {count - 1} is a {type(row).__name__}, not a dict")
            try:
                line = json.dumps(dict(row), ensure_ascii=False, default=_json_value)
            except (TypeError, ValueError) as err:
                raise DataError(f"data: row {count - 1} cannot be written as JSON: {err}") from None
            handle.write(line + "\n")
    if count == 0:
        partial.unlink()
        raise DataError("data: no rows given; give at least one")
    partial.replace(path)
    return count


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _place_rows(data: dict[str, Any], rows: Any, eval_rows: Any) -> dict[str, Any]:
    """``data`` with ``data.train``/``data.eval`` set to given paths or the row placeholder."""
    section = dict(data.get("data") or {})
    for key, given in (("train", rows), ("eval", eval_rows)):
        if given is not None:
            section[key] = os.fspath(given) if _is_path(given) else PENDING_ROWS
    return {**data, "data": section}


def _materialise(
    spec: JobSpec, root: StorageRoot, run_id: str, rows: Any, eval_rows: Any
) -> JobSpec:
    """Write rows given in Python under ``runs/<run_id>/data/`` of ``root`` (the spec's
    storage) and point the spec there.

    Under a URI root the files are uploaded too, so every node reads them from the URI.
    """
    data = spec.to_dict()
    for key, given in (("train", rows), ("eval", eval_rows)):
        if given is None or _is_path(given):
            continue
        relpath = f"runs/{run_id}/data/{key}.jsonl"
        write_rows(given, root.path(relpath))
        root.mirror(relpath)
        data["data"][key] = root.url(relpath)
    return validate_spec(data)


# --------------------------------------------------------------------------- train


def _train_spec(
    spec: SpecLike | None,
    overrides: list[str] | None,
    resume: str | None,
    storage: str | None,
    rows: tuple[Any, Any],
) -> JobSpec:
    """The spec of a new run (``spec`` plus overrides) or of the run to resume."""
    from rayft.trainers.driver import load_run_spec

    if resume:
        if spec is not None:
            raise UserError("give either a spec or resume=RUN_ID, not both")
        if rows != (None, None):
            raise UserError("a resumed run trains on the data it started with; leave out data=")
        stored = load_run_spec(resume, StorageRoot.resolve(storage))
        return validate_spec(apply_overrides(stored.to_dict(), overrides or []))
    if spec is None:
        raise UserError("train needs a spec (a YAML path, a dict or a JobSpec) or resume=RUN_ID")
    data, source = spec_source(spec)
    data = apply_overrides(data, overrides or [])
    if storage:
        data["storage"] = storage
    return validate_spec(_place_rows(data, *rows), source=source)


def train(
    spec: SpecLike | None = None,
    *,
    overrides: list[str] | None = None,
    data: RowsLike | None = None,
    eval_data: RowsLike | None = None,
    address: str | None = None,
    run_id: str | None = None,
    resume: str | None = None,
    storage: str | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Fine-tune a model on Ray Train and publish the result, as ``rayft train`` does.

    Everything is checked before Ray starts: the spec (with ``overrides``), every data
    file and row, and ``model.adapter``. Then the run trains on the connected cluster,
    writes its record and checkpoints under ``runs/<run_id>/`` and publishes its adapter
    (or model) under ``output.name``.

    Rows given in Python (``data``/``eval_data``) are written once as JSONL files under
    the run's storage, ``runs/<run_id>/data/train.jsonl`` and ``eval.jsonl`` (uploaded
    under a URI root), and ``data.train``/``data.eval`` point there: every worker and
    every resume reads the same file, and the run's fingerprint covers it. For data too
    large to hold in memory, give file paths instead.

    Args:
        spec: A YAML path, a dict of sections or a ``JobSpec``; ``None`` with ``resume``.
        overrides: ``dotted.key=value`` strings, as on the command line.
        data: Training rows (a list of dicts, a ``datasets.Dataset`` or a Ray Dataset)
            or a file path; replaces ``data.train``.
        eval_data: Evaluation rows or a file path; replaces ``data.eval``.
        address: A Ray address; ``None`` uses ``RAY_ADDRESS`` or starts an embedded cluster.
        run_id: The new run's id (default: ``<output.name>-<time>-<hex>``).
        resume: Continue this run from its newest checkpoint, with its own spec (plus
            ``overrides``).
        storage: The rayft root: where ``resume`` finds the run; for a new run it
            replaces ``storage:`` of the spec.
        show_progress: Print the progress bar and a line per logging step (stderr).

    Returns:
        The run id, the published artifact with its manifest, and the final metrics
        and evaluations.

    Raises:
        ConfigError: The spec is invalid (every key at fault is named).
        DataError: A data file or row cannot be used (file and line named).
        RegistryError: ``model.adapter`` or ``output.name`` cannot be used.
        ModelError: The base model cannot be found or loaded.
        UserError: Arguments that do not go together, or an address nothing answers at.
        TrainingFailed: The run failed while running; ``err.run_id`` resumes it.
    """
    from rayft.cluster.connect import connected
    from rayft.trainers.driver import new_run_id
    from rayft.trainers.runs import start_run

    job = _train_spec(spec, overrides, resume, storage, (data, eval_data))
    root = StorageRoot.resolve(job.storage)
    if resume:
        if run_id and run_id != resume:
            raise UserError(f"run_id={run_id!r} and resume={resume!r}: a resumed run keeps its id")
        run_id = resume
    run_id = run_id or new_run_id(job.output.name or job.method)
    if not all(given is None or _is_path(given) for given in (data, eval_data)):
        job = _materialise(job, root, run_id, data, eval_data)
    scanned = check_before_ray(job, root)
    with connected(address):
        try:
            # Driven here: the console shows the progress and Ctrl-C interrupts the run.
            outcome = start_run(
                job,
                run_id,
                resume=bool(resume),
                scanned=scanned,
                show_progress=show_progress,
            ).result()
        except Exception as err:
            if is_bad_input(err):
                raise
            raise TrainingFailed(
                run_id,
                f"run {run_id} failed: {root_cause(err)}; resume it from its last checkpoint "
                f"with rayft.train(resume={run_id!r}) or rayft train --resume {run_id}",
            ) from err
    artifact = Artifact.at(outcome.artifact, root) if outcome.artifact else None
    return TrainResult(
        run_id=outcome.run_id,
        artifact=artifact,
        metrics=dict(outcome.metrics),
        evals=outcome.evals(),
        history=list(outcome.history),
        checkpoint=outcome.checkpoint_path,
    )


SCANNED_KEYS = ("data.", "model.", "scaling.", "objective", "method", "optim.seed", "grpo.")
"""Keys whose value the data scan depends on (the row tokenizer, the packing groups, the
workers each need a row); a sweep that varies one leaves the scan to its trials."""


def check_before_ray(job: JobSpec, root: StorageRoot, varied: Iterable[str] = ()) -> Any:
    """What ``rayft train`` and ``rayft tune`` check in seconds, before Ray starts.

    Every data file is scanned (a bad row names its file and line; rows that cannot
    train are refused), ``model.adapter`` is resolved and every judge of the objective's
    grader loads. A sweep passes the keys its search space varies: when the scan
    depends on one of them, each trial scans its own spec instead.

    Returns:
        The scan (``trainers.data.SourceScan``) for the run to reuse, or ``None``.

    Raises:
        DataError, RegistryError, ModelError: What cannot be used, named.
    """
    from rayft.trainers.data import scan_sources
    from rayft.trainers.lineage import resolve_parent
    from rayft.trainers.objectives import objective_class
    from rayft.trainers.rollout import check_judges

    scanned = None
    if not any(key.startswith(SCANNED_KEYS) for key in varied):
        scanned = scan_sources(job, root=root)
    resolve_parent(job, root)
    check_judges(objective_class(job).judges(job), root)
    return scanned


# --------------------------------------------------------------------------- tune


def _sweep_spec(
    spec: SpecLike | None, overrides: list[str] | None, resume: str | None, storage: str | None
) -> JobSpec:
    from rayft.raytune.sweep import load_sweep_spec

    if not resume:
        if spec is None:
            raise UserError("tune needs a spec with a tune: section, or resume=SWEEP_ID")
        return resolve_spec(spec, overrides)
    if spec is not None:
        raise UserError("give either a spec or resume=SWEEP_ID, not both")
    stored = load_sweep_spec(resume, StorageRoot.resolve(storage))
    return validate_spec(apply_overrides(stored.to_dict(), overrides)) if overrides else stored


def tune(
    spec: SpecLike | None = None,
    *,
    overrides: list[str] | None = None,
    address: str | None = None,
    sweep_id: str | None = None,
    resume: str | None = None,
    storage: str | None = None,
    show_progress: bool = True,
) -> SweepResult:
    """Run a hyperparameter sweep (Ray Tune) over a job spec, as ``rayft tune`` does.

    Every trial is a rayft training run of ``spec`` with its ``tune.search_space`` values
    set; the best trial's artifact is published under ``output.name``.

    Args:
        spec: A job spec with a ``tune:`` section (YAML path, dict or ``JobSpec``).
        overrides: ``dotted.key=value`` strings, e.g. ``tune.num_samples=4``.
        address: A Ray address; ``None`` uses ``RAY_ADDRESS`` or an embedded cluster.
        sweep_id: The new sweep's id (default: generated).
        resume: Continue this interrupted sweep; finished trials are kept.
        storage: The rayft root where ``resume`` finds the sweep.
        show_progress: Print the live trial table.

    Returns:
        The trials table, the best trial and its published artifact.

    Raises:
        ConfigError: The spec or its search space is invalid (before Ray starts).
        DataError: A data file or row cannot be used (before Ray starts, unless the
            search space varies a key the scan depends on: ``SCANNED_KEYS``).
        RegistryError: ``model.adapter`` cannot be used (before Ray starts).
        ModelError: A judge of ``grpo.grader`` cannot load (before Ray starts).
        UserError: Arguments that do not go together.
        SweepInterrupted: The sweep stopped with trials unfinished; resume it.
    """
    from rayft.cluster.connect import connected
    from rayft.raytune.search_space import flatten_space
    from rayft.raytune.sweep import run_sweep, validate_sweep

    if resume and sweep_id and sweep_id != resume:
        raise UserError("give either sweep_id or resume=SWEEP_ID, not both")
    job = _sweep_spec(spec, overrides, resume, storage)
    validate_sweep(job)
    varied = flatten_space(job.tune.search_space)
    check_before_ray(job, StorageRoot.resolve(job.storage), varied)
    with connected(address):
        outcome = run_sweep(
            job, sweep_id=resume or sweep_id, resume=bool(resume), show_progress=show_progress
        )
    best = (
        Artifact.at(outcome.artifact, StorageRoot.resolve(job.storage))
        if outcome.artifact
        else None
    )
    return SweepResult(**vars(outcome), best_artifact=best)


# --------------------------------------------------------------------------- submit


@dataclass(frozen=True)
class RunHandle:
    """A job submitted to a Ray cluster's Jobs API (:func:`submit`).

    Attributes:
        job_id: The Ray job's submission id.
        run_id: The run (or sweep) id in the job's storage.
        kind: ``train`` or ``tune``.
        address: The Jobs API address, ``http://HEAD:8265``.
        storage: The job's storage root.
        token_file: The file holding the cluster's token, if one was named.
        upload_bytes: What the submission uploaded (code, spec and data).
    """

    job_id: str
    run_id: str
    kind: str
    address: str
    storage: str
    token_file: str | None = None
    upload_bytes: int = 0

    def _client(self) -> Any:
        from rayft.cluster.submit import jobs_client

        return jobs_client(self.address, self.token_file)

    def status(self) -> JobView:
        """Where the job stands: Ray's status and the run's step, metrics and artifact."""
        from rayft.cluster.jobs import job_status

        with self._client() as client:
            return job_status(client, self.job_id)

    def events(self) -> list[dict[str, Any]]:
        """The run's events so far (read from its storage when this machine can)."""
        from rayft.cluster.jobs import read_run

        return list(read_run(StorageRoot.resolve(self.storage), self.run_id).get("events") or [])

    def logs(self) -> str:
        """The job's log so far."""
        with self._client() as client:
            return client.get_job_logs(self.job_id)

    def follow(self, out: TextIO | None = None) -> str:
        """Stream the job's log to ``out`` (stdout) until it ends; returns Ray's final status."""
        from rayft.cluster.jobs import follow_logs

        with self._client() as client:
            return follow_logs(client, self.job_id, out or sys.stdout)

    def cancel(self, wait_s: float = 60.0) -> str:
        """Stop the job (its checkpoints stay for a resume); returns its final status."""
        from rayft.cluster.jobs import stop_job

        with self._client() as client:
            return stop_job(client, self.job_id, wait_s=wait_s)

    def wait(self, timeout: float | None = None, poll_s: float = 2.0) -> JobView:
        """Block until the job ends; returns its final :meth:`status`.

        Raises:
            TimeoutError: The job was still running after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._client() as client:
                if client.get_job_status(self.job_id).is_terminal():
                    break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.job_id} still runs after {timeout:.0f} s")
            time.sleep(poll_s)
        return self.status()


def submit(
    spec: SpecLike,
    *,
    address: str | None = None,
    overrides: list[str] | None = None,
    token_file: str | None = None,
    storage: str | None = None,
    kind: str = "auto",
    code: str = "ship",
    resume: str | None = None,
    env: Mapping[str, str] | None = None,
    max_upload_mb: float | None = None,
    python: str = "python",
) -> RunHandle:
    """Submit a train or tune job to a Ray cluster through its Jobs API (``rayft submit``).

    The spec, its local data files and (with ``code="ship"``) rayft's code travel with
    the job; it runs ``rayft train|tune`` on the head node, keeping runs and artifacts in
    ``storage``, which every node must reach.

    Args:
        spec: A YAML path, a dict of sections or a ``JobSpec``.
        address: The Jobs API, ``http://HEAD:8265``; ``None`` reads ``RAY_ADDRESS``.
        overrides: ``dotted.key=value`` strings.
        token_file: The file holding the cluster's auth token (default: Ray's own lookup).
        storage: A shared directory or ``s3://``/``gs://`` URI; replaces ``storage:``.
        kind: ``train``, ``tune`` or ``auto`` (``tune`` when the spec has a ``tune:`` section).
        code: ``ship`` rayft's code with the job, or use the ``installed`` one.
        resume: Continue this run from its newest checkpoint.
        env: Environment variables for the job.
        max_upload_mb: Limit for local data files shipped with the job.
        python: The Python executable that runs the job on the cluster.

    Returns:
        A handle: ``status()``, ``events()``, ``logs()``, ``cancel()``, ``wait()``.

    Raises:
        SubmitError: No address, a missing token, data too large, or a cluster that
            refuses the job (a :class:`UserError`).
        ConfigError: The spec is invalid.
        ClusterError: The cluster has no job agent ready.
    """
    import shutil

    from rayft.cluster.submit import (
        DEFAULT_MAX_UPLOAD_MB,
        build_package,
        jobs_address,
        jobs_client,
        submit_package,
    )

    url = jobs_address(address)  # no address: fail before staging anything
    job = resolve_spec(spec, overrides)
    package = build_package(
        job,
        storage=storage,
        kind=kind,
        code=code,
        resume=resume,
        env=dict(env or {}),
        max_upload_mb=DEFAULT_MAX_UPLOAD_MB if max_upload_mb is None else max_upload_mb,
        python=python,
    )
    try:
        with jobs_client(url, token_file) as client:
            job_id = submit_package(client, package)
    finally:  # the submission uploaded the working directory
        shutil.rmtree(package.workdir, ignore_errors=True)
    return RunHandle(
        job_id=job_id,
        run_id=package.run_id,
        kind=package.kind,
        address=url,
        storage=package.metadata["rayft_storage"],
        token_file=token_file,
        upload_bytes=package.upload_bytes,
    )


# --------------------------------------------------------------------------- serve

_serving: dict[str, Any] = {}
"""``ray_started``: :func:`serve` started the embedded Ray cluster it runs on."""


def _serve_config(model: str | ServeArgs, serve_args: dict[str, Any]) -> ServeArgs:
    from rayft.serving.app import ServeArgs, parse_args

    if isinstance(model, ServeArgs):
        if serve_args:
            return parse_args({**model.model_dump(), **serve_args})
        return model
    return parse_args({"model": model, **serve_args})


def _check_serve_target(host: str, insecure: bool, address: str | None, embedded: bool) -> None:
    """The checks :func:`serve` makes before Ray starts."""
    from rayft.serving.client import InsecureServing, check_exposure

    try:
        check_exposure(host, insecure)
    except InsecureServing as err:
        raise UserError(str(err)) from None
    if embedded and (address or os.environ.get("RAY_ADDRESS")):
        raise UserError(
            "--metrics-port and --dashboard set up the embedded cluster; a cluster at "
            "--address keeps the ports it was started with (ray start --metrics-export-port "
            "P --include-dashboard true)"
        )


def serve(
    model: str | ServeArgs = "smollm2-135m-instruct",
    *,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    blocking: bool = False,
    insecure: bool = False,
    metrics_port: int | None = None,
    dashboard_port: int | None = None,
    show_progress: bool = True,
    **serve_args: Any,
) -> str:
    """Serve a base model and its published adapters behind the OpenAI-compatible API.

    This is the whole service ``rayft serve`` runs: inference on the base model and every
    adapter, evaluations, and the fine-tuning jobs API.

    Args:
        model: The base model (builtin id, published model, HF directory or hub id), or
            a whole ``ServeArgs``.
        address: A Ray address; ``None`` uses ``RAY_ADDRESS`` or starts an embedded
            cluster, which :func:`stop_serving` shuts down again.
        host: The HTTP interface; beyond loopback only with ``RAYFT_API_KEY`` or ``insecure``.
        port: The HTTP port (default: a free one).
        blocking: Serve until interrupted (Ctrl-C), then shut down.
        insecure: Serve beyond loopback without an API key.
        metrics_port: The embedded cluster's Prometheus port (default: a free one).
        dashboard_port: Start the embedded cluster's Ray dashboard on this port.
        show_progress: Print a line when the application starts (stderr).
        **serve_args: ``ServeArgs`` fields: ``storage``, ``max_loaded_adapters``,
            ``dtype``, ``num_replicas``, ``request_log``, ...

    Returns:
        The base URL, e.g. ``http://127.0.0.1:8000``; the API is under ``/v1``.

    Raises:
        ConfigError: A ``ServeArgs`` field is invalid.
        UserError: An exposed host without a key, or embedded-only ports with an address.
    """
    import ray

    from rayft.cluster.connect import connect
    from rayft.cluster.service_app import ROUTERS
    from rayft.serving.client import run_app

    cfg = _serve_config(model, serve_args)
    embedded_only = metrics_port is not None or dashboard_port is not None
    _check_serve_target(host, insecure, address, embedded_only)
    _check_engine(cfg)
    started = not ray.is_initialized()
    kind = connect(address, metrics_export_port=metrics_port, dashboard_port=dashboard_port)
    _serving["ray_started"] = started
    _serving["app"] = {"args": cfg.model_dump(mode="json"), "host": host, "insecure": insecure}
    try:
        if show_progress:
            print(
                f"[rayft] starting {cfg.model} on {kind} Ray cluster ...",
                file=sys.stderr,
                flush=True,
            )
        url = run_app(
            cfg.model_dump(mode="json"), host=host, port=port, insecure=insecure, routers=ROUTERS
        )
    except BaseException:
        stop_serving()
        raise
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            stop_serving(drain=True)
    return url


def _check_engine(cfg: Any) -> None:
    """``engine: vllm`` where no environment has vLLM fails here, before Ray starts."""
    if cfg.engine != "vllm":
        return
    from rayft.serving.vllm_engine import VllmUnavailable, pick_engine

    try:
        pick_engine(cfg.engine, cfg.vllm_python)
    except VllmUnavailable as err:
        raise UserError(str(err)) from None


def stop_serving(drain: bool = False) -> None:
    """Take the served application down, and the Ray cluster :func:`serve` started.

    Args:
        drain: First stop admitting requests (new ones are answered 503 with
            ``Retry-After``) and let those in flight finish, for at most the app's
            ``grace_period_s``. Fine-tuning jobs keep running in their detached actors
            (on a cluster at an address; an embedded cluster ends with this process).
    """
    import ray
    from ray import serve as ray_serve

    from rayft.cluster.service_app import ROUTERS
    from rayft.serving.client import drain_app

    app = _serving.pop("app", None)
    if ray.is_initialized():
        if drain and app is not None:
            drain_app(app["args"], app["host"], insecure=app["insecure"], routers=ROUTERS)
        ray_serve.shutdown()
        if _serving.pop("ray_started", False):
            ray.shutdown()


# --------------------------------------------------------------------------- load


def load_adapter(
    name: str,
    *,
    storage: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
) -> Any:
    """A published adapter on its base model, ready for inference (``peft.PeftModel``).

    The base model is the one the adapter's ``rayft.json`` names; its weights must be
    the ones the adapter was trained on. A ``task: classification`` adapter loads on a
    sequence-classification head with its labels.

    Args:
        name: The adapter's registry name (``TrainResult.artifact.name``).
        storage: The rayft root (default: ``$RAYFT_HOME``); a URI root is synced first.
        dtype: ``auto`` (bfloat16 on GPUs with it, float32 on CPUs), ``float32``,
            ``bfloat16`` or ``float16``.
        device: Move the model there (default: stay on the CPU).

    Returns:
        The ``peft.PeftModel`` in eval mode.

    Raises:
        RegistryError: No adapter of that name, or its base's weights changed since.
        ModelError: The base model cannot be found.
    """
    import torch
    from peft import PeftModel

    from rayft.trainers.models import resolve_model
    from rayft.trainers.precision import resolve_dtype
    from rayft.trainers.registry import published_manifest, resolve_adapter

    root = StorageRoot.resolve(storage)
    path = resolve_adapter(name, root)
    manifest = published_manifest(path) or ArtifactManifest(kind="adapter", name=name)
    base_dir = resolve_model(manifest.base_model or _base_from_config(path), root.models, root)
    _check_base_weights(name, manifest, base_dir, root)
    torch_dtype = getattr(torch, resolve_dtype(dtype, device is not None and "cuda" in device))
    base = _load_base(base_dir, manifest, torch_dtype)
    model = PeftModel.from_pretrained(base, str(path)).eval()
    return model.to(device) if device else model


def _base_from_config(adapter_dir: Path) -> str:
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def _check_base_weights(
    name: str, manifest: ArtifactManifest, base_dir: Path, root: StorageRoot
) -> None:
    from rayft.trainers.manifest import RegistryError
    from rayft.trainers.servable import base_fingerprint

    recorded = manifest.base_fingerprint
    if recorded:
        now = base_fingerprint(base_dir, root.models)
        if now != recorded:
            raise RegistryError(
                f"adapter {name!r} was trained on base weights {recorded[:12]}, but "
                f"{base_dir} now holds {now[:12]}: the base changed since; train the adapter "
                "again on this base"
            )


def _load_base(base_dir: Path, manifest: ArtifactManifest, dtype: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not manifest.is_classifier:
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    from rayft.trainers.classification import load_classifier

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return load_classifier(str(base_dir), list(manifest.labels or []), pad, dtype)
