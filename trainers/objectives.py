"""The objectives rayft trains, registered by the name ``JobSpec.objective`` takes.

A new objective is a module with an :class:`~rayft.trainers.objective.Objective` subclass
and one line in :data:`OBJECTIVES`. Importing this table loads no torch: the spec's checks
(``trainers.config``) ask it on every validation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rayft.trainers.classification import ClassificationObjective
from rayft.trainers.dpo import DpoObjective
from rayft.trainers.grpo import GrpoObjective
from rayft.trainers.objective import CausalLMObjective, Objective

if TYPE_CHECKING:
    from rayft.trainers.config import JobSpec

OBJECTIVES: dict[str, type[Objective]] = {
    "sft": CausalLMObjective,
    "dpo": DpoObjective,
    "classification": ClassificationObjective,
    "grpo": GrpoObjective,
}
"""``JobSpec.objective`` -> the objective of a run of that spec."""


def objective_class(spec: JobSpec) -> type[Objective]:
    """The :class:`Objective` subclass of ``spec.objective``, for the hooks asked before
    training (its class methods and attributes), where no instance can be made yet."""
    return OBJECTIVES[spec.objective]


def objective_for(spec: JobSpec) -> Objective:
    """The :class:`Objective` of ``spec.objective``."""
    return objective_class(spec)(spec)
