"""Classification adapters on the serving base: ``POST /v1/classifications``.

A classifier is a published adapter of ``task: classification`` (its ``rayft.json``
says so, or its PEFT ``task_type`` is ``SEQ_CLS``). It is loaded on demand, the first
time a request names it, as ``AutoModelForSequenceClassification`` on the served base
model's weights plus the PEFT adapter (LoRA and the trained head); the same registry
checks as for generation adapters apply first (unknown name 404, another base or
changed base weights 409). Each classifier holds its own copy of the base, so only
:attr:`Classifiers.max_loaded` stay loaded (least recently used goes first).

Texts are right-padded into one batch; the model pools each row's last real token.
The answer per text is the most probable label, its probability (``score``) and the
probability of every label (a softmax, summing to 1).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rayft.serving.errors import BadRequest

if TYPE_CHECKING:
    from rayft.serving.engine import ModelEngine
    from rayft.trainers.manifest import ArtifactManifest

TASK = "classification"
ENDPOINT = "/v1/classifications"


def adapter_task(path: Path, manifest: ArtifactManifest) -> str:
    """``classification`` or ``causal_lm``: what the adapter at ``path`` was trained for."""
    if manifest.is_classifier is not None:
        return TASK if manifest.is_classifier else "causal_lm"
    from rayft.trainers.servable import classifier_labels

    return TASK if classifier_labels(path, "adapter") is not None else "causal_lm"


def classifier_refusal(model: str) -> BadRequest:
    """The 400 for a generation request that names a classifier."""
    return BadRequest(
        f"model {model!r} is a classification model: it answers POST {ENDPOINT} "
        "({model, input}), not completions or chat completions",
        code="wrong_endpoint",
        param="model",
    )


def generator_refusal(model: str) -> BadRequest:
    """The 400 for a classification request that names a causal language model."""
    return BadRequest(
        f"model {model!r} is a causal language model, not a classifier: use POST "
        "/v1/completions or /v1/chat/completions, or name an adapter trained with "
        "task: classification",
        code="wrong_endpoint",
        param="model",
    )


class Classifiers:
    """Classification adapters loaded on the engine's base model, least recently used first.

    ``classify`` runs on the engine's thread (``DecodeLoop.run_exclusive``); the lock
    only guards against a caller that does not.

    Args:
        engine: The serving engine (base model directory, tokenizer, device, dtype).
        max_loaded: Most classifiers held at once.
    """

    def __init__(self, engine: ModelEngine, max_loaded: int = 2) -> None:
        self.engine = engine
        self.max_loaded = max(1, max_loaded)
        # name -> (weights mtime, model, labels)
        self._loaded: OrderedDict[str, tuple[float, Any, list[str]]] = OrderedDict()
        self._lock = threading.Lock()

    def loaded(self) -> list[str]:
        """Names of the classifiers held now, least recently used first."""
        return list(self._loaded)

    def _labels(self, path: Path, manifest: ArtifactManifest) -> list[str]:
        labels = manifest.labels
        if labels is not None and len(labels) >= 2:
            return [str(label) for label in labels]
        from rayft.trainers.servable import classifier_labels

        count = classifier_labels(path, "adapter") or 0
        if count < 2:
            raise BadRequest(
                f"the classifier at {path.name!r} records no labels and has no head to count "
                "them from; publish it again",
                code="invalid_adapter",
                param="model",
            )
        # transformers' names for unnamed labels.
        return [f"LABEL_{i}" for i in range(count)]

    def _model(self, name: str, path: Path, manifest: ArtifactManifest) -> tuple[Any, list[str]]:
        from rayft.serving.engine import SAFE_WEIGHTS

        mtime = (path / SAFE_WEIGHTS).stat().st_mtime
        held = self._loaded.get(name)
        if held is not None and held[0] == mtime:
            self._loaded.move_to_end(name)
            return held[1], held[2]
        from peft import PeftModel

        from rayft.trainers.classification import load_classifier

        labels = self._labels(path, manifest)
        engine = self.engine
        base = load_classifier(str(engine.model_dir), labels, engine.pad_id, engine.dtype)
        model = PeftModel.from_pretrained(base, str(path)).to(engine.device).eval()
        self._loaded.pop(name, None)
        while len(self._loaded) >= self.max_loaded:
            self._loaded.popitem(last=False)
        self._loaded[name] = (mtime, model, labels)
        return model, labels

    def classify(
        self, name: str, path: Path, manifest: ArtifactManifest, encoded: list[list[int]]
    ) -> list[dict[str, Any]]:
        """One ``{index, label, score, probabilities}`` per encoded text, in order."""
        with self._lock:
            model, labels = self._model(name, path, manifest)
            width = max(len(ids) for ids in encoded)
            pad = self.engine.pad_id
            input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            mask = torch.zeros((len(encoded), width), dtype=torch.long)
            for row, ids in enumerate(encoded):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                mask[row, : len(ids)] = 1
            device = self.engine.device
            with torch.no_grad():
                logits = model(
                    input_ids=input_ids.to(device), attention_mask=mask.to(device)
                ).logits
            probs = torch.softmax(logits.float(), dim=-1).cpu()
        out = []
        for index, row in enumerate(probs.tolist()):
            best = max(range(len(labels)), key=row.__getitem__)
            out.append(
                {
                    "index": index,
                    "label": labels[best],
                    "score": row[best],
                    "probabilities": dict(zip(labels, row, strict=True)),
                }
            )
        return out
