"""Rollout engines: rayft's serving engine, as Ray actors, sampling a GRPO run's answers.

A run of ``objective: grpo`` samples its groups of answers here, not with
``model.generate`` inside a training worker: ``grpo.rollout_workers`` actors each hold the
base model in a ``serving.engine.ModelEngine`` and decode every prompt of a batch
together (continuous batching, one forward pass per token for all rows). After each
optimizer step the policy reaches them through the engine's adapter reload
(``ModelEngine.set_adapter_weights``: the LoRA tensors, no file) or, for full weights, a
broadcast of the state dict (``set_base_weights``).

Rank 0 of the run's workers creates the actors, outside the run's placement group, and
owns them: they end with it. Every rank finds them by name. The driver hands the workers a
:class:`RolloutEngines` (``WorkerInputs.rollouts``), so the objective itself never imports
the serving engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayft.trainers.config import JobSpec

POLICY_ADAPTER = "policy"
"""The rollout engine's name for the policy's LoRA adapter."""
NAMESPACE = "rayft-rollouts"


@dataclass(frozen=True)
class Sampled:
    """One sampled answer: its token ids (end-of-turn token included when it stopped),
    its text, and why it ended (``stop`` or ``length``)."""

    token_ids: list[int]
    text: str
    finish_reason: str


class RolloutEngine:
    """A ``ModelEngine`` that answers batches of prompts with the run's current policy."""

    def __init__(self, model_dir: str, storage: str | None, dtype: str, batch: int) -> None:
        from rayft.serving.engine import ModelEngine

        self.engine = ModelEngine(
            model_dir, storage=storage, dtype=dtype, max_batch_size=max(1, batch)
        )
        self.adapter = False

    def set_adapter(self, config: dict[str, Any], weights: dict[str, Any]) -> None:
        """The policy's LoRA weights, after an optimizer step."""
        self.engine.set_adapter_weights(POLICY_ADAPTER, config, weights)
        self.adapter = True

    def set_base(self, weights: dict[str, Any]) -> None:
        """The policy's full weights, after an optimizer step."""
        self.engine.set_base_weights(weights)

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[Sampled]:
        """``n`` answers to each prompt, prompt-major (prompt 0's answers first).

        Answer ``j`` of prompt ``i`` draws from its own generator seeded ``seed + i * n + j``,
        so a resumed run samples what the interrupted one would have.
        """
        from rayft.serving.engine import BASE_ADAPTER, GenerationRequest, SamplingParams

        adapter = POLICY_ADAPTER if self.adapter else BASE_ADAPTER
        requests = [
            GenerationRequest(
                prompt_ids=tuple(int(t) for t in prompt),
                adapter=adapter,
                params=SamplingParams(
                    max_tokens=max_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    seed=seed + i * n + j,
                ),
            )
            for i, prompt in enumerate(prompts)
            for j in range(n)
        ]
        done = self.engine.generate(requests)
        return [Sampled(list(c.token_ids), c.text, c.finish_reason) for c in done]


def actor_name(run: str, index: int) -> str:
    return f"rayft-rollout-{run}-{index}"


def start_engines(spec: JobSpec, run: str, model_dir: str, dtype: str, batch: int) -> list[Any]:
    """Create the run's rollout engines (rank 0), outside the run's placement group."""
    import ray

    grpo = spec.grpo
    remote = ray.remote(RolloutEngine)
    actors = [
        remote.options(
            name=actor_name(run, index),
            namespace=NAMESPACE,
            get_if_exists=True,
            num_cpus=grpo.rollout_cpus,
            num_gpus=grpo.rollout_gpus,
            scheduling_strategy="DEFAULT",
            max_concurrency=1,
        ).remote(model_dir, spec.storage, dtype, batch)
        for index in range(grpo.rollout_workers)
    ]
    # Wait for every engine to hold its model, so a failure to start surfaces here.
    ray.get([a.__ray_ready__.remote() for a in actors])
    return actors


def find_engine(spec: JobSpec, run: str, rank: int) -> Any:
    """The rollout engine of worker ``rank`` (``rank % grpo.rollout_workers``)."""
    import ray

    return ray.get_actor(actor_name(run, rank % spec.grpo.rollout_workers), namespace=NAMESPACE)


@dataclass(frozen=True)
class RolloutEngines:
    """Starts (rank 0) and finds (every rank) a run's rollout engines, for the objective."""

    def start(self, spec: JobSpec, run: str, model_dir: str, dtype: str, batch: int) -> list[Any]:
        return start_engines(spec, run, model_dir, dtype, batch)

    def find(self, spec: JobSpec, run: str, rank: int) -> Any:
        return find_engine(spec, run, rank)
