"""Continued fine-tuning and lineage: which published artifact a new one was trained from.

A job with ``model.adapter: NAME`` starts from that published LoRA adapter: the driver
checks it (:func:`resolve_parent`) before any Ray work, every worker loads its weights
(:meth:`ParentAdapter.local_dir`, ``trainers.methods``), and the new artifact's
``rayft.json`` records it as ``parent_adapter`` (:meth:`ParentAdapter.record`), with
the parent's own parent inside, so every artifact carries its whole chain.
:func:`lineage` follows that chain (and published full/freeze models used as
``model.name``) back to the base model; ``rayft models lineage NAME`` prints it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayft.trainers.config import ConfigError, JobSpec
from rayft.trainers.registry import (
    ArtifactManifest,
    ManifestError,
    ParentRecord,
    RegistryError,
    published_manifest,
    sync_adapter,
    sync_artifact,
)
from rayft.trainers.storage import StorageError, StorageRoot

# Metrics of an artifact shown in its lineage line, in this order.
LINEAGE_METRICS = ("eval_loss", "eval_perplexity", "loss")
MAX_DEPTH = 64


@dataclass(frozen=True)
class ParentAdapter:
    """The published adapter a run continues, as the driver found it at the run's start.

    Attributes:
        name: Registry name (``model.adapter``).
        version: The published version the run starts from.
        root: The rayft root the parent is published in.
        manifest: The parent's ``rayft.json``.
        lora: ``r``, ``alpha``, ``target_modules`` and ``dropout`` of its adapter_config.json.
    """

    name: str
    version: str | None
    root: StorageRoot
    manifest: ArtifactManifest = field(repr=False)
    lora: dict[str, Any] = field(default_factory=dict)

    def local_dir(self) -> Path:
        """The parent's files on this machine (downloaded from a URI root when needed).

        Raises:
            RuntimeError: The parent was republished or removed after the run started,
                so its weights are no longer the ones the run records.
        """
        path = sync_adapter(self.name, self.root)
        published = published_manifest(path)
        now = published.version if published is not None and published.kind == "adapter" else None
        if now != self.version:
            raise RuntimeError(
                f"model.adapter {self.name!r} changed after this run started (version "
                f"{self.version} -> {now or 'removed'}); start the run again so it records "
                "the adapter it trains from"
            )
        return path

    def record(self) -> ParentRecord:
        """What the new artifact's ``rayft.json`` says under ``parent_adapter``."""
        m = self.manifest
        return ParentRecord(
            name=self.name,
            version=self.version,
            dataset_sha256=m.dataset_sha256,
            published_at=m.published_at,
            base_model=m.base_model,
            base_fingerprint=m.base_fingerprint,
            run_id=m.run_id,
            metrics=_shown_metrics(m.metrics),
            steps=m.steps,
            parent_adapter=m.parent_adapter,
        )

    def lora_notes(self, spec: JobSpec) -> list[str]:
        """Lines saying which of the spec's ``lora`` settings the parent's config replaces."""
        ours = spec.lora
        differ = []
        if self.lora.get("r") is not None and self.lora["r"] != ours.r:
            differ.append(f"lora.r={ours.r}")
        if self.lora.get("alpha") is not None and float(self.lora["alpha"]) != float(ours.alpha):
            differ.append(f"lora.alpha={ours.alpha:g}")
        targets = self.lora.get("target_modules")
        if isinstance(ours.target_modules, list) and targets is not None:
            if set(ours.target_modules) != set(_as_list(targets)):
                differ.append(f"lora.target_modules={ours.target_modules}")
        if not differ:
            return []
        return [
            f"[rayft] model.adapter {self.name!r}: training continues with its own LoRA shape "
            f"(r={self.lora.get('r')}, alpha={self.lora.get('alpha')}, target_modules="
            f"{_short_targets(targets)}); {', '.join(differ)} from the spec do not apply"
        ]


def resolve_parent(
    spec: JobSpec, root: StorageRoot, model_dir: Path | None = None
) -> ParentAdapter | None:
    """Check ``model.adapter`` against the registry; ``None`` when the spec has none.

    Run on the driver before any training work. The adapter must be published in the
    storage root, be a LoRA adapter, and have been trained on ``model.name``; with
    ``model_dir`` and a recorded ``base_fingerprint``, the base's weights must be the
    ones it was trained on.

    Raises:
        ConfigError: On ``model.adapter``, saying what to change.
    """
    name = spec.model.adapter
    if name is None:
        return None
    path, manifest = _published_adapter(name, root)
    problem = _parent_problem(name, manifest, spec.model.name, path)
    if problem is None and model_dir is not None:
        problem = _fingerprint_problem(name, manifest, spec.model.name, model_dir, root)
    if problem is not None:
        raise ConfigError([("model.adapter", problem)])
    config = json.loads((path / "adapter_config.json").read_text())
    lora = {
        "r": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "dropout": config.get("lora_dropout"),
    }
    return ParentAdapter(name, manifest.version, root, manifest, lora)


def _published_adapter(name: str, root: StorageRoot) -> tuple[Path, ArtifactManifest]:
    where = root.url("adapters")
    try:
        path = sync_adapter(name, root)
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(
                [
                    (
                        "model.adapter",
                        f"no adapter named {name!r} is published in {where}; publish it first "
                        "(a LoRA run with output.name set to it) or correct the name",
                    )
                ]
            )
        return path, ArtifactManifest.find(path) or ArtifactManifest(kind="adapter", name=name)
    except ManifestError as err:
        raise ConfigError([("model.adapter", f"{err}; or continue another adapter")]) from None
    except RegistryError as err:
        raise ConfigError([("model.adapter", str(err))]) from None
    except StorageError as err:
        raise ConfigError(
            [("model.adapter", f"cannot read the registry at {where}: {err}")]
        ) from None


def _parent_problem(name: str, manifest: ArtifactManifest, model: str, path: Path) -> str | None:
    config = json.loads((path / "adapter_config.json").read_text())
    # A DPO adapter (recorded as ``method: dpo`` before ``objective``) stays refused.
    lora = manifest.method in (None, "lora") and manifest.objective != "dpo"
    if str(config.get("peft_type", "LORA")).upper() != "LORA" or not lora:
        return f"adapter {name!r} is not a LoRA adapter; model.adapter continues LoRA adapters only"
    base = manifest.base_model
    if base is None:
        return (
            f"adapter {name!r} records no base_model in its rayft.json, so it cannot be "
            "continued safely; publish it again with rayft"
        )
    if base != model:
        return (
            f"adapter {name!r} was trained on {base!r}, but model.name is {model!r}; set "
            f"model.name={base}, or pick an adapter trained on {model}"
        )
    return None


def _fingerprint_problem(
    name: str, manifest: ArtifactManifest, model: str, model_dir: Path, root: StorageRoot
) -> str | None:
    from rayft.trainers.servable import base_fingerprint

    recorded = manifest.base_fingerprint
    if not recorded:
        return None  # published before fingerprints were recorded
    current = base_fingerprint(model_dir, root.models)
    if current == recorded:
        return None
    return (
        f"adapter {name!r} was trained on {model!r} with weights {recorded[:12]}, but "
        f"{model!r} now has weights {current[:12]} ({model_dir}); continue it on the base it "
        "was trained on, or train a new adapter without model.adapter"
    )


# ------------------------------------------------------------------ lineage


class LineageError(RegistryError):
    """A name with no published adapter or model behind it."""


def lineage(name: str, root: StorageRoot) -> list[dict[str, Any]]:
    """The chain from the published artifact ``name`` back to its base model.

    Each entry has ``kind`` (``adapter``, ``model`` or ``base``), ``name``, ``version``,
    ``dataset_sha256``, ``published_at`` and ``metrics``; adapters' parents come from
    the ``parent_adapter`` records (as they were when the child was trained), published
    models used as ``model.name`` from their own ``rayft.json``. The last entry is the
    base model.

    Raises:
        LineageError: Nothing is published under ``name``.
        ManifestError: A ``rayft.json`` on the way is corrupt.
    """
    checked = sync_adapter(name, root)  # also refuses unsafe names
    manifest: ArtifactManifest | ParentRecord | None = published_manifest(checked)
    kind = "adapter"
    if manifest is None or manifest.kind != "adapter":
        manifest = _published_model(name, root)
        kind = "model"
        if manifest is None:
            raise LineageError(
                f"no published adapter or model named {name!r} in {root.location} "
                "(adapters/ and models/); check the name and the storage root (--storage)"
            )
    chain = [_entry(kind, name, manifest)]
    while len(chain) < MAX_DEPTH:
        parent = manifest.parent_adapter
        if parent is not None and parent.name:
            manifest = parent
            chain.append(_entry("adapter", parent.name, parent))
            continue
        base = manifest.base_model
        published = _published_model(base, root) if base else None
        if published is None or any(e["kind"] == "model" and e["name"] == base for e in chain):
            chain.append(_base_entry(base, manifest))
            break
        manifest = published
        chain.append(_entry("model", base, published))
    return chain


def _published_model(name: str, root: StorageRoot) -> ArtifactManifest | None:
    """The ``rayft.json`` of a full/freeze model published under ``name``, if there is one."""
    from rayft.trainers.models import BUILTINS

    if name in BUILTINS:
        return None  # never published; syncing it from a URI root would drop the local copy
    try:
        path = sync_artifact("model", name, root)
    except RegistryError:
        return None  # a hub id or a path: not a registry name
    if not (path / "config.json").is_file():
        return None
    manifest = ArtifactManifest.find(path)
    return manifest if manifest is not None and manifest.kind == "model" else None


def _entry(kind: str, name: str, manifest: ArtifactManifest | ParentRecord) -> dict[str, Any]:
    method = manifest.method
    return {
        "kind": kind,
        "name": name,
        "version": manifest.version,
        "method": method if method is not None or kind != "adapter" else "lora",
        "dataset_sha256": manifest.dataset_sha256,
        "published_at": manifest.published_at,
        "metrics": _shown_metrics(manifest.metrics),
        "steps": manifest.steps,
        "base_model": manifest.base_model,
    }


def _base_entry(name: str | None, last: ArtifactManifest | ParentRecord) -> dict[str, Any]:
    from rayft.trainers.models import BUILTINS

    return {
        "kind": "base",
        "name": name or "?",
        "builtin": name in BUILTINS,
        "base_fingerprint": last.base_fingerprint,
    }


def format_lineage(chain: list[dict[str, Any]]) -> list[str]:
    """One line per entry: kind, name, version, dataset sha256 (short), time, metrics."""
    width = max(len(e["name"]) for e in chain)
    lines = []
    for entry in chain:
        if entry["kind"] == "base":
            about = "builtin base model" if entry.get("builtin") else "base model"
            weights = entry.get("base_fingerprint")
            tail = f"  weights {weights[:12]}" if weights else ""
            lines.append(f"{'base':<7} {entry['name']:<{width}}  {about}{tail}")
            continue
        when = entry.get("published_at")
        stamp = (
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when)) if when is not None else "-"
        )
        data = (entry.get("dataset_sha256") or "-")[:12]
        metrics = " ".join(f"{k}={v:.4f}" for k, v in (entry.get("metrics") or {}).items())
        steps = f" steps={entry['steps']}" if entry.get("steps") is not None else ""
        kind = entry["kind"] if entry["kind"] == "adapter" else f"{entry.get('method') or 'model'}"
        lines.append(
            f"{kind:<7} {entry['name']:<{width}}  v {entry.get('version') or '-'}  data {data}  "
            f"{stamp}  {metrics}{steps}".rstrip()
        )
    return lines


def _shown_metrics(metrics: Any) -> dict[str, float]:
    if not isinstance(metrics, dict):
        return {}
    return {
        k: float(metrics[k])
        for k in LINEAGE_METRICS
        if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)
    }


def _as_list(targets: Any) -> list[str]:
    return [targets] if isinstance(targets, str) else list(targets or [])


def _short_targets(targets: Any) -> str:
    names = sorted(_as_list(targets))
    return ",".join(names) if names else "?"
