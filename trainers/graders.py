"""Graders in OpenAI's JSON: one implementation for the grader endpoints, evals and rewards.

A grader (``string_check``, ``text_similarity``, ``python``, ``score_model``,
``label_model``, ``multi``) is parsed once into a typed model (``parse_grader``, fields as
in openai-python's ``openai.types.graders``) and scores one model sample against one
dataset item with ``grade``:

* ``string_check``: ``eq`` / ``ne`` (case-sensitive equality), ``like`` (the input contains
  the reference), ``ilike`` (the same, case-insensitive); 1.0 or 0.0.
* ``text_similarity``: ``fuzzy_match`` (rapidfuzz's ``fuzz.ratio`` when installed, else
  difflib's ``SequenceMatcher.ratio`` without the junk heuristic; both ``2*M/T``),
  ``bleu`` (sacrebleu, as ``trainers.metrics.bleu``), ``gleu`` (NLTK's sentence GLEU),
  ``meteor`` (NLTK; WordNet synonyms only where the WordNet corpus is installed, else exact
  and Porter-stem matches), ``rouge_1`` ... ``rouge_5`` and ``rouge_l`` (rouge-score's
  F-measure, as ``trainers.metrics.rouge``). ``cosine`` needs an embedding model, which
  rayft does not serve: it is refused when the grader is parsed.
* ``python``: ``grade(sample, item)`` run in a confined process
  (``trainers.grader_sandbox``).
* ``score_model`` / ``label_model``: the rendered messages go to a judge model through a
  ``Judge`` the caller supplies (the service's engine); its answer is read as OpenAI's
  structured output, ``{"result": ...}``, or a bare number / label.
* ``multi``: ``calculate_output`` over the named sub-graders' scores, evaluated by a small
  arithmetic evaluator (``Formula``), never ``eval``.

Templates: ``{{ item.<key>... }}`` and ``{{ sample.<field>... }}`` (``output_text``,
``output_json``, ``output_tools``, ``choices``), with ``.key`` and ``[index]`` steps. A
template is a path looked up in the two namespaces, never code: anything else in
``{{ }}`` is refused when the grader is parsed, and a path that is not in the data is an
``invalid_variable_error`` that scores 0. Strings render as they are, other values as
JSON.

A grader's fault never raises out of ``grade``: the score is 0 and ``GradeResult.errors``
says what happened, in the flags of OpenAI's ``metadata.errors``; with ``row`` given,
every error's details name the row.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from rayft.trainers import metrics
from rayft.trainers.grader_sandbox import SandboxLimits, run_python_grader
from rayft.trainers.validation_errors import is_type_tag

MAX_TEXT_CHARS = 1 << 20
"""Longest template or rendered text a grader takes."""
MAX_FORMULA_CHARS = 1000
MAX_SUB_GRADERS = 16

# ------------------------------------------------------------------ the grader JSON


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Grader(_Strict):
    name: str = Field(min_length=1, max_length=256)
    """The name of the grader."""


class StringCheckGrader(_Grader):
    """Compares ``input`` with ``reference`` (both templates) by ``operation``."""

    type: Literal["string_check"]
    input: str = Field(max_length=MAX_TEXT_CHARS)
    reference: str = Field(max_length=MAX_TEXT_CHARS)
    operation: Literal["eq", "ne", "like", "ilike"]


TextMetric = Literal[
    "cosine",
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
]


class TextSimilarityGrader(_Grader):
    """Scores ``input`` against ``reference`` by ``evaluation_metric``, in [0, 1]."""

    type: Literal["text_similarity"]
    input: str = Field(max_length=MAX_TEXT_CHARS)
    reference: str = Field(max_length=MAX_TEXT_CHARS)
    evaluation_metric: TextMetric
    pass_threshold: float | None = None
    """The evals API's passing score; graded the same."""

    @model_validator(mode="after")
    def _served_metric(self) -> TextSimilarityGrader:
        if self.evaluation_metric == "cosine":
            raise ValueError(
                "evaluation_metric 'cosine' compares embeddings from an embedding model, "
                "which this server does not serve; use rouge_l, bleu, meteor or fuzzy_match"
            )
        return self


class PythonGrader(_Grader):
    """Runs ``source``'s ``grade(sample, item)`` in a confined process."""

    type: Literal["python"]
    source: str = Field(min_length=1)
    image_tag: str | None = None
    """OpenAI's runtime image; rayft has one runtime and ignores it."""
    pass_threshold: float | None = None


class ContentPart(_Strict):
    """A text part of a message (images and audio are not served)."""

    type: Literal["input_text", "output_text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class Message(_Strict):
    """One input message of a model grader; its text may hold templates."""

    role: Literal["user", "assistant", "system", "developer"]
    content: str | ContentPart | list[ContentPart]
    type: Literal["message"] | None = None

    def text(self) -> str:
        """The message's text, parts joined."""
        if isinstance(self.content, str):
            return self.content
        parts = [self.content] if isinstance(self.content, ContentPart) else self.content
        return "".join(part.text for part in parts)


class SamplingParams(_Strict):
    """How the judge samples (``reasoning_effort`` is accepted and ignored)."""

    max_completions_tokens: int | None = Field(None, ge=1)
    reasoning_effort: str | None = None
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)


class ScoreModelGrader(_Grader):
    """Asks the judge ``model`` for a score within ``range`` (default [0, 1])."""

    type: Literal["score_model"]
    model: str = Field(min_length=1, max_length=512)
    input: list[Message] = Field(min_length=1, max_length=64)
    range: list[float] | None = Field(None, min_length=2, max_length=2)
    sampling_params: SamplingParams | None = None
    pass_threshold: float | None = None

    @model_validator(mode="after")
    def _ordered_range(self) -> ScoreModelGrader:
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"range {self.range} must be [low, high] with low < high")
        return self

    def bounds(self) -> tuple[float, float]:
        """The score range, ``(0, 1)`` by default."""
        low, high = self.range or (0.0, 1.0)
        return float(low), float(high)


class LabelModelGrader(_Grader):
    """Asks the judge ``model`` for one of ``labels``; 1.0 for a passing label."""

    type: Literal["label_model"]
    model: str = Field(min_length=1, max_length=512)
    input: list[Message] = Field(min_length=1, max_length=64)
    labels: list[str] = Field(min_length=1, max_length=256)
    passing_labels: list[str] = Field(min_length=1, max_length=256)

    @model_validator(mode="after")
    def _passing_subset(self) -> LabelModelGrader:
        unknown = [label for label in self.passing_labels if label not in self.labels]
        if unknown:
            raise ValueError(f"passing_labels {unknown} are not among labels {self.labels}")
        return self


SubGrader = Annotated[
    StringCheckGrader | TextSimilarityGrader | PythonGrader | ScoreModelGrader | LabelModelGrader,
    Field(discriminator="type"),
]


class MultiGrader(_Grader):
    """Scores by ``calculate_output`` over the scores of the named ``graders``.

    ``graders`` maps a name (a Python identifier, used in the formula) to a grader, as
    OpenAI's API takes it; one grader alone is named by its ``name``.
    """

    type: Literal["multi"]
    calculate_output: str = Field(min_length=1, max_length=MAX_FORMULA_CHARS)
    graders: dict[str, SubGrader] | SubGrader

    @model_validator(mode="after")
    def _formula_over_graders(self) -> MultiGrader:
        named = self.named()
        if not 1 <= len(named) <= MAX_SUB_GRADERS:
            raise ValueError(f"graders holds 1 to {MAX_SUB_GRADERS} graders, not {len(named)}")
        bad = [name for name in named if not name.isidentifier() or name in FUNCTIONS]
        if bad:
            raise ValueError(
                f"grader names {bad} cannot be used in calculate_output; name each "
                "grader with a Python identifier that is not a function name"
            )
        Formula(self.calculate_output, set(named))
        return self

    def named(self) -> dict[str, Any]:
        """The sub-graders by the name the formula uses."""
        if isinstance(self.graders, dict):
            return dict(self.graders)
        return {self.graders.name: self.graders}


Grader = Annotated[
    StringCheckGrader
    | TextSimilarityGrader
    | PythonGrader
    | ScoreModelGrader
    | LabelModelGrader
    | MultiGrader,
    Field(discriminator="type"),
]
GRADER_TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model", "multi")

_GRADER = TypeAdapter(Grader)


def judge_keys(grader: Any, key: str = "grader") -> list[tuple[str, str]]:
    """The judges a parsed grader asks, in order, as ``(dotted key, model)`` pairs;
    :func:`judge_models` gives the models alone, once each.

    ``key`` is where the grader sits (``grpo.grader`` in a job spec); a ``multi`` grader's
    judges are under ``graders.<name>`` (or ``graders`` when it holds one grader alone).
    """
    if isinstance(grader, (ScoreModelGrader, LabelModelGrader)):
        return [(f"{key}.model", grader.model)]
    if isinstance(grader, MultiGrader):
        subs = grader.graders
        prefix = f"{key}.graders"
        named = subs.items() if isinstance(subs, dict) else [(None, subs)]
        return [
            found
            for name, sub in named
            for found in judge_keys(sub, prefix if name is None else f"{prefix}.{name}")
        ]
    return []


class GraderError(ValueError):
    """A grader JSON that cannot be used; ``param`` is the dotted key at fault."""

    def __init__(self, message: str, param: str = "grader") -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def parse_grader(data: Any) -> Any:
    """The typed grader of OpenAI's grader JSON, its templates and formula checked.

    Raises:
        GraderError: The JSON is not a grader this server runs; the message and ``param``
            name the key to change (``grader.graders.a.operation``).
    """
    if not isinstance(data, dict) or data.get("type") not in GRADER_TYPES:
        got = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise GraderError(
            f"grader.type is {got!r}; expected one of {', '.join(GRADER_TYPES)}", "grader.type"
        )
    try:
        grader = _GRADER.validate_python(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(["grader", *(str(p) for p in first["loc"] if not _is_tag(p))])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise GraderError(f"{key}: {message}", key) from None
    for key, text in templates_of(grader):
        try:
            template_paths(text)
        except TemplateError as err:
            raise GraderError(f"{key}: {err}", key) from None
    return grader


def _is_tag(part: Any) -> bool:
    """Whether an error location part is pydantic's tag of a union member, not a key."""
    text = str(part)
    return part in GRADER_TYPES or is_type_tag(part) or "[" in text or text == "ContentPart"


def templates_of(grader: Any, prefix: str = "grader") -> list[tuple[str, str]]:
    """Every template text of ``grader`` with its dotted key."""
    if isinstance(grader, StringCheckGrader | TextSimilarityGrader):
        return [(f"{prefix}.input", grader.input), (f"{prefix}.reference", grader.reference)]
    if isinstance(grader, ScoreModelGrader | LabelModelGrader):
        return [(f"{prefix}.input.{i}.content", m.text()) for i, m in enumerate(grader.input)]
    if isinstance(grader, MultiGrader):
        found = []
        for name, sub in grader.named().items():
            found += templates_of(sub, f"{prefix}.graders.{name}")
        return found
    return []


def judge_models(grader: Any) -> list[str]:
    """The judge models ``grader`` asks (its sub-graders' too), in order, once each."""
    return list(dict.fromkeys(model for _, model in judge_keys(grader)))


# ------------------------------------------------------------------------ templates


class TemplateError(ValueError):
    """A ``{{ ... }}`` that is not a namespace path, or a path not in the data."""


_TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_STEP = re.compile(r"\.([A-Za-z_][A-Za-z0-9_\-]*)|\[(\d+)\]|\.(\d+)")
NAMESPACES = ("item", "sample")


def template_paths(text: str) -> list[tuple[str, list[str | int]]]:
    """The ``(namespace, steps)`` of every ``{{ ... }}`` in ``text``.

    Raises:
        TemplateError: A ``{{ ... }}`` holds anything but ``item`` or ``sample`` followed by
            ``.key`` / ``[index]`` steps.
    """
    return [_path(match.group(1).strip()) for match in _TEMPLATE.finditer(text)]


def _path(expression: str) -> tuple[str, list[str | int]]:
    root = expression.split(".", 1)[0].split("[", 1)[0]
    if root not in NAMESPACES:
        raise TemplateError(
            f"'{{{{ {expression[:80]} }}}}' is not a variable; templates name a path in "
            "item or sample, such as {{ item.answer }} or {{ sample.output_text }}"
        )
    rest, steps, at = expression[len(root) :], [], 0
    for match in _STEP.finditer(rest):
        if match.start() != at:
            break
        key, index, dotted_index = match.groups()
        steps.append(key if key is not None else int(index or dotted_index))
        at = match.end()
    if at != len(rest):
        raise TemplateError(
            f"'{{{{ {expression[:80]} }}}}' is not a path: use .key and [index] steps only"
        )
    return root, steps


def render(text: str, namespaces: Mapping[str, Any]) -> str:
    """``text`` with every ``{{ item... }}`` / ``{{ sample... }}`` replaced by its value.

    Raises:
        TemplateError: A template is not a path, or its path is not in the data.
    """

    def value(match: re.Match[str]) -> str:
        expression = match.group(1).strip()
        root, steps = _path(expression)
        found = lookup(namespaces.get(root), steps, expression)
        return found if isinstance(found, str) else json.dumps(found, ensure_ascii=False)

    rendered = _TEMPLATE.sub(value, text)
    if len(rendered) > MAX_TEXT_CHARS:
        raise TemplateError(f"the rendered text is over {MAX_TEXT_CHARS} characters")
    return rendered


def lookup(value: Any, steps: list[str | int], expression: str) -> Any:
    """Follow ``steps`` through dicts (keys) and lists (indexes) only, never attributes."""
    for step in steps:
        if isinstance(value, Mapping) and isinstance(step, str) and step in value:
            value = value[step]
        elif isinstance(value, list) and isinstance(step, int) and step < len(value):
            value = value[step]
        elif isinstance(value, Mapping) and isinstance(step, int) and str(step) in value:
            value = value[str(step)]
        else:
            raise TemplateError(f"{{{{ {expression} }}}} is not in the data (no {step!r})")
    return value


def sample_namespace(model_sample: str) -> dict[str, Any]:
    """The ``sample`` namespace of one model output, as OpenAI fills it.

    ``output_json`` is the parsed text when it is JSON, else ``None``.
    """
    try:
        parsed = json.loads(model_sample)
    except ValueError:
        parsed = None
    return {
        "output_text": model_sample,
        "output_json": parsed,
        "output_tools": [],
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": model_sample}},
        ],
    }


# -------------------------------------------------------------------------- results

ErrorKind = Literal[
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
]
ERROR_KINDS: tuple[str, ...] = ErrorKind.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class GradeIssue:
    """One thing that went wrong while grading: OpenAI's flag, and what to read."""

    kind: ErrorKind
    details: str
    grader: str
    server_error_type: str | None = None
    """For ``python_grader_server_error``: the limit broken (``timeout``, ``memory_limit``...)."""


@dataclass
class GradeResult:
    """One grading: the score, the sub-graders' scores (multi), and any issues.

    A grader's fault scores 0 and is listed in ``errors``; the score is always finite.
    """

    score: float
    sub_scores: dict[str, float] = field(default_factory=dict)
    errors: list[GradeIssue] = field(default_factory=list)
    token_usage: int = 0
    sampled_model_name: str | None = None
    execution_time: float = 0.0

    def metadata_errors(self) -> dict[str, Any]:
        """The errors as OpenAI's ``metadata.errors`` flags and details."""
        flags: dict[str, Any] = {kind: False for kind in ERROR_KINDS}
        flags |= {
            "model_grader_server_error_details": None,
            "python_grader_runtime_error_details": None,
            "python_grader_server_error_type": None,
        }
        for issue in self.errors:
            flags[issue.kind] = True
            if issue.kind == "model_grader_server_error":
                flags["model_grader_server_error_details"] = issue.details
            elif issue.kind == "python_grader_runtime_error":
                flags["python_grader_runtime_error_details"] = issue.details
            elif issue.kind == "python_grader_server_error":
                flags["python_grader_server_error_type"] = issue.server_error_type
        return flags


@dataclass(frozen=True)
class JudgeReply:
    """What a judge model answered, and the tokens it took (prompt and completion)."""

    text: str
    tokens: int = 0


class Judge(Protocol):
    """Runs a judge ``model`` on chat ``messages``; raises ``JudgeError`` when it cannot."""

    def __call__(
        self, model: str, messages: list[dict[str, str]], params: SamplingParams | None
    ) -> JudgeReply: ...


JUDGE_MAX_TOKENS = 512
"""The judge's answer length when its grader's ``sampling_params.max_completions_tokens`` is
not set (a server also caps it at its ``max_tokens_limit``)."""


class JudgeError(RuntimeError):
    """The judge model could not answer (not served, overloaded, failed)."""


@dataclass(frozen=True)
class GradeContext:
    """What grading needs besides the grader and the data."""

    judge: Judge | None = None
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    row: int | None = None


class _Fault(Exception):
    """A grader's fault inside ``grade``: scores 0 with ``issue``."""

    def __init__(self, kind: ErrorKind, details: str, server_error_type: str | None = None):
        super().__init__(details)
        self.kind, self.details, self.server_error_type = kind, details, server_error_type


def grade(
    grader: Any, model_sample: str, item: Any, context: GradeContext | None = None
) -> GradeResult:
    """Score ``model_sample`` against the dataset ``item`` with ``grader``.

    Args:
        grader: A parsed grader (``parse_grader``).
        model_sample: The model's output text (the ``sample`` namespace).
        item: The dataset row (the ``item`` namespace).
        context: The judge for model graders, the python sandbox's limits, and the row
            number that errors name.

    Returns:
        The score (0 when the grader failed, with ``errors`` saying why).
    """
    context = context or GradeContext()
    started = time.monotonic()
    namespaces = {"item": item, "sample": sample_namespace(model_sample)}
    result = GradeResult(score=0.0)
    if isinstance(grader, MultiGrader):
        _grade_multi(grader, namespaces, context, result)
    else:
        result.score = _graded(grader, namespaces, context, result)
    result.execution_time = time.monotonic() - started
    return result


def _graded(
    grader: Any, namespaces: Mapping[str, Any], context: GradeContext, result: GradeResult
) -> float:
    """One simple grader's score, or 0 with its fault added to ``result.errors``."""
    try:
        score = _SCORERS[type(grader)](grader, namespaces, context, result)
    except TemplateError as err:
        score, fault = 0.0, _Fault("invalid_variable_error", str(err))
    except _Fault as err:
        score, fault = 0.0, err
    else:
        return score
    where = f"row {context.row}: " if context.row is not None else ""
    details = f"{where}grader {grader.name!r}: {fault.details}"
    result.errors.append(GradeIssue(fault.kind, details, grader.name, fault.server_error_type))
    return score


def _string_check(grader: StringCheckGrader, ns: Mapping[str, Any], *_: Any) -> float:
    text, reference = render(grader.input, ns), render(grader.reference, ns)
    if grader.operation == "eq":
        return float(text == reference)
    if grader.operation == "ne":
        return float(text != reference)
    if grader.operation == "like":
        return float(reference in text)
    return float(reference.lower() in text.lower())


def _text_similarity(grader: TextSimilarityGrader, ns: Mapping[str, Any], *_: Any) -> float:
    return text_similarity(
        render(grader.input, ns), render(grader.reference, ns), grader.evaluation_metric
    )


def _python(grader: PythonGrader, ns: Mapping[str, Any], context: GradeContext, _: Any) -> float:
    outcome = run_python_grader(grader.source, ns["sample"], ns["item"], context.sandbox)
    if outcome.error in ("runtime_error", "bad_score", "crashed"):
        raise _Fault("python_grader_runtime_error", outcome.details or outcome.error)
    if outcome.error is not None:  # a limit: its name is the server error's type
        raise _Fault("python_grader_server_error", outcome.details or outcome.error, outcome.error)
    assert outcome.score is not None
    return outcome.score


def _score_model(
    grader: ScoreModelGrader, ns: Mapping[str, Any], context: GradeContext, result: GradeResult
) -> float:
    low, high = grader.bounds()
    instruction = (
        f"Grade the conversation. Reply with JSON only: "
        f'{{"steps": [{{"description": "...", "conclusion": "..."}}], "result": <a number '
        f"from {low:g} to {high:g}>}}"
    )
    answer = _ask(grader, ns, context, result, instruction)
    value = answer if isinstance(answer, int | float) and not isinstance(answer, bool) else None
    if value is None and isinstance(answer, str):
        try:
            value = float(answer.strip())
        except ValueError:
            value = None
    if value is None or not math.isfinite(value) or not low <= value <= high:
        raise _Fault(
            "model_grader_parse_error",
            f"the judge answered {str(answer)[:200]!r}, not a number in [{low:g}, {high:g}]",
        )
    return float(value)


def _label_model(
    grader: LabelModelGrader, ns: Mapping[str, Any], context: GradeContext, result: GradeResult
) -> float:
    instruction = (
        "Label the conversation with exactly one of "
        + json.dumps(grader.labels)
        + '. Reply with JSON only: {"steps": [{"description": "...", "conclusion": "..."}], '
        '"result": "<label>"}'
    )
    answer = _ask(grader, ns, context, result, instruction)
    label = answer.strip() if isinstance(answer, str) else answer
    if label not in grader.labels:
        raise _Fault(
            "model_grader_parse_error",
            f"the judge answered {str(answer)[:200]!r}, not one of {grader.labels}",
        )
    return float(label in grader.passing_labels)


def _ask(
    grader: ScoreModelGrader | LabelModelGrader,
    ns: Mapping[str, Any],
    context: GradeContext,
    result: GradeResult,
    instruction: str,
) -> Any:
    """The judge's ``result``: from ``{"result": ...}`` JSON, else the reply's text."""
    if context.judge is None:
        raise _Fault("model_grader_server_error", "no judge model is available here")
    messages = [{"role": "system", "content": instruction}]
    messages += [{"role": m.role, "content": render(m.text(), ns)} for m in grader.input]
    params = getattr(grader, "sampling_params", None)
    try:
        reply = context.judge(grader.model, messages, params)
    except JudgeError as err:
        raise _Fault("model_grader_server_error", str(err)) from None
    result.token_usage += reply.tokens
    result.sampled_model_name = grader.model
    text = reply.text.strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    return parsed.get("result") if isinstance(parsed, dict) else parsed


_SCORERS: dict[type, Callable[..., float]] = {
    StringCheckGrader: _string_check,
    TextSimilarityGrader: _text_similarity,
    PythonGrader: _python,
    ScoreModelGrader: _score_model,
    LabelModelGrader: _label_model,
}


def _grade_multi(
    grader: MultiGrader, ns: Mapping[str, Any], context: GradeContext, result: GradeResult
) -> None:
    for name, sub in grader.named().items():
        result.sub_scores[name] = _graded(sub, ns, context, result)
    where = f"row {context.row}: " if context.row is not None else ""
    try:
        score = Formula(grader.calculate_output, set(result.sub_scores)).evaluate(result.sub_scores)
    except FormulaError as err:
        kind = "formula_parse_error" if err.at_parse else "other_error"
        details = f"{where}grader {grader.name!r}: {err}"
        result.errors.append(GradeIssue(kind, details, grader.name))
        return
    result.score = score


# -------------------------------------------------------------------- text metrics


def text_similarity(text: str, reference: str, metric: str) -> float:
    """``metric`` of ``text`` against ``reference``, in [0, 1] (see the module's list).

    Raises:
        ValueError: ``metric`` is not one rayft computes (``cosine``, an unknown name).
    """
    if metric == "fuzzy_match":
        return fuzzy_match(text, reference)
    if metric == "bleu":
        return metrics.bleu([text], [reference])
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([reference.split()], text.split()))
    if metric == "meteor":
        return meteor(text, reference)
    if metric in ("rouge_1", "rouge_2", "rouge_l"):
        return metrics.rouge(text, reference)[metric]
    if metric in ("rouge_3", "rouge_4", "rouge_5"):
        kind = "rouge" + metric[-1]
        return float(_rouge_scorer(kind).score(reference, text)[kind].fmeasure)
    raise ValueError(f"evaluation_metric {metric!r} is not computed by this server")


def fuzzy_match(text: str, reference: str) -> float:
    """Normalised indel similarity ``2*M/T``: rapidfuzz's ``fuzz.ratio`` / 100 when
    installed, else difflib's ``SequenceMatcher`` (no junk heuristic)."""
    try:
        from rapidfuzz import fuzz
    except ImportError:
        if not text and not reference:
            return 1.0
        return difflib.SequenceMatcher(None, text, reference, autojunk=False).ratio()
    return float(fuzz.ratio(text, reference)) / 100.0


class _NoSynonyms:
    """WordNet's place in NLTK's METEOR when the WordNet corpus is not installed."""

    def synsets(self, *_: Any, **__: Any) -> list[Any]:
        return []


@lru_cache(maxsize=1)
def _wordnet() -> Any:
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except LookupError:
        return _NoSynonyms()
    return wordnet


def meteor(text: str, reference: str) -> float:
    """NLTK's METEOR on lower-cased whitespace tokens (synonyms only with WordNet installed)."""
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([reference.split()], text.split(), wordnet=_wordnet()))


@lru_cache(maxsize=3)
def _rouge_scorer(kind: str) -> Any:
    from rouge_score import rouge_scorer

    # The settings of trainers.metrics.rouge: no stemming.
    return rouge_scorer.RougeScorer([kind], use_stemmer=False)


# ------------------------------------------------------------------------ formulas


class FormulaError(ValueError):
    """A ``calculate_output`` that is not allowed (``at_parse``) or cannot be evaluated."""

    def __init__(self, message: str, at_parse: bool = True) -> None:
        super().__init__(message)
        self.at_parse = at_parse


FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min,
    "max": max,
    "abs": abs,
    "sqrt": math.sqrt,
    "log": math.log,
    "exp": math.exp,
    "floor": math.floor,
    "ceil": math.ceil,
}
_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
    ast.Mod: lambda a, b: a % b,
}
_UNARY = {ast.USub: lambda a: -a, ast.UAdd: lambda a: a}


class Formula:
    """An arithmetic formula over named scores: numbers, the names, ``+ - * / % **``,
    unary ``-``/``+`` and calls of ``FUNCTIONS``; every other construct is refused.

    Numbers are floats throughout, so ``9 ** 9 ** 9`` overflows at once instead of
    building a huge integer.
    """

    def __init__(self, source: str, names: set[str]) -> None:
        if len(source) > MAX_FORMULA_CHARS:
            raise FormulaError(f"calculate_output is over {MAX_FORMULA_CHARS} characters")
        try:
            tree = ast.parse(source, mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
            raise FormulaError(f"calculate_output {source[:100]!r} does not parse: {err}") from None
        self.tree, self.names = tree.body, names
        self._check(self.tree)

    def _check(self, node: ast.AST) -> None:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise FormulaError(f"calculate_output may hold numbers only, not {node.value!r}")
        elif isinstance(node, ast.Name):
            if node.id not in self.names:
                raise FormulaError(
                    f"calculate_output names {node.id!r}, which is not one of the graders "
                    f"{sorted(self.names)}"
                )
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            self._check(node.left)
            self._check(node.right)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            self._check(node.operand)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in FUNCTIONS
            and not node.keywords
            and node.args
        ):
            for arg in node.args:
                self._check(arg)
        else:
            raise FormulaError(
                f"calculate_output may use numbers, grader names, + - * / % ** and "
                f"{', '.join(FUNCTIONS)}; {ast.unparse(node)[:80]!r} is not allowed"
            )

    def evaluate(self, values: Mapping[str, float]) -> float:
        """The formula's value for ``values``; a finite float.

        Raises:
            FormulaError: Division by zero, a math domain error, overflow or a non-finite
                result (``at_parse`` False).
        """
        try:
            value = float(self._eval(self.tree, values))
        except (ArithmeticError, ValueError, TypeError) as err:
            raise FormulaError(f"calculate_output failed: {err}", at_parse=False) from None
        if not math.isfinite(value):
            raise FormulaError(f"calculate_output gave {value}", at_parse=False)
        return value

    def _eval(self, node: ast.AST, values: Mapping[str, float]) -> Any:
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return float(values[node.id])
        if isinstance(node, ast.BinOp):
            left, right = self._eval(node.left, values), self._eval(node.right, values)
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self._eval(node.operand, values))
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        args = [self._eval(arg, values) for arg in node.args]
        return FUNCTIONS[node.func.id](*args)
