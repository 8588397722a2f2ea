"""Sequence classification (``objective: classification``): a new head on the base model.

Rows are JSON objects with a text column (``classification.text_column``, default
``text``) and a label column (``classification.label_column``, default ``label``). A
row may carry a ``messages`` conversation instead of the text: it is rendered with the
tokenizer's chat template, without a generation prompt, and classified as that text
(a tokenizer without a chat template joins ``role: content`` lines). A label is a label
name (a string) or an integer class id:

* with ``classification.labels`` given, a name must be one of them and an integer is an
  index into them;
* otherwise the labels are the sorted distinct labels of the data (numerically sorted
  when every label is an integer, whose name is then its decimal string), found by the
  driver's scan and written into the run's spec, so the workers, checkpoints and the
  published ``rayft.json`` share one id -> label map.

The model is ``AutoModelForSequenceClassification`` on the base (a causal LM's last
non-pad token is pooled, so ``pad_token_id`` is set); the head (``score`` for
Llama-likes) always trains: PEFT's ``SEQ_CLS`` task puts it in ``modules_to_save``,
method ``freeze`` leaves it trainable with the last layers. The loss is the mean
cross-entropy over the examples; an evaluation sums a confusion matrix over every
worker and reports ``eval_loss``, ``eval_accuracy`` and ``eval_f1_macro`` (scikit-learn).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rayft.trainers.formats import IGNORE_INDEX, ROLES, RowError, _normalise_message
from rayft.trainers.objective import Objective, Problems
from rayft.trainers.validation_errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from rayft.trainers.config import ClassificationSpec, JobSpec
    from rayft.trainers.data import SourceScan
    from rayft.trainers.loop import Worker, WorkerInputs

# Where sequence-classification models keep their head (Llama/Mistral/Qwen: score;
# BERT-likes: classifier); PEFT's SEQ_CLS task saves the same two.
HEAD_MODULES = ("score", "classifier")


# --------------------------------------------------------------------------- rows


def label_name(value: Any, labels: list[str] | None) -> str:
    """The label name of a row's label value.

    Args:
        value: A label name (str) or an integer class id.
        labels: The run's labels (``classification.labels``), or ``None`` while they
            are still being collected (an integer is then named by its decimal string).

    Raises:
        RowError: The value is not a non-empty string or an integer, or not one of
            ``labels`` (a name) / out of their range (an id).
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(
            f"label must be a label name (string) or a class id (integer), "
            f"got {type(value).__name__} {value!r}"
        )
    if isinstance(value, str) and not value:
        raise RowError("label is an empty string")
    if labels is None:
        return str(value)
    if isinstance(value, int):
        if not 0 <= value < len(labels):
            raise RowError(
                f"label id {value} is out of range: classification.labels has "
                f"{len(labels)} labels (ids 0..{len(labels) - 1})"
            )
        return labels[value]
    if value not in labels:
        raise RowError(
            f"label {value!r} is not one of classification.labels {labels}; add it there "
            "or fix the row"
        )
    return value


def sorted_labels(names: set[str] | list[str]) -> list[str]:
    """Distinct labels in class-id order: numeric when all are integers, else lexical."""
    distinct = set(names)
    if all(name.lstrip("-").isdigit() for name in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def check_row(row: dict[str, Any], cls: ClassificationSpec) -> str:
    """Check one classification row; its label name (see :func:`label_name`).

    Raises:
        RowError: The text (or ``messages``) or the label is missing or malformed.
    """
    if row.get(cls.text_column) is not None:
        text = row[cls.text_column]
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"field {cls.text_column!r} must be a non-empty string")
    elif row.get("messages") is not None:
        _check_conversation(row["messages"])
    else:
        raise RowError(
            f"missing field {cls.text_column!r} (or 'messages'); set "
            "classification.text_column to the column holding the text"
        )
    if row.get(cls.label_column) is None:
        raise RowError(
            f"missing field {cls.label_column!r}; set classification.label_column to the "
            "column holding the label"
        )
    return label_name(row[cls.label_column], cls.labels)


class LabelledRows:
    """The data scan's check of classification rows: :func:`check_row`, labels collected."""

    format = "classification"
    described = "task classification"

    def __init__(self, cls: ClassificationSpec) -> None:
        self.cls = cls
        self.found: set[str] = set()

    def check(self, row: dict[str, Any]) -> None:
        """Check one row and collect its label; raises ``RowError``."""
        self.found.add(check_row(row, self.cls))

    def labels(self) -> list[str]:
        """The distinct labels of the rows checked so far, in class-id order."""
        return sorted_labels(self.found)


def _check_conversation(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RowError("field 'messages' must be a non-empty list of {role, content}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RowError(f"messages[{i}] must be an object with role one of {'/'.join(ROLES)}")
        if message.get("content") is None:
            raise RowError(f"messages[{i}].content is missing")
        _normalise_message(message)  # raises on malformed content parts


def row_text(row: dict[str, Any], cls: ClassificationSpec, tokenizer: Any) -> tuple[str, bool]:
    """The text a row is classified by, and whether it was rendered by a chat template.

    A ``messages`` row is rendered with the tokenizer's chat template without a
    generation prompt (the conversation as written is what is classified).
    """
    if row.get(cls.text_column) is not None:
        return str(row[cls.text_column]), False
    messages = [_normalise_message(m) for m in row["messages"]]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return str(text), True
    return "\n".join(f"{m['role']}: {m.get('content', '')}" for m in messages), False


def tokenize_row(
    row: dict[str, Any], tokenizer: Any, cls: ClassificationSpec, max_seq_len: int
) -> dict[str, Any]:
    """``input_ids`` (cut to ``max_seq_len``), ``labels`` (``[class id]``) and ``truncated``.

    Args:
        row: A row accepted by :func:`check_row`.
        tokenizer: The base model's tokenizer.
        cls: The run's classification settings; ``cls.labels`` must be set.
        max_seq_len: The most tokens kept (the start of the text).
    """
    if cls.labels is None:
        raise ValueError("classification.labels must be resolved before tokenizing")
    name = label_name(row[cls.label_column], cls.labels)
    text, templated = row_text(row, cls, tokenizer)
    # A rendered template already carries its special tokens.
    ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
    return {
        "input_ids": ids[:max_seq_len],
        "labels": [cls.labels.index(name)],
        "truncated": len(ids) > max_seq_len,
    }


# --------------------------------------------------------------------------- batches


def collate(batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """Right-pad a Ray Data batch of classification rows into model inputs.

    Rows with no tokens (carriers of a ``num_dropped`` count) are left out.

    Returns:
        ``input_ids`` and ``attention_mask`` (``[B, T]`` long), ``labels`` (``[B]``
        class ids), ``sample_ids`` and the python ints ``num_tokens``,
        ``num_truncated`` and ``num_dropped``.
    """
    import numpy as np
    import torch

    rows = [np.asarray(r).reshape(-1) for r in batch["input_ids"]]
    keep = [i for i, r in enumerate(rows) if len(r) > 0]
    width = max((len(rows[i]) for i in keep), default=0)
    input_ids = torch.full((len(keep), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(keep), width), dtype=torch.long)
    labels = torch.full((len(keep),), IGNORE_INDEX, dtype=torch.long)
    for out, i in enumerate(keep):
        input_ids[out, : len(rows[i])] = torch.as_tensor(rows[i], dtype=torch.long)
        mask[out, : len(rows[i])] = 1
        labels[out] = int(np.asarray(batch["labels"][i]).reshape(-1)[0])
    dropped = batch.get("num_dropped")
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "sample_ids": [
            [str(s) for s in np.asarray(batch["sample_ids"][i]).reshape(-1)] for i in keep
        ],
        "num_tokens": int(mask.sum()),
        "num_truncated": int(np.asarray(batch["num_truncated"]).sum()),
        "num_dropped": int(np.asarray(dropped).sum()) if dropped is not None else 0,
    }


def collate_fn(pad_id: int) -> Any:
    """:func:`collate` as the ``NumpyBatchCollateFn`` Ray Data's ``iter_torch_batches`` wants."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class ClassificationCollateFn(NumpyBatchCollateFn):
        def __init__(self) -> None:
            self.pad_id = pad_id

        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            return collate(batch, self.pad_id)

    return ClassificationCollateFn()


# --------------------------------------------------------------------------- metrics


def classification_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (scikit-learn) of a ``[true, predicted]`` confusion matrix.

    The matrix is the sum of every worker's counts, so the metrics are those of the
    whole eval set; each non-empty cell is given to scikit-learn as one weighted
    prediction, so the result is ``f1_score`` on the gathered predictions: labels
    never seen as true nor predicted are left out of the macro average.
    """
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    confusion = np.asarray(confusion, dtype=np.float64)
    true, pred = np.nonzero(confusion)
    weights = confusion[true, pred]
    if weights.sum() == 0:
        return {"eval_accuracy": 0.0, "eval_f1_macro": 0.0}
    accuracy = accuracy_score(true, pred, sample_weight=weights)
    f1 = f1_score(true, pred, average="macro", sample_weight=weights, zero_division=0)
    return {"eval_accuracy": float(accuracy), "eval_f1_macro": float(f1)}


# --------------------------------------------------------------------------- objective


class ClassificationObjective(Objective):
    """Cross-entropy on a new classification head; accuracy and macro-F1 at evaluation."""

    peft_task_type = "SEQ_CLS"
    """PEFT's ``SEQ_CLS`` also trains (and saves) the new head whole, as ``modules_to_save``."""
    generation_metrics = False
    language_model = False
    scan_tokenizes = False
    """A row keeps its one label whatever its length: the scan counts rows, checked by
    :class:`LabelledRows`, without tokenizing them."""

    def __init__(self, spec: JobSpec) -> None:
        labels = spec.classification.labels
        if not labels or len(labels) < 2:
            raise ValueError(
                "objective classification needs at least 2 labels (classification.labels, or "
                "the distinct labels the data scan finds)"
            )
        self.labels = list(labels)
        n = len(self.labels)
        cells = tuple(f"confusion_{t}_{p}" for t in range(n) for p in range(n))
        self.eval_keys = ("loss_sum", "count", *cells)

    @classmethod
    def spec_problems(cls, spec: JobSpec) -> Problems:
        """No packing, no adapter to continue, and given labels at least two distinct names."""
        problems: Problems = []
        if spec.data.packing:
            problems.append(
                (
                    "data.packing",
                    "objective classification classifies each row on its own; set "
                    "data.packing=false",
                )
            )
        if spec.model.adapter is not None:
            problems.append(
                (
                    "model.adapter",
                    "objective classification starts a new head on the base model; "
                    "leave model.adapter out",
                )
            )
        labels = spec.classification.labels
        if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
            problems.append(
                (
                    "classification.labels",
                    f"give at least 2 distinct label names, got {labels}",
                )
            )
        return problems + super().spec_problems(spec)

    @classmethod
    def row_check(cls, spec: JobSpec) -> LabelledRows:
        """Rows are read by ``classification``'s columns, whatever ``data.format`` says."""
        return LabelledRows(spec.classification)

    @classmethod
    def with_scan(cls, spec: JobSpec, scanned: SourceScan, say: Callable[[str], None]) -> JobSpec:
        """The spec with the labels resolved (:func:`with_labels`), said in one line.

        The run's spec carries them from here on, so the workers, checkpoints and
        ``rayft.json`` share one id -> label map.
        """
        spec = with_labels(spec, scanned.labels)
        say(f"[rayft] classification labels: {', '.join(spec.classification.labels or [])}")
        return spec

    @classmethod
    def manifest_fields(cls, spec: JobSpec) -> dict[str, Any]:
        """The labels, in head order, so the artifact loads and serves with no other context."""
        return {"labels": spec.classification.labels}

    def trainable_head(self, model: nn.Module) -> list[nn.Parameter]:
        """The new head starts random: it trains whatever else ``method: freeze`` freezes."""
        return head_parameters(model)

    def load_model(self, spec: JobSpec, inputs: WorkerInputs) -> nn.Module:
        """``AutoModelForSequenceClassification`` on the base, with the run's labels."""
        import torch
        from transformers import AutoTokenizer

        from rayft.trainers.attention import resolve_attention

        tokenizer = AutoTokenizer.from_pretrained(inputs.model_dir)
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        return load_classifier(
            inputs.model_dir,
            self.labels,
            pad,
            getattr(torch, inputs.dtype),
            resolve_attention(spec.model.attn_implementation),
        )

    def row_tokenizer(self, spec: JobSpec) -> Callable[[dict[str, Any], str, Any], dict | None]:
        """``tokenize(row, fmt, tokenizer)``: :func:`tokenize_row` with the run's settings."""
        cls, max_seq_len = spec.classification, spec.data.max_seq_len

        def tokenize(row: dict[str, Any], fmt: str, tokenizer: Any) -> dict[str, Any] | None:
            return tokenize_row(row, tokenizer, cls, max_seq_len)

        return tokenize

    def collate(self, pad_id: int, spec: JobSpec) -> Any:
        """Right-padded rows with one class id each (:func:`collate`)."""
        return collate_fn(pad_id)

    def _logits(self, worker: Worker, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        out = worker.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        # A batch that ``loop.nonempty`` replaced has [1, 1] labels of IGNORE_INDEX.
        return out.logits.float(), batch["labels"].reshape(-1)

    def train_loss(self, worker: Worker, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over the micro-batch's examples, and their number."""
        from torch import nn

        logits, labels = self._logits(worker, batch)
        total = nn.functional.cross_entropy(
            logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return total, int((labels != IGNORE_INDEX).sum())

    def eval_sums(self, worker: Worker, batch: dict[str, Any]) -> dict[str, float]:
        """Loss sum, example count and the confusion counts of this batch."""
        import torch
        from torch import nn

        logits, labels = self._logits(worker, batch)
        valid = labels != IGNORE_INDEX
        total = nn.functional.cross_entropy(
            logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        n = len(self.labels)
        pred = logits.argmax(-1)
        counts = torch.bincount(labels[valid] * n + pred[valid], minlength=n * n).tolist()
        sums = {"loss_sum": float(total), "count": float(valid.sum())}
        sums.update({key: float(c) for key, c in zip(self.eval_keys[2:], counts, strict=True)})
        return sums

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """``eval_loss`` (mean cross-entropy), ``eval_accuracy``, ``eval_f1_macro``, ``eval_examples``."""
        import numpy as np

        n = len(self.labels)
        confusion = np.array([sums[key] for key in self.eval_keys[2:]]).reshape(n, n)
        return {
            "eval_loss": sums["loss_sum"] / max(sums["count"], 1.0),
            **classification_metrics(confusion),
            "eval_examples": int(sums["count"]),
        }


def load_classifier(
    model_dir: str,
    labels: list[str],
    pad_token_id: int | None,
    dtype: Any = None,
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """``AutoModelForSequenceClassification`` of ``model_dir`` with a head for ``labels``.

    ``pad_token_id`` is set so that a padded batch pools each row's last real token;
    ``attn_implementation`` is resolved (``trainers.attention.resolve_attention``).
    """
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        model_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        pad_token_id=pad_token_id,
        dtype=dtype if dtype is not None else "auto",
        attn_implementation=attn_implementation,
    )


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The classification head's parameters (:data:`HEAD_MODULES`), for method freeze."""
    from torch import nn

    params: list[nn.Parameter] = []
    for name in HEAD_MODULES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            params += list(module.parameters())
    return params


def with_labels(spec: JobSpec, found: list[str]) -> JobSpec:
    """``spec`` with ``classification.labels`` resolved: as given, else the labels found.

    Raises:
        ConfigError: Fewer than two labels.
    """
    labels = spec.classification.labels or sorted_labels(found)
    if len(labels) < 2:
        raise ConfigError(
            [
                (
                    "classification.labels",
                    f"classification needs at least 2 labels, the data has {labels}; give "
                    "rows of two or more labels, or list them in classification.labels",
                )
            ]
        )
    out = spec.model_copy(deep=True)
    out.classification.labels = list(labels)
    return out
