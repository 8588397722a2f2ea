"""The bodies of OpenAI's evals API, checked once: an eval's config and criteria, a run's
data source, its rows, and the messages a ``completions`` run samples from.

    POST /v1/evals              {name, metadata, data_source_config, testing_criteria}
    POST /v1/evals/{id}/runs    {name, metadata, data_source: jsonl | completions}

Every body is a typed model (unknown keys refused); ``parse_eval`` / ``parse_run`` turn
pydantic's errors into a 400 whose ``param`` is the dotted key to change
(``testing_criteria.0.operation``, ``data_source.sampling_params.temperature``). Testing
criteria are the graders of ``trainers.graders`` (one implementation with
``/v1/fine_tuning/alpha/graders``), limited to the five kinds OpenAI's evals take.

Rows are OpenAI's: ``{"item": {...}, "sample": {...}}`` with ``sample`` optional, inline
(``file_content``) or in an uploaded file (``file_id``, purpose ``evals``, checked row by
row at upload by ``scan_eval_rows``). A ``fine-tune`` file's rows (``{"messages": ...}``)
are items as they are, so a validation file can be evaluated with ``item_reference``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rayft.serving.errors import BadRequest
from rayft.trainers.data import DataError, SourceReport
from rayft.trainers.graders import (
    GraderError,
    TemplateError,
    lookup,
    parse_grader,
    render,
    template_paths,
    templates_of,
)
from rayft.trainers.validation_errors import error_key

CRITERION_TYPES = ("label_model", "string_check", "text_similarity", "python", "score_model")
"""The graders an eval's ``testing_criteria`` may hold (OpenAI's list; no ``multi``)."""
THRESHOLD_TYPES = ("text_similarity", "python", "score_model")
MAX_NAME_CHARS = 256
MAX_METADATA_KEYS = 16
MAX_ITEM_SCHEMA_BYTES = 64 * 1024
MAX_ROW_BYTES = 4 * 1024 * 1024
MAX_TEMPLATE_MESSAGES = 64
ROLES = ("user", "assistant", "system", "developer")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


Metadata = dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]

# -------------------------------------------------------------------------- the eval


class CustomConfig(_Strict):
    """``data_source_config`` of type ``custom``: the JSON schema of a row's ``item``."""

    type: Literal["custom"]
    item_schema: dict[str, Any]
    include_sample_schema: bool = False


class EvalCreate(_Strict):
    """The body of ``POST /v1/evals``; ``testing_criteria`` are checked by ``parse_grader``."""

    name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    metadata: Metadata | None = Field(None, max_length=MAX_METADATA_KEYS)
    data_source_config: CustomConfig
    testing_criteria: list[dict[str, Any]] = Field(min_length=1)


class EvalUpdate(_Strict):
    """The body of ``POST /v1/evals/{id}``: a new name and/or metadata."""

    name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    metadata: Metadata | None = Field(None, max_length=MAX_METADATA_KEYS)


def parse_eval(body: Any, max_criteria: int) -> tuple[EvalCreate, list[Any]]:
    """The typed body and the parsed graders of its ``testing_criteria``.

    Raises:
        BadRequest: Naming the key at fault (``param``): an unknown key, a config other
            than ``custom``, a grader this server does not run, more than ``max_criteria``
            criteria, two criteria of one name, or ``text_similarity`` without
            ``pass_threshold``.
    """
    if isinstance(body, dict):
        kind = body.get("data_source_config")
        kind = kind.get("type") if isinstance(kind, dict) else None
        if kind in ("logs", "stored_completions"):
            raise BadRequest(
                f"data_source_config.type {kind!r} reads stored completions, which this server "
                "does not keep; use type 'custom' with an item_schema and upload the rows",
                code="unsupported_data_source",
                param="data_source_config.type",
            )
    create = _validated(EvalCreate, body)
    schema = create.data_source_config.item_schema
    if len(json.dumps(schema)) > MAX_ITEM_SCHEMA_BYTES:
        raise BadRequest(
            f"item_schema is over {MAX_ITEM_SCHEMA_BYTES} bytes of JSON",
            param="data_source_config.item_schema",
        )
    criteria = create.testing_criteria
    if len(criteria) > max_criteria:
        raise BadRequest(
            f"testing_criteria holds {len(criteria)} graders; this server allows at most "
            f"{max_criteria} per eval",
            code="eval_limit_exceeded",
            param="testing_criteria",
        )
    graders = [parse_criterion(c, f"testing_criteria.{i}") for i, c in enumerate(criteria)]
    names = [g.name for g in graders]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise BadRequest(
                f"two testing criteria are named {name!r}; give each a name of its own, which "
                "the run's results use",
                param=f"testing_criteria.{i}.name",
            )
    return create, graders


def parse_criterion(data: Any, key: str) -> Any:
    """One testing criterion as a typed grader (400 naming ``key``.<field> when bad)."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in CRITERION_TYPES:
        raise BadRequest(
            f"{key}.type is {kind!r}; an eval's testing criteria are one of "
            f"{', '.join(CRITERION_TYPES)}",
            code="invalid_grader",
            param=f"{key}.type",
        )
    try:
        grader = parse_grader(data)
    except GraderError as err:
        param = key + err.param.removeprefix("grader")
        message = err.message.replace(err.param, param, 1)
        raise BadRequest(message, code="invalid_grader", param=param) from None
    if kind == "text_similarity" and grader.pass_threshold is None:
        raise BadRequest(
            f"{key}.pass_threshold is required for a text_similarity criterion",
            code="invalid_grader",
            param=f"{key}.pass_threshold",
        )
    return grader


def parse_update(body: Any) -> EvalUpdate:
    """The typed body of an eval update (400 naming the key when bad)."""
    return _validated(EvalUpdate, body)


def config_object(config: CustomConfig) -> dict[str, Any]:
    """``data_source_config`` as OpenAI shows it: the JSON schema of a whole row."""
    properties: dict[str, Any] = {"item": config.item_schema}
    required = ["item"]
    if config.include_sample_schema:
        properties["sample"] = {
            "type": "object",
            "properties": {
                "output_text": {"type": "string"},
                "output_json": {"type": "object"},
                "output_tools": {"type": "array"},
                "choices": {"type": "array"},
            },
            "required": ["output_text"],
        }
        required.append("sample")
    return {
        "type": "custom",
        "schema": {"type": "object", "properties": properties, "required": required},
    }


# --------------------------------------------------------------------------- the run


class FileIdSource(_Strict):
    type: Literal["file_id"]
    id: str = Field(min_length=1, max_length=128)


class ContentRow(_Strict):
    item: dict[str, Any]
    sample: dict[str, Any] | None = None


class FileContentSource(_Strict):
    type: Literal["file_content"]
    content: list[ContentRow] = Field(min_length=1)


Source = Annotated[FileIdSource | FileContentSource, Field(discriminator="type")]


class JsonlDataSource(_Strict):
    """Rows whose samples are given (``sample`` of each row, or fields of its item)."""

    type: Literal["jsonl"]
    source: Source


class TextPart(_Strict):
    type: Literal["input_text", "output_text"]
    text: str


class TemplateMessage(_Strict):
    """One message of an ``input_messages`` template; its text may hold ``{{ item.x }}``."""

    role: Literal["user", "assistant", "system", "developer"]
    content: str | TextPart | list[TextPart]
    type: Literal["message"] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = [self.content] if isinstance(self.content, TextPart) else self.content
        return "".join(part.text for part in parts)


class TemplateInput(_Strict):
    type: Literal["template"]
    template: list[TemplateMessage] = Field(min_length=1, max_length=MAX_TEMPLATE_MESSAGES)


class ItemReferenceInput(_Strict):
    type: Literal["item_reference"]
    item_reference: str = Field(min_length=1, max_length=256)


InputMessages = Annotated[TemplateInput | ItemReferenceInput, Field(discriminator="type")]


class RunSampling(_Strict):
    """``sampling_params`` of a ``completions`` run (``reasoning_effort`` is ignored)."""

    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    reasoning_effort: str | None = Field(None, max_length=32)


class CompletionsDataSource(_Strict):
    """Rows whose samples a model or adapter this server serves writes."""

    type: Literal["completions"]
    source: Source
    model: str = Field(min_length=1, max_length=512)
    input_messages: InputMessages
    sampling_params: RunSampling = Field(default_factory=RunSampling)


DataSource = Annotated[JsonlDataSource | CompletionsDataSource, Field(discriminator="type")]


class RunCreate(_Strict):
    """The body of ``POST /v1/evals/{id}/runs``."""

    name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    metadata: Metadata | None = Field(None, max_length=MAX_METADATA_KEYS)
    data_source: DataSource


def parse_run(body: Any) -> RunCreate:
    """The typed run body (400 naming the key when bad; ``responses`` runs are refused)."""
    source = body.get("data_source") if isinstance(body, dict) else None
    kind = source.get("type") if isinstance(source, dict) else None
    inner = source.get("source") if isinstance(source, dict) else None
    inner = inner.get("type") if isinstance(inner, dict) else None
    if kind == "responses" or inner in ("responses", "stored_completions"):
        param = "data_source.type" if kind == "responses" else "data_source.source.type"
        raise BadRequest(
            f"{param} {kind if kind == 'responses' else inner!r} samples stored responses, "
            "which this server does not keep; use a 'completions' run on a model it serves, "
            "or a 'jsonl' run with the samples in the rows",
            code="unsupported_data_source",
            param=param,
        )
    run = _validated(RunCreate, body)
    data = run.data_source
    if isinstance(data, CompletionsDataSource) and isinstance(data.input_messages, TemplateInput):
        for i, message in enumerate(data.input_messages.template):
            _item_only(message.text(), f"data_source.input_messages.template.{i}.content")
    if isinstance(data, CompletionsDataSource) and isinstance(
        data.input_messages, ItemReferenceInput
    ):
        reference = reference_path(data.input_messages.item_reference)
        _item_only("{{ " + reference + " }}", "data_source.input_messages.item_reference")
    return run


def _item_only(text: str, key: str) -> None:
    """Templates of a sampling prompt may name the ``item`` namespace only."""
    try:
        paths = template_paths(text)
    except TemplateError as err:
        raise BadRequest(f"{key}: {err}", param=key) from None
    if any(namespace != "item" for namespace, _ in paths):
        raise BadRequest(
            f"{key}: the model's prompt may use {{{{ item.<key> }}}} only; the sample does not "
            "exist before the model writes it",
            param=key,
        )


def _validated(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_request")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        key = _dotted(error_key(first["loc"], model))
        message = str(first["msg"]).removeprefix("Value error, ")
        raise BadRequest(f"{key or 'body'}: {message}", param=key or None) from None


def _dotted(key: str) -> str:
    """``error_key`` less the union tags of this module's sources and inputs."""
    tags = {"file_id", "file_content", "jsonl", "completions", "template", "item_reference"}
    tags |= {"str", "TextPart", "list[TextPart]"}
    return ".".join(part for part in key.split(".") if part not in tags)


def uses_sample(graders: list[Any]) -> bool:
    """Whether any criterion's template reads the ``sample`` namespace."""
    for grader in graders:
        for _, text in templates_of(grader):
            if any(namespace == "sample" for namespace, _ in template_paths(text)):
                return True
    return False


# -------------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Row:
    """One data-source row: its item, and its given sample's output text (jsonl runs)."""

    item: dict[str, Any]
    sample: dict[str, Any] | None = None

    @property
    def output_text(self) -> str:
        """The given sample's text (``output_text``, else its first choice's content)."""
        if self.sample is None:
            return ""
        text = self.sample.get("output_text")
        if isinstance(text, str):
            return text
        try:
            content = lookup(self.sample, ["choices", 0, "message", "content"], "sample")
        except TemplateError:
            return ""
        return content if isinstance(content, str) else ""


def row_of(value: Any) -> Row:
    """A row from a parsed line: ``{"item", "sample"?}``, or any other object as the item.

    Raises:
        ValueError: The line is not an object, or its ``item``/``sample`` is not one.
    """
    if not isinstance(value, dict):
        raise ValueError(f"a row is a JSON object, not {type(value).__name__}")
    if "item" in value and set(value) <= {"item", "sample"}:
        item, sample = value["item"], value.get("sample")
        if not isinstance(item, dict):
            raise ValueError("the row's item is not a JSON object")
        if sample is not None and not isinstance(sample, dict):
            raise ValueError("the row's sample is not a JSON object")
        return Row(item, sample)
    return Row(value)


def read_rows(path: Path, limit: int) -> list[Row]:
    """The rows of a stored JSON lines (or JSON array) file, at most ``limit`` of them.

    Raises:
        BadRequest: A row that is not an object (naming its line), or more rows than
            ``limit`` (``eval_limit_exceeded``).
    """
    rows = []
    for line, value in _values(path):
        if len(rows) == limit:
            raise BadRequest(
                f"the file has more than {limit} rows; this server grades at most {limit} "
                "rows per eval run",
                code="eval_limit_exceeded",
                param="data_source.source",
            )
        try:
            rows.append(row_of(value))
        except ValueError as err:
            raise BadRequest(f"line {line}: {err}", param="data_source.source") from None
    return rows


def _values(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as handle:
        head = handle.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        values = json.loads(path.read_bytes().decode("utf-8-sig"))
        yield from enumerate(values if isinstance(values, list) else [values], start=1)
        return
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, json.loads(line)


def scan_eval_rows(path: Path, suffix: str) -> SourceReport:
    """Check an ``evals`` upload: every line one ``{"item": {...}, "sample"?: {...}}``.

    Raises:
        DataError: Naming the line that is not JSON or not such an object.
    """
    digest, rows, blank = hashlib.sha256(), 0, 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            digest.update(raw)
            if not raw.strip():
                blank += 1
                continue
            if suffix == ".json" and number == 1 and raw.lstrip().startswith(b"["):
                raise DataError(
                    f"{path}: an evals file is JSON lines, one {{'item': ...}} object per line"
                )
            if len(raw) > MAX_ROW_BYTES:
                raise DataError(f"{path}:{number}: the line is over {MAX_ROW_BYTES} bytes")
            try:
                value = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except (ValueError, UnicodeDecodeError) as err:
                raise DataError(f"{path}:{number}: not a JSON line: {err}") from None
            except RecursionError:
                raise DataError(f"{path}:{number}: JSON nested too deeply to read") from None
            if not (
                isinstance(value, dict) and "item" in value and set(value) <= {"item", "sample"}
            ):
                raise DataError(
                    f"{path}:{number}: an evals row is {{'item': {{...}}, 'sample': {{...}}}} "
                    "(sample optional)"
                )
            try:
                row_of(value)
            except ValueError as err:
                raise DataError(f"{path}:{number}: {err}") from None
            rows += 1
    if rows == 0:
        raise DataError(f"{path}: the file holds no rows")
    return SourceReport(str(path), "evals", rows, blank, digest.hexdigest())


# -------------------------------------------------------------------- the model's prompt


class MessageError(ValueError):
    """A row whose prompt cannot be built (a missing item key, a bad item_reference)."""


def render_messages(inputs: TemplateInput | ItemReferenceInput, item: Any) -> list[dict[str, str]]:
    """The chat messages a ``completions`` run sends the model for ``item``.

    A template's ``{{ item.x }}`` are filled in (``developer`` is sent as ``system``); an
    ``item_reference`` names a list of ``{role, content}`` messages in the item.

    Raises:
        MessageError: A template names a key the item lacks, or the reference is not a
            list of messages with a known role and text content.
    """
    if isinstance(inputs, TemplateInput):
        try:
            return [
                {"role": _role(m.role), "content": render(m.text(), {"item": item})}
                for m in inputs.template
            ]
        except TemplateError as err:
            raise MessageError(str(err)) from None
    reference = reference_path(inputs.item_reference)
    try:
        path = template_paths("{{ " + reference + " }}")[0][1]
        found = lookup(item, path, reference)
    except TemplateError as err:
        raise MessageError(str(err)) from None
    if not isinstance(found, list) or not found:
        raise MessageError(f"{reference} is not a non-empty list of messages")
    messages = []
    for i, message in enumerate(found):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise MessageError(f"{reference}[{i}] is not a {{role, content}} message with text")
        messages.append({"role": _role(role), "content": content})
    return messages


def reference_path(reference: str) -> str:
    """``item.x`` of an ``item_reference`` given as ``item.x`` or ``{{ item.x }}``."""
    return reference.strip().removeprefix("{{").removesuffix("}}").strip()


def _role(role: str) -> str:
    return "system" if role == "developer" else role
