"""What an eval run's grades mean: pass or fail per criterion, per item, and the counts.

* ``string_check``: passes when the check holds (score 1).
* ``label_model``: passes when the judge's label is one of ``passing_labels`` (score 1).
* ``text_similarity``, ``python``, ``score_model``: pass at ``score >= pass_threshold``;
  without one (``python``, ``score_model``), at the middle of the score range (0.5 for
  ``python``, ``(low + high) / 2`` for ``score_model``).

A criterion that failed while grading (``GradeResult.errors``: a raising python grader, a
judge answer that does not parse, a template naming a key the item lacks) is *errored*,
not failed. An output item passes when every criterion passes, is errored when its sample
could not be made or any criterion errored, and fails otherwise. ``result_counts`` counts
items; ``per_testing_criteria_results`` counts each criterion (errored as failed, as
OpenAI's object has no errored field there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rayft.trainers.graders import (
    GradeResult,
    LabelModelGrader,
    ScoreModelGrader,
    StringCheckGrader,
)

ItemStatus = Literal["pass", "fail", "error"]

GRADER_KINDS = {
    "string_check": "string-check-grader",
    "text_similarity": "text-similarity-grader",
    "python": "python-grader",
    "score_model": "score-model-grader",
    "label_model": "label-model-grader",
}
"""The ``type`` OpenAI writes in an output item's result, per grader type."""


def pass_threshold(grader: Any) -> float | None:
    """The score at or above which ``grader`` passes; ``None`` for the pass/fail graders."""
    if isinstance(grader, StringCheckGrader | LabelModelGrader):
        return None
    if grader.pass_threshold is not None:
        return float(grader.pass_threshold)
    if isinstance(grader, ScoreModelGrader):
        low, high = grader.bounds()
        return (low + high) / 2
    return 0.5


def passes(grader: Any, score: float) -> bool:
    """Whether ``score`` passes ``grader`` (see the module's list)."""
    threshold = pass_threshold(grader)
    if threshold is None:
        return score == 1.0
    return score >= threshold


@dataclass(frozen=True)
class CriterionResult:
    """One criterion's grade of one item."""

    name: str
    type: str
    score: float
    passed: bool
    errored: bool
    errors: tuple[str, ...] = ()
    judge_model: str | None = None
    """The judge model a model grader asked, and the tokens it took."""
    judge_tokens: int = 0

    def result_object(self) -> dict[str, Any]:
        """The item's ``results`` entry, as OpenAI's ``Result`` (its extra fields kept)."""
        return {
            "name": self.name,
            "type": GRADER_KINDS.get(self.type, self.type),
            "score": self.score,
            "passed": self.passed,
            "sample": None,
            "errors": list(self.errors),
        }


def criterion_result(grader: Any, result: GradeResult) -> CriterionResult:
    """``result`` of ``grader`` as a pass, a fail or an error."""
    errored = bool(result.errors)
    return CriterionResult(
        name=grader.name,
        type=grader.type,
        score=result.score,
        passed=not errored and passes(grader, result.score),
        errored=errored,
        errors=tuple(issue.details for issue in result.errors),
        judge_model=result.sampled_model_name,
        judge_tokens=result.token_usage,
    )


def item_status(results: list[CriterionResult], sample_failed: bool) -> ItemStatus:
    """``error`` if the sample failed or a criterion errored, ``pass`` if all passed."""
    if sample_failed or any(r.errored for r in results):
        return "error"
    return "pass" if all(r.passed for r in results) else "fail"


@dataclass
class Tally:
    """Running counts of a run, in the criteria's order."""

    criteria: list[str]
    passed: int = 0
    failed: int = 0
    errored: int = 0
    per_criterion: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.per_criterion = {name: [0, 0] for name in self.criteria}

    def add(self, status: ItemStatus, results: list[CriterionResult]) -> None:
        """Count one item and each of its criteria."""
        if status == "pass":
            self.passed += 1
        elif status == "fail":
            self.failed += 1
        else:
            self.errored += 1
        for result in results:
            self.per_criterion[result.name][0 if result.passed else 1] += 1

    def result_counts(self) -> dict[str, int]:
        """OpenAI's ``result_counts``."""
        total = self.passed + self.failed + self.errored
        return {
            "total": total,
            "passed": self.passed,
            "failed": self.failed,
            "errored": self.errored,
        }

    def per_testing_criteria_results(self) -> list[dict[str, Any]]:
        """OpenAI's ``per_testing_criteria_results``, one entry per criterion."""
        return [
            {"testing_criteria": name, "passed": counts[0], "failed": counts[1]}
            for name, counts in self.per_criterion.items()
        ]


@dataclass
class ModelUsage:
    """Tokens one model used in a run (the sampled model, or a judge)."""

    model_name: str
    invocation_count: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, prompt_tokens: int, completion_tokens: int, total: int | None = None) -> None:
        self.invocation_count += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.total_tokens += prompt_tokens + completion_tokens if total is None else total

    def usage_object(self) -> dict[str, Any]:
        """OpenAI's ``per_model_usage`` entry."""
        return {
            "model_name": self.model_name,
            "invocation_count": self.invocation_count,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": 0,
        }
