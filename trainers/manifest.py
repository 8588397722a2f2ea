"""``rayft.json``: the manifest every published artifact carries, as one typed model.

An adapter or model directory describes itself (base model and its weights
fingerprint, objective and method, the job spec, the data's sha256, metrics, the
parent adapter, a sweep's note). :class:`ArtifactManifest` is the only reader and
writer of that file: ``ArtifactManifest.read(path)`` / ``.write(dir)``, and
``parse``/``to_json`` for the copy a URI root keeps.

Artifacts published by older rayft versions still load:

* no ``version`` (before versioned publishing; ``published_at`` stamps them),
* ``method: dpo`` (now ``objective: dpo`` with the method that trained the weights),
* no ``objective`` (derived from the spec's ``objective``, else ``task``/``method``),
* no ``kind`` in a hand-made directory (taken from the files next to it),
* fields this version does not know. Unknown fields are kept (``extra="allow"``), not
  dropped, because a manifest is rewritten in place (a sweep notes its trials, the
  best trial's manifest is copied under the sweep's name): what an older or newer rayft
  recorded survives the rewrite instead of being silently lost.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from rayft.trainers.storage import MANIFEST_FILE, atomic_write

MANIFEST = MANIFEST_FILE

ArtifactKind = Literal["adapter", "model", "base_model"]
Objective = Literal["sft", "dpo", "classification", "grpo"]

# Files that say what a directory without a recorded kind holds (older, hand-made ones).
_KIND_FILES = (("adapter_config.json", "adapter"), ("config.json", "model"))


class RegistryError(ValueError):
    """A bad artifact name, a missing artifact or a refused overwrite."""


class ManifestError(RegistryError):
    """A published artifact whose ``rayft.json`` is unreadable (corrupt, half-written, or
    missing a field every manifest has)."""


class _Record(BaseModel):
    # Unknown fields are kept: see the module docstring.
    model_config = ConfigDict(extra="allow")


class ParentRecord(_Record):
    """The adapter a continued run started from, as it was then (``parent_adapter``).

    Its own parent is nested inside, so every artifact carries its whole chain.
    """

    name: str
    version: str | None = None
    dataset_sha256: str | None = None
    published_at: float | None = None
    base_model: str | None = None
    base_fingerprint: str | None = None
    run_id: str | None = None
    metrics: dict[str, Any] = {}
    steps: int | None = None
    method: str | None = None
    parent_adapter: ParentRecord | None = None


class SweepNote(_Record):
    """Which sweep trial an artifact is, and how it scored (``sweep``)."""

    id: str
    trial: int
    trial_id: str | None = None
    run_id: str | None = None
    params: dict[str, Any] = {}
    metric: str | None = None
    mode: str | None = None
    value: float | None = None
    best_trial: int | None = None


class BenchmarkScores(_Record):
    """One lm-eval task's scores (``trainers.benchmarks``).

    Attributes:
        metrics: lm-eval's ``<metric>,<filter>`` keys and values (``acc,none``).
        stderr: The standard error of each, under the same key.
        samples: Documents scored.
        lm_eval_version: The lm-evaluation-harness version that scored them.
    """

    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    samples: int = 0
    lm_eval_version: str | None = None


class BenchmarkReport(_Record):
    """``eval.benchmarks`` before and after a fine-tune (``benchmarks``), per task."""

    before: dict[str, BenchmarkScores] = {}
    after: dict[str, BenchmarkScores] = {}


class ArtifactManifest(_Record):
    """What ``rayft.json`` records about a published adapter, model or cached base model.

    Attributes:
        kind: ``adapter`` (PEFT files), ``model`` (a full/freeze fine-tune in HF
            format) or ``base_model`` (a builtin cached under ``models/``).
        name: Registry name.
        version: The published version (``None`` for artifacts published before versions).
        published_at: When it was published (seconds since the epoch).
        base_model: ``model.name`` it was trained from.
        base_model_path: Where that base was on the publishing machine.
        base_fingerprint: sha256 of the base's weights (``trainers.servable``).
        builtin: For ``base_model``: the builtin it was built from.
        objective: What a step minimised: ``sft``, ``dpo``, ``classification``, ``grpo``.
        method: What trained: ``lora``, ``qlora``, ``full`` or ``freeze``.
        task: ``causal_lm`` or ``classification`` (the older spelling, still written for
            readers that know only it).
        labels: A classifier's labels, in head order.
        parent_adapter: The adapter a continued run started from.
        run_id: The run that trained it.
        spec: The full job spec, as a plain dict.
        dataset_sha256: Fingerprint of the training data.
        datasets: One report per data source.
        metrics: Final metrics.
        steps: Optimizer steps taken.
        stopped_early: Early stopping ended the run.
        history: Progress records (train and eval) of the run.
        general: ``eval.general`` results before and after the fine-tune.
        benchmarks: ``eval.benchmarks`` (lm-eval tasks) scores before and after it.
        sweep: For a sweep's artifacts: the trial it is and how it scored.
        project: The project whose fine-tuning job published it: it serves that
            project's keys only. ``None`` (published from the CLI or Python): shared.
    """

    kind: ArtifactKind
    name: str | None = None
    version: str | None = None
    published_at: float | None = None
    base_model: str | None = None
    base_model_path: str | None = None
    base_fingerprint: str | None = None
    builtin: str | None = None
    objective: Objective | None = None
    method: str | None = None
    task: str | None = None
    labels: list[str] | None = None
    parent_adapter: ParentRecord | None = None
    run_id: str | None = None
    spec: dict[str, Any] | None = None
    dataset_sha256: str | None = None
    datasets: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    steps: int | None = None
    stopped_early: bool | None = None
    history: list[dict[str, Any]] = []
    general: dict[str, Any] | None = None
    benchmarks: BenchmarkReport | None = None
    sweep: SweepNote | None = None
    project: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _older_spellings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        spec = data.get("spec") if isinstance(data.get("spec"), dict) else {}
        if data.get("method") == "dpo":
            # ``method: dpo`` named the objective; the weights it trained are ``dpo.weights``.
            data.setdefault("objective", "dpo")
            data["method"] = (spec.get("dpo") or {}).get("weights") or "lora"
        if data.get("objective") is None:
            data["objective"] = derived_objective(spec, data)
        return data

    # ----------------------------------------------------------------- reading

    @classmethod
    def read(cls, path: str | Path) -> ArtifactManifest:
        """The manifest at ``path``: a ``rayft.json`` file or the artifact directory holding one.

        Raises:
            ManifestError: The file is missing, not a JSON object, or lacks a field
                every manifest has; the message names the file.
        """
        file = _manifest_file(path)
        if not file.is_file():
            raise ManifestError(f"{file} is missing; publish the artifact again")
        return cls.parse(file.read_bytes(), str(file), directory=file.parent)

    @classmethod
    def find(cls, path: str | Path) -> ArtifactManifest | None:
        """Like :meth:`read`, but ``None`` when there is no ``rayft.json`` at ``path``."""
        file = _manifest_file(path)
        return cls.read(file) if file.is_file() else None

    @classmethod
    def parse(cls, raw: bytes | str, where: str, directory: Path | None = None) -> ArtifactManifest:
        """A manifest from the bytes of a ``rayft.json`` (e.g. a URI root's pointer).

        Args:
            raw: The file's bytes.
            where: The file's path or URL, for error messages.
            directory: The artifact's files, to tell the kind of a manifest that
                records none (made by hand or by a very old rayft).

        Raises:
            ManifestError: The bytes are not a JSON object or lack a required field.
        """
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ManifestError(
                f"{where} is corrupt ({err}); publish the artifact again or remove it"
            ) from None
        if not isinstance(data, dict):
            raise ManifestError(f"{where} is not a JSON object; publish the artifact again")
        if "kind" not in data and directory is not None:
            kind = next((k for f, k in _KIND_FILES if (directory / f).is_file()), None)
            if kind is not None:
                data["kind"] = kind
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ManifestError(
                f"{where} is not a valid rayft manifest: {_problems(err)}"
            ) from None

    # ----------------------------------------------------------------- writing

    def to_json(self) -> str:
        """The text of ``rayft.json``: fields that are ``None`` are left out, except
        ``parent_adapter``, which readers of every rayft version find as ``null`` when a
        run started from the base model."""
        fields = self.model_dump(exclude_none=True)
        fields.setdefault("parent_adapter", None)
        return json.dumps(fields, indent=2, default=str)

    def write(self, directory: str | Path) -> Path:
        """Write ``rayft.json`` into ``directory`` atomically; returns the file's path."""
        return atomic_write(Path(directory) / MANIFEST, self.to_json())

    # ----------------------------------------------------------------- views

    @property
    def stamp(self) -> str | float | None:
        """What identifies this publication: the version, else (older ones) the time."""
        return self.version or self.published_at

    @property
    def is_classifier(self) -> bool | None:
        """True/False when the manifest says what the artifact is for, else ``None``."""
        if self.objective is None and self.task is None:
            return None
        return self.objective == "classification" or self.task == "classification"


def derived_objective(spec: dict[str, Any], fields: dict[str, Any]) -> str | None:
    """The objective of an artifact whose manifest records none.

    The spec's ``objective`` when it has one, else the older spellings: ``task:
    classification``, ``method: dpo``; ``sft`` for any other trained artifact. ``None``
    when nothing says how it was trained (a base model, a hand-made directory).
    """
    if isinstance(spec.get("objective"), str):
        return spec["objective"]
    task = fields.get("task", spec.get("task"))
    method = fields.get("method", spec.get("method"))
    if task == "classification":
        return "classification"
    if method == "dpo" or spec.get("method") == "dpo":
        return "dpo"
    if method is not None or task is not None or spec:
        return "sft"
    return None


def _manifest_file(path: str | Path) -> Path:
    path = Path(path)
    return path if path.name == MANIFEST else path / MANIFEST


def _problems(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg'].lower()}"
        for e in err.errors()
    )
