"""The objectives rayft trains, registered by the name ``JobSpec.objective`` takes.

A new objective is a module with an :class:`~rayft.trainers.objective.Objective` subclass
and one line in :data:`OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rayft.trainers.classification import ClassificationObjective
from rayft.trainers.dpo import DpoObjective
from rayft.trainers.objective import CausalLMObjective, Objective

if TYPE_CHECKING:
    from rayft.trainers.config import JobSpec

OBJECTIVES: dict[str, Callable[[JobSpec], Objective]] = {
    "sft": lambda spec: CausalLMObjective(),
    "dpo": DpoObjective,
    "classification": ClassificationObjective,
}
"""``JobSpec.objective`` -> the objective of a run of that spec."""


def objective_for(spec: JobSpec) -> Objective:
    """The :class:`Objective` of ``spec.objective``."""
    return OBJECTIVES[spec.objective](spec)
