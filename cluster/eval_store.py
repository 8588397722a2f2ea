"""Evals, their runs and output items, kept in the rayft root.

    evals/<eval_id>.json                          the eval (``EvalRecord``)
    evals/<eval_id>/runs/<run_id>.json            a run (``RunRecord``)
    evals/<eval_id>/runs/<run_id>.items.jsonl     its output items, written when it ends

Every record is written whole and atomically (``StorageRoot.write``, uploaded to a URI
root, the source of truth), read and written through this module's two typed records
only. A key sees only its project's evals (``Principal.owns``): another project's id
answers 404 as an unknown one does.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import threading
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rayft.cluster.files_service import list_names, read_json
from rayft.serving.auth import DEFAULT_PROJECT, Principal
from rayft.serving.errors import NotFound
from rayft.trainers.storage import EVALS_DIR, StorageRoot, eval_relpath

RunStatus = Literal["queued", "in_progress", "completed", "failed", "canceled"]
ACTIVE: tuple[str, ...] = ("queued", "in_progress")
_EVAL_ID = re.compile(r"^eval_[0-9a-f]{24}$")
_RUN_ID = re.compile(r"^evalrun_[0-9a-f]{24}$")
_WRITES = threading.Lock()  # a run's worker and a cancel in this replica write in turn


def new_id(prefix: str) -> str:
    """A fresh id in OpenAI's shape: ``eval_…``, ``evalrun_…``, ``outputitem_…``."""
    return f"{prefix}_{secrets.token_hex(12)}"


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EvalRecord(_Record):
    """One eval: what ``GET /v1/evals/{id}`` shows, and whose it is."""

    id: str
    created_at: int
    updated_at: int
    name: str
    metadata: dict[str, str] | None = None
    data_source_config: dict[str, Any]
    testing_criteria: list[dict[str, Any]]
    project: str = DEFAULT_PROJECT
    key_id: str | None = None

    def eval_object(self) -> dict[str, Any]:
        """OpenAI's ``eval`` object."""
        return {
            "object": "eval",
            "id": self.id,
            "created_at": self.created_at,
            "name": self.name,
            "metadata": self.metadata,
            "data_source_config": self.data_source_config,
            "testing_criteria": self.testing_criteria,
        }


class RunRecord(_Record):
    """One eval run, its progress and results, and the replica computing it."""

    id: str
    eval_id: str
    created_at: int
    name: str
    model: str | None = None
    metadata: dict[str, str] | None = None
    data_source: dict[str, Any]
    status: RunStatus = "queued"
    error: dict[str, str] | None = None
    result_counts: dict[str, int] = Field(
        default_factory=lambda: {"total": 0, "passed": 0, "failed": 0, "errored": 0}
    )
    per_testing_criteria_results: list[dict[str, Any]] = Field(default_factory=list)
    per_model_usage: list[dict[str, Any]] = Field(default_factory=list)
    project: str = DEFAULT_PROJECT
    key_id: str | None = None
    replica: str = ""
    """The replica computing the run (``eval_runner.REPLICA``)."""
    heartbeat_at: float = 0.0
    """When that replica last wrote the record (epoch seconds)."""
    deadline_at: float = 0.0
    """When the run must be done (``eval_run_timeout_s`` after it started)."""

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def run_object(self) -> dict[str, Any]:
        """OpenAI's ``eval.run`` object (no report page: ``report_url`` is null)."""
        return {
            "object": "eval.run",
            "id": self.id,
            "eval_id": self.eval_id,
            "created_at": self.created_at,
            "name": self.name,
            "model": self.model,
            "metadata": self.metadata,
            "data_source": self.data_source,
            "status": self.status,
            "error": self.error,
            "result_counts": self.result_counts,
            "per_testing_criteria_results": self.per_testing_criteria_results,
            "per_model_usage": self.per_model_usage,
            "report_url": None,
        }


class EvalStore:
    """The evals of one rayft root, as one principal sees them.

    Args:
        root: The rayft root.
        principal: Who asks; ``None`` sees every project's (the Python API, tests).
    """

    def __init__(self, root: StorageRoot, principal: Principal | None = None) -> None:
        self.root = root
        self.principal = principal
        self.project = principal.project if principal is not None else DEFAULT_PROJECT

    def _visible(self, project: str) -> bool:
        return self.principal is None or self.principal.owns(project)

    # ------------------------------------------------------------------ evals

    def save_eval(self, record: EvalRecord) -> EvalRecord:
        """Write ``record`` whole (a new eval, or an update)."""
        self.root.write(eval_relpath(record.id), record.model_dump_json(indent=2))
        return record

    def get_eval(self, eval_id: str) -> EvalRecord:
        """The eval ``eval_id``.

        Raises:
            NotFound: No such eval (or another project's, answered alike).
        """
        data = read_json(self.root, eval_relpath(eval_id)) if _EVAL_ID.match(eval_id) else None
        record = _parsed(EvalRecord, data)
        if record is None or not self._visible(record.project):
            raise NotFound(
                f"no eval {eval_id!r}; GET /v1/evals lists this project's evals",
                code="eval_not_found",
                param="eval_id",
            )
        return record

    def list_evals(self) -> list[EvalRecord]:
        """Every visible eval, oldest first."""
        found = []
        for name in list_names(self.root, EVALS_DIR, ".json"):
            data = read_json(self.root, eval_relpath(name)) if _EVAL_ID.match(name) else None
            record = _parsed(EvalRecord, data)
            if record is not None and self._visible(record.project):
                found.append(record)
        return sorted(found, key=lambda r: (r.created_at, r.id))

    def delete_eval(self, eval_id: str) -> None:
        """Remove the eval, then its runs and items (the record first: never half listed)."""
        self.get_eval(eval_id)
        for relpath in (eval_relpath(eval_id), eval_relpath(eval_id, "runs")):
            self.root.delete(relpath)
        self.root.path(eval_relpath(eval_id)).unlink(missing_ok=True)
        shutil.rmtree(self.root.path(f"{EVALS_DIR}/{eval_id}"), ignore_errors=True)

    # ------------------------------------------------------------------- runs

    def save_run(
        self,
        record: RunRecord,
        only_active: bool = False,
        items: list[dict[str, Any]] | None = None,
    ) -> RunRecord | None:
        """Write ``record`` whole (``items`` first, when given) and return it.

        With ``only_active`` (a run's worker writing), only over a stored run that is still
        active: a run already ended (a cancel came first) is returned as stored, and a
        deleted one is not written again (``None``). Items are written before the record,
        so a run read as ended has its items.
        """
        relpath = eval_relpath(record.eval_id, "runs", f"{record.id}.json")
        with _WRITES:
            if only_active:
                stored = read_json(self.root, relpath)
                if stored is None:
                    return None
                if stored.get("status") not in ACTIVE:
                    return _parsed(RunRecord, stored) or record
            if items is not None:
                self.write_items(record.eval_id, record.id, items)
            self.root.write(relpath, record.model_dump_json(indent=2))
        return record

    def get_run(self, eval_id: str, run_id: str) -> RunRecord:
        """The run ``run_id`` of the (visible) eval ``eval_id``.

        Raises:
            NotFound: No such eval or run.
        """
        self.get_eval(eval_id)
        relpath = eval_relpath(eval_id, "runs", f"{run_id}.json")
        data = read_json(self.root, relpath) if _RUN_ID.match(run_id) else None
        record = _parsed(RunRecord, data)
        if record is None:
            raise NotFound(
                f"no run {run_id!r} of eval {eval_id!r}; GET /v1/evals/{eval_id}/runs lists them",
                code="eval_run_not_found",
                param="run_id",
            )
        return record

    def list_runs(self, eval_id: str) -> list[RunRecord]:
        """The runs of the (visible) eval ``eval_id``, oldest first."""
        self.get_eval(eval_id)
        found = []
        for name in list_names(self.root, eval_relpath(eval_id, "runs"), ".json"):
            data = read_json(self.root, eval_relpath(eval_id, "runs", f"{name}.json"))
            record = _parsed(RunRecord, data) if _RUN_ID.match(name) else None
            if record is not None:
                found.append(record)
        return sorted(found, key=lambda r: (r.created_at, r.id))

    def delete_run(self, eval_id: str, run_id: str) -> None:
        """Remove the run's record, then its output items."""
        self.get_run(eval_id, run_id)
        for suffix in (".json", ".items.jsonl"):
            relpath = eval_relpath(eval_id, "runs", f"{run_id}{suffix}")
            self.root.delete(relpath)
            self.root.path(relpath).unlink(missing_ok=True)

    # ----------------------------------------------------------- output items

    def write_items(self, eval_id: str, run_id: str, items: list[dict[str, Any]]) -> None:
        """Write a run's output items, one JSON object per line, whole."""
        text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        self.root.write(eval_relpath(eval_id, "runs", f"{run_id}.items.jsonl"), text)

    def read_items(self, eval_id: str, run_id: str) -> list[dict[str, Any]]:
        """A run's output items in data-source order (none before it ends)."""
        self.get_run(eval_id, run_id)
        raw = self.root.read(eval_relpath(eval_id, "runs", f"{run_id}.items.jsonl"))
        if raw is None:
            return []
        return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


def _parsed(model: type[_Record], data: dict[str, Any] | None) -> Any:
    """``data`` as ``model``; ``None`` when absent or not such a record (never a 500)."""
    if data is None:
        return None
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


def now() -> int:
    """The present, in OpenAI's whole epoch seconds."""
    return int(time.time())
