"""A run's records in its directory ``runs/<run_id>/``: machine-readable, one writer.

* ``rayft_run.json``: the run's record (state, model, dataset fingerprint, final
  metrics, artifact; the driver's host, pid and heartbeat while it runs), rewritten
  atomically on every change.
* ``events.jsonl``: one JSON object per line, each with ``time`` and ``type``:
  ``state``, ``train`` and ``eval`` (metrics at a step), ``checkpoint``, ``resumed``,
  ``paused``, ``artifact``, ``error``. Appended by the driver; ``rayft jobs status/logs`` and the
  sweep table read it.

Both live in the run's local directory and, under a URI root, are mirrored there.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from rayft.trainers.storage import StorageRoot, run_relpath

RUN_FILE = "rayft_run.json"
EVENTS_FILE = "events.jsonl"
SPEC_FILE = "spec.yaml"
# Ray Train's own record of the checkpoints it registered (complete ones only).
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
TRAINER_STATE = "trainer_state.json"
# Event types whose line is uploaded at once under a URI root; step events are batched.
URGENT_EVENTS = ("state", "checkpoint", "artifact", "error", "resumed", "paused")
UPLOAD_EVERY_S = 5.0
# A running record whose heartbeat is older than this is a dead driver's.
HEARTBEAT_S = 10.0
STALE_AFTER_S = 6 * HEARTBEAT_S

RUNNING = "running"
FINISHED = "finished"
FAILED = "failed"
INTERRUPTED = "interrupted"
PAUSED = "paused"
PAUSE_FILE = "pause_requested"
"""Per run: present while a pause is asked of it (``request_pause``); the loop's
``PauseOnRequest`` checkpoints and ends the run at its next optimizer step."""


class RunLog:
    """The writer of one run's record and events (the run's driver holds the only one)."""

    def __init__(self, root: StorageRoot, run_id: str) -> None:
        self.root = root
        self.run_id = run_id
        self.record: dict[str, Any] = {}
        self._last_upload = 0.0
        self._pending = False
        root.run(run_id).mkdir(parents=True, exist_ok=True)
        if root.is_remote:
            # A resumed run appends to the events it wrote before, wherever that was.
            remote = root.read(self._rel(EVENTS_FILE))
            if remote is not None:
                root.path(self._rel(EVENTS_FILE)).write_bytes(remote)

    def _rel(self, name: str) -> str:
        return run_relpath(self.run_id, name)

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` into the record and write it (locally, then to a URI root)."""
        self.record.update(fields)
        self.root.write(self._rel(RUN_FILE), json.dumps(self.record, indent=2, default=str))

    def event(self, type_: str, **fields: Any) -> None:
        """Append one event line; under a URI root it is uploaded now or with the next one."""
        line = json.dumps({"time": time.time(), "type": type_, **fields}, default=str)
        with open(self.root.path(self._rel(EVENTS_FILE)), "a") as handle:
            handle.write(line + "\n")
        self._pending = True
        if type_ in URGENT_EVENTS or time.time() - self._last_upload >= UPLOAD_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Upload the events file to a URI root when lines were added since the last upload."""
        if self._pending and self.root.is_remote:
            self.root.mirror(self._rel(EVENTS_FILE))
            self._last_upload = time.time()
        self._pending = False

    def state(self, state: str, **fields: Any) -> None:
        """Record a state change in the record and as an event."""
        self.update(state=state, **fields)
        self.event("state", state=state, **{k: v for k, v in fields.items() if _small(v)})

    def start(self, **fields: Any) -> None:
        """The run is running on this process: its host, pid and first heartbeat."""
        self.state(RUNNING, host=socket.gethostname(), pid=os.getpid(), **fields)
        self.heartbeat()

    def heartbeat(self) -> None:
        """Say the driver is alive (readers call a running record without one interrupted)."""
        self.update(heartbeat_at=time.time())

    def progress(self, record: dict[str, Any]) -> None:
        """One progress record from rank 0 (``kind`` train or eval) as an event."""
        fields = {k: v for k, v in record.items() if k != "kind"}
        self.event(record.get("kind", "train"), **fields)


def _small(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


# ----------------------------------------------------------------- readers


def read_events(root: StorageRoot, run_id: str) -> list[dict[str, Any]]:
    """Every complete event line of a run (a torn last line is skipped)."""
    raw = root.read(run_relpath(run_id, EVENTS_FILE))
    return parse_events(raw.decode(errors="replace") if raw else "")


def parse_events(text: str) -> list[dict[str, Any]]:
    """The events in the text of an ``events.jsonl`` (lines that do not parse are skipped)."""
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and "type" in event:
            events.append(event)
    return events


def read_record(root: StorageRoot, run_id: str) -> dict[str, Any]:
    """The run's ``rayft_run.json`` (``{}`` when absent or unreadable)."""
    raw = root.read(run_relpath(run_id, RUN_FILE))
    try:
        record = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _read_json(root: StorageRoot, relpath: str) -> dict[str, Any]:
    try:
        raw = root.read(relpath)
        data = json.loads(raw) if raw else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def request_pause(root: StorageRoot, run_id: str) -> None:
    """Ask the run to checkpoint and end at its next optimizer step (``PAUSE_FILE``)."""
    root.write(run_relpath(run_id, PAUSE_FILE), json.dumps({"requested_at": time.time()}))


def pause_pending(root: StorageRoot, run_id: str) -> bool:
    """Whether a pause is asked of the run and not yet cleared."""
    return root.read(run_relpath(run_id, PAUSE_FILE)) is not None


def clear_pause(root: StorageRoot, run_id: str) -> None:
    """Withdraw a pause request (a resumed run goes on to its end)."""
    relpath = run_relpath(run_id, PAUSE_FILE)
    root.path(relpath).unlink(missing_ok=True)
    root.delete(relpath)


def newest_checkpoint(root: StorageRoot, run_id: str) -> tuple[str, int] | None:
    """``(location, step)`` of the newest complete checkpoint of the run: the one a resume takes.

    Complete means every rank's checksum manifest is there (``trainers.checkpoints``;
    a resume also checks the sums). A run whose checkpoints carry no manifests falls
    back to the newest checkpoint Ray Train registered in its snapshot: a run stopped
    mid-upload leaves a directory that a resume would not load.
    """
    complete = _newest_with_manifests(root, run_id)
    if complete is not None:
        return complete
    snapshot = _read_json(root, run_relpath(run_id, SNAPSHOT_FILE))
    latest = snapshot.get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    if not name:
        return None
    state = _read_json(root, run_relpath(run_id, name, TRAINER_STATE))
    step = state.get("step", (latest.get("metrics") or {}).get("step", 0))
    return root.url(run_relpath(run_id, name)), int(step)


def _newest_with_manifests(root: StorageRoot, run_id: str) -> tuple[str, int] | None:
    from rayft.trainers.checkpoints import CHECKPOINT_PREFIX, manifest_name

    names = [n for n in root.list_dirs(run_relpath(run_id)) if n.startswith(CHECKPOINT_PREFIX)]
    for name in sorted(names, reverse=True):
        first = _read_json(root, run_relpath(run_id, name, manifest_name(0)))
        world = first.get("world_size")
        if not isinstance(world, int) or world < 1:
            continue
        ranks = range(1, world)
        if all(root.read(run_relpath(run_id, name, manifest_name(r))) is not None for r in ranks):
            return root.url(run_relpath(run_id, name)), int(first.get("step", 0))
    return None


def checkpoint_history(root: StorageRoot, checkpoint: str) -> list[dict[str, Any]]:
    """The progress records saved with a checkpoint (``newest_checkpoint``'s location)."""
    relpath = checkpoint[len(root.location) :].strip("/")
    return list(_read_json(root, f"{relpath}/{TRAINER_STATE}").get("history") or [])


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a run stands from its events: state, step, total, latest metrics, resume, artifact.

    Returns:
        A dict with ``metrics`` and, when the events say so, ``state``, ``step``,
        ``total_steps``, ``resumed_from``, ``checkpoint``, ``checkpoint_step``,
        ``artifact`` and ``error``.
    """
    out: dict[str, Any] = {"metrics": {}}
    for event in events:
        kind = event.get("type")
        if kind in ("train", "eval"):
            out["step"] = max(out.get("step", 0), int(event.get("step", 0)))
            if event.get("total_steps"):
                out["total_steps"] = int(event["total_steps"])
            keys = ("loss",) if kind == "train" else ("eval_loss", "eval_perplexity")
            out["metrics"].update({k: event[k] for k in keys if _is_number(event.get(k))})
        elif kind == "state":
            out["state"] = event.get("state")
        elif kind == "resumed":
            out["resumed_from"] = int(event.get("step", 0))
        elif kind == "checkpoint":
            out["checkpoint"] = event.get("path")
            out["checkpoint_step"] = event.get("step")
        elif kind == "artifact":
            out["artifact"] = event.get("location")
        elif kind == "error":
            out["error"] = event.get("message")
    return out


def live_state(record: dict[str, Any], now: float | None = None) -> str | None:
    """The record's state, with a dead driver's ``running`` read as ``interrupted``.

    A running record is interrupted when its driver's pid is gone on this same host,
    or (from any host) when its heartbeat is older than ``STALE_AFTER_S``.
    """
    state = record.get("state")
    if state != RUNNING:
        return state
    if record.get("host") == socket.gethostname() and record.get("pid"):
        if not _pid_alive(int(record["pid"])):
            return INTERRUPTED
    beat = record.get("heartbeat_at")
    if _is_number(beat) and (now or time.time()) - beat > STALE_AFTER_S:
        return INTERRUPTED
    return state


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process of that pid: alive
    # A zombie (killed, not yet reaped by its parent) is dead for this purpose.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
