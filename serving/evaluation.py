"""Evaluating a served model on rows: teacher-forced loss and perplexity, generation metrics.

Loss is computed exactly as training computes it: each row is tokenized by
``trainers.formats.tokenize_example`` (assistant/completion tokens labelled, prompt
tokens masked with -100), and the summed next-token cross-entropy over labelled
positions is divided by their count across all rows (token-weighted, like the
training loop's eval loss). Generation metrics greedily generate an answer to each
row's prompt (the conversation up to its last assistant turn) and compare it with
that turn's text using ``trainers.metrics``.

Rows come inline, from a registry dataset, or from the request log
(``dataset_rows``): the prompts a served model was sent with the answers it gave.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayft.serving.auth import DEFAULT_PROJECT
from rayft.serving.errors import BadRequest, NotFound, TooLarge
from rayft.serving.request_log import LogDataset
from rayft.trainers.metrics import GENERATION_METRICS
from rayft.trainers.storage import StorageRoot, dataset_relpath, file_record_relpath

LOSS_METRICS = ("loss", "perplexity")
ALL_METRICS = LOSS_METRICS + GENERATION_METRICS
DATASET_SUFFIXES = ("", ".jsonl", ".json")


@dataclass
class PreparedRows:
    """Rows turned into what the model needs.

    Attributes:
        scored: ``(input_ids, labels)`` for the teacher-forced loss.
        prompts: Prompt token ids for generation, one per row that has a reference.
        references: The reference answer of each prompt.
        dropped: Rows with no labelled token left (e.g. cut away by ``max_seq_len``).
    """

    scored: list[tuple[list[int], list[int]]]
    prompts: list[list[int]]
    references: list[str]
    dropped: int


def check_metrics(names: list[str]) -> list[str]:
    """Validate requested metric names; raise ``BadRequest`` naming the unknown ones."""
    unknown = [n for n in names if n not in ALL_METRICS]
    if unknown:
        raise BadRequest(
            f"unknown metric(s) {', '.join(map(repr, unknown))}; choose from {', '.join(ALL_METRICS)}",
            code="invalid_metric",
            param="metrics",
        )
    if not names:
        raise BadRequest("metrics is empty; ask for at least one", param="metrics")
    return list(dict.fromkeys(names))


def read_rows(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read rows from a ``.jsonl`` (one JSON object per line) or ``.json`` (a list) file.

    Rows are read one at a time (``serving.json_rows``) and reading stops at the row
    after ``limit``: a file of any size costs at most ``limit`` rows of memory and time.

    Raises:
        BadRequest: A row that is not UTF-8 or not JSON, or a ``.json`` file that is not
            a list of objects (naming the line or row index).
        TooLarge: More than ``limit`` rows.
    """
    from rayft.serving.json_rows import iter_rows

    rows = list(itertools.islice(iter_rows(path), None if limit is None else limit + 1))
    if limit is not None and len(rows) > limit:
        raise TooLarge(
            f"{path.name} has more than {limit} rows; this server evaluates at most {limit}"
        )
    return rows


def dataset_rows(
    dataset: str | LogDataset,
    model: str,
    root: StorageRoot,
    limit: int | None = None,
    project: str | None = None,
) -> list[dict[str, Any]]:
    """The rows of ``dataset``: a registry dataset by name, or requests from the request log.

    A request-log dataset (``{"request_log": {"model", "since", "until", "limit"}}``)
    reads the answered requests of ``request_log.model`` (default: ``model``, the model
    being evaluated) and turns each generated choice into a row whose answer is what
    was served: chat rows for chat completions, prompt/completion rows for completions.
    The most recent ``request_log.limit`` rows are kept, and at most ``limit``.
    With ``project``, only that project's uploaded files and logged requests are read
    (another project's file is not found); ``None`` reads every project's.

    Raises:
        BadRequest: A bad name, a malformed file, or a log written without payloads.
        NotFound: No such dataset, or no logged request in the range.
        TooLarge: A registry dataset with more than ``limit`` rows.
    """
    from rayft.serving.request_log import log_rows, read_log

    if isinstance(dataset, str):
        return read_rows(dataset_path(dataset, root, project), limit)
    query = dataset.request_log
    served = query.model or model
    keep = min(n for n in (query.limit, limit) if n) if (query.limit or limit) else None

    def wanted(line: dict[str, Any]) -> bool:
        if line.get("status") != 200:  # only answered requests become rows
            return False
        return project is None or (line.get("project") or DEFAULT_PROJECT) == project

    # Each answered line gives a row per choice: the newest ``keep`` lines are enough,
    # and the log is read newest first until it has them.
    lines = read_log(root, served, query.since, query.until, keep, where=wanted)
    rows = log_rows(lines, served)
    return rows[-keep:] if keep else rows


def dataset_path(name: str, root: StorageRoot, project: str | None = None) -> Path:
    """The file of a dataset stored in the registry at ``<root>/datasets/<name>[.jsonl|.json]``.

    Under an object-storage root the file is read from there into the local mirror. An
    uploaded file (``POST /v1/files``) of a project other than ``project`` (when given)
    is not found; datasets placed in the registry by hand are shared.

    Raises:
        BadRequest: ``name`` is not one safe path component.
        NotFound: No such dataset.
        StorageError: The object-storage root cannot be read.
    """
    from rayft.trainers.registry import RegistryError, checked_name

    try:
        checked_name(name)
    except RegistryError as err:
        raise BadRequest(str(err), param="dataset") from None
    files = root.files.resolve()
    hidden = project is not None and upload_project(name, root) not in (None, project)
    for suffix in () if hidden else DATASET_SUFFIXES:
        root.sync_file(dataset_relpath(f"{name}{suffix}"))
        candidate = (files / f"{name}{suffix}").resolve()
        if (
            candidate.parent == files
            and candidate.is_file()
            and candidate.suffix in (".jsonl", ".json")
        ):
            return candidate
    raise NotFound(
        f"no dataset {name!r} in {files} (expected {name}.jsonl or {name}.json)",
        code="dataset_not_found",
        param="dataset",
    )


def upload_project(name: str, root: StorageRoot) -> str | None:
    """The project of the uploaded file ``name`` (``default`` for one uploaded before
    projects); ``None`` when ``name`` is no uploaded file."""
    raw = root.read(file_record_relpath(name))
    if raw is None:
        return None
    try:
        extra = json.loads(raw).get("rayft") or {}
        return extra.get("project") or DEFAULT_PROJECT
    except (ValueError, AttributeError):
        return DEFAULT_PROJECT  # an unreadable record: only default's keys and admins


def prepare_rows(
    rows: list[Any],
    tokenizer: Any,
    fmt: str = "auto",
    max_seq_len: int = 2048,
    want_loss: bool = True,
    want_generation: bool = False,
) -> PreparedRows:
    """Tokenize rows for the loss and split them into prompt and reference for generation.

    Raises:
        BadRequest: A row that fits no format, naming its index and the problem.
    """
    from rayft.trainers.formats import (
        ChatTemplateError,
        RowError,
        check_row,
        detect_format,
        tokenize_example,
    )

    scored: list[tuple[list[int], list[int]]] = []
    prompts: list[list[int]] = []
    references: list[str] = []
    dropped = 0
    for index, row in enumerate(rows):
        try:
            row_fmt = detect_format(row) if fmt == "auto" else fmt
            check_row(row, row_fmt)
            if want_loss:
                example = tokenize_example(row, row_fmt, tokenizer, max_seq_len, False)
                if example is None:
                    dropped += 1
                else:
                    scored.append((example["input_ids"], example["labels"]))
            if want_generation:
                split = prompt_and_reference(row, row_fmt, tokenizer)
                if split is not None:
                    prompts.append(split[0][-max_seq_len:])
                    references.append(split[1])
        except (RowError, ChatTemplateError, ValueError) as err:
            raise BadRequest(f"rows[{index}]: {err}", code="invalid_row", param="rows") from None
    return PreparedRows(scored, prompts, references, dropped)


def prompt_and_reference(
    row: dict[str, Any], fmt: str, tokenizer: Any
) -> tuple[list[int], str] | None:
    """Prompt token ids (everything before the last assistant turn) and that turn's text.

    Chat templates render the prompt with the generation prompt, as a client of
    ``/v1/chat/completions`` would send it. ``None`` for text rows, which have no answer.
    """
    from rayft.trainers.formats import plain_prompt, to_messages

    messages = to_messages(row, fmt)
    if messages is None:
        return None
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    reference = messages[last].get("content") or ""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            messages[:last], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids), reference
    split = plain_prompt(row, fmt)
    if split is None:
        return None
    return list(tokenizer(split[0])["input_ids"]), reference


def summarize(
    metrics: list[str],
    loss_sum: float,
    loss_tokens: int,
    predictions: list[str],
    references: list[str],
) -> dict[str, float]:
    """The requested metrics from the loss sums and the generated answers."""
    from rayft.serving.engine import perplexity
    from rayft.trainers.metrics import generation_metrics

    out: dict[str, float] = {}
    loss = loss_sum / loss_tokens if loss_tokens else float("nan")
    if "loss" in metrics:
        out["loss"] = loss
    if "perplexity" in metrics:
        out["perplexity"] = perplexity(loss) if loss_tokens else float("nan")
    wanted = [m for m in metrics if m in GENERATION_METRICS]
    if wanted:
        out.update(generation_metrics(predictions, references, wanted))
    return out
