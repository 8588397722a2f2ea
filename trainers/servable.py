"""What makes a published artifact servable: it loads and gives finite logits on its base.

Two pieces, used at publish time and by the serving engine:

* :func:`weights_fingerprint`: a sha256 over a model's safetensors state dict (every
  tensor's name, dtype, shape and bytes, in name order), so the same weights give the
  same fingerprint however they are sharded or whatever metadata the files carry.
  :func:`base_fingerprint` computes it once per model directory and caches it.
* :func:`check_servable`: an adapter loads on its base with plain PEFT, or a full model
  with ``AutoModelForCausalLM``, and a short input gives finite logits. A classifier
  (a ``SEQ_CLS`` adapter, or a ``*ForSequenceClassification`` model) loads with
  ``AutoModelForSequenceClassification`` instead.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path

from rayft.trainers.storage import atomic_write

FINGERPRINT_FILE = ".rayft-fingerprint.json"
# Token ids of the short input the publish check runs (clipped to the vocabulary).
CHECK_TOKENS = 8


class UnservableError(ValueError):
    """An artifact that would not serve: it does not load, or its logits are not finite."""


def weights_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """The sha256 of the safetensors state dict in ``model_dir``.

    Raises:
        FileNotFoundError: ``model_dir`` holds no ``*.safetensors`` file.
        ValueError: A safetensors file is malformed.
    """
    files = _weight_files(Path(model_dir))
    entries: list[tuple[str, Path, dict, int]] = []
    for file in files:
        header, data_start = _read_header(file)
        entries += [(name, file, info, data_start) for name, info in header.items()]
    entries.sort(key=lambda e: e[0])
    digest = hashlib.sha256()
    handles: dict[Path, mmap.mmap] = {}
    try:
        for name, file, info, data_start in entries:
            if file not in handles:
                with open(file, "rb") as raw:
                    handles[file] = mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ)
            begin, end = info["data_offsets"]
            head = json.dumps([name, info["dtype"], info["shape"]]).encode()
            digest.update(struct.pack("<Q", len(head)) + head)
            digest.update(handles[file][data_start + begin : data_start + end])
    finally:
        for handle in handles.values():
            handle.close()
    return digest.hexdigest()


def base_fingerprint(model_dir: str | os.PathLike[str], cache: Path | None = None) -> str:
    """:func:`weights_fingerprint` of a base model, computed once and cached.

    The cache file sits in the model directory when that directory is inside ``cache``
    (rayft's model cache, where builtins and published models live); any other
    directory (a user's HF folder, a hub snapshot) is left untouched and its
    fingerprint is cached under ``<cache>/.fingerprints/``. A cached value is used only
    while every weight file keeps its size and modification time.

    Args:
        model_dir: The base model's HF directory.
        cache: rayft's model cache (``StorageRoot.models``); ``None`` caches nothing.
    """
    model_dir = Path(model_dir).resolve()
    stamps = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in _weight_files(model_dir)}
    where = _cache_file(model_dir, cache)
    if where is not None and where.is_file():
        try:
            cached = json.loads(where.read_text())
            if cached.get("files") == stamps and cached.get("path") == str(model_dir):
                return str(cached["sha256"])
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # unreadable cache: computed again below
    sha = weights_fingerprint(model_dir)
    if where is not None:
        record = {"sha256": sha, "path": str(model_dir), "files": stamps}
        try:
            atomic_write(where, json.dumps(record, indent=2))
        except OSError:
            pass  # a read-only cache only costs recomputing next time
    return sha


def check_servable(artifact_dir: Path, kind: str, base_dir: Path | None = None) -> None:
    """Refuse an artifact that would not serve.

    Args:
        artifact_dir: The files about to be published.
        kind: ``adapter`` (loaded on ``base_dir`` with ``peft.PeftModel.from_pretrained``)
            or ``model`` (loaded with ``AutoModelForCausalLM.from_pretrained``).
        base_dir: The base model's directory (adapters only).

    Raises:
        UnservableError: The artifact does not load, or a short input gives NaN or
            infinite logits; the message says which and what to do.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    artifact_dir = Path(artifact_dir)
    what = f"the {kind} in {artifact_dir}"
    head = classifier_labels(artifact_dir, kind)
    try:
        if kind == "adapter":
            from peft import PeftModel

            if base_dir is None:
                raise UnservableError(f"{what} cannot be checked: no base model was given")
            if head is None:
                base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
            else:
                base = AutoModelForSequenceClassification.from_pretrained(
                    base_dir, dtype="auto", num_labels=head
                )
            model = PeftModel.from_pretrained(base, str(artifact_dir))
        elif head is None:
            model = AutoModelForCausalLM.from_pretrained(artifact_dir, dtype="auto")
        else:
            model = AutoModelForSequenceClassification.from_pretrained(artifact_dir, dtype="auto")
    except UnservableError:
        raise
    except Exception as err:  # noqa: BLE001 - any load failure is the artifact's fault
        on = f" on its base {base_dir}" if kind == "adapter" else ""
        raise UnservableError(
            f"{what} does not load{on} ({type(err).__name__}: {str(err)[:500]}); nothing was "
            "published: check the run's last checkpoint, then run it again"
        ) from None
    model.eval()
    vocab = int(getattr(model.config, "vocab_size", CHECK_TOKENS) or CHECK_TOKENS)
    ids = (torch.arange(CHECK_TOKENS) % vocab).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise UnservableError(
            f"{what} gives non-finite logits ({bad} NaN/inf values on a {CHECK_TOKENS}-token "
            "input); nothing was published: the weights diverged, so lower optim.lr or set "
            "optim.max_grad_norm and train again"
        )


def export_was_checked(note: bytes | None) -> bool:
    """Whether the servability check passed where the export was made (the note
    ``trainers.loop.check_export`` wrote); ``False`` when there is no note (a checkpoint
    made before the check moved there), so publishing checks it itself.

    Raises:
        UnservableError: The check failed there; its message says why and what to do.
    """
    if note is None:
        return False
    outcome = json.loads(note)
    if not outcome.get("ok"):
        raise UnservableError(str(outcome.get("error") or "the export did not serve"))
    return True


def classifier_labels(artifact_dir: Path, kind: str) -> int | None:
    """How many labels a classifier artifact has; ``None`` for a causal LM.

    An adapter is a classifier when its PEFT ``task_type`` is ``SEQ_CLS`` (the label
    count is the saved head's first dimension); a full model when its config's
    architecture is a ``*ForSequenceClassification``.
    """
    artifact_dir = Path(artifact_dir)
    if kind == "adapter":
        try:
            config = json.loads((artifact_dir / "adapter_config.json").read_text())
        except (OSError, ValueError):
            return None
        if config.get("task_type") != "SEQ_CLS":
            return None
        for file in _weight_files(artifact_dir):
            header, _ = _read_header(file)
            for name, info in header.items():
                # PEFT saves modules_to_save under their own names (".score.weight").
                if name.rsplit(".", 2)[-2:] in (["score", "weight"], ["classifier", "weight"]):
                    return int(info["shape"][0])
        return None
    try:
        config = json.loads((artifact_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return len(config.get("id2label") or {}) or None
    return None


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{model_dir} holds no *.safetensors weights; rayft serves and fingerprints "
            "safetensors models only",
        )
    return files


def _read_header(file: Path) -> tuple[dict[str, dict], int]:
    with open(file, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file} is not a safetensors file (shorter than its header)")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 1024 * 1024:
            raise ValueError(f"{file} is not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(handle.read(size))
        except ValueError:
            raise ValueError(f"{file} is not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def _cache_file(model_dir: Path, cache: Path | None) -> Path | None:
    if cache is None:
        return None
    cache = Path(cache).resolve()
    if model_dir.is_relative_to(cache):
        return model_dir / FINGERPRINT_FILE
    key = hashlib.sha1(str(model_dir).encode()).hexdigest()[:16]
    return cache / ".fingerprints" / f"{model_dir.name}-{key}.json"
