"""The :class:`Objective` seam: what a training step minimises and what an evaluation reports.

The training loop (``trainers.loop``), the methods (``trainers.methods``) and the data
pipeline ask the worker's :class:`Objective` for the model to build, the PEFT task type and
any head that must always train, the row tokenizer and collate, the loss of a micro-batch
and the metrics of an evaluation. Supervised fine-tuning (:class:`CausalLMObjective`) is the
next-token loss of ``trainers.loss`` and lives here, as the defaults every objective starts
from; DPO lives in ``trainers.dpo`` and sequence classification in
``trainers.classification``. ``trainers.objectives`` registers them by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rayft.trainers.formats import tokenize_example
from rayft.trainers.loss import causal_lm_loss_sums, perplexity

if TYPE_CHECKING:
    from rayft.trainers.config import JobSpec
    from rayft.trainers.loop import Worker, WorkerInputs


class Objective:
    """The objective-specific parts of a training run; one instance per worker."""

    eval_keys: tuple[str, ...] = ("loss_sum", "count")
    """Keys of :meth:`eval_sums`, summed over batches and workers in this order."""
    peft_task_type: str = "CAUSAL_LM"
    """PEFT's ``task_type`` for a LoRA run of this objective."""

    def trainable_head(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters that train whatever the method freezes (a new head); none by default."""
        return []

    def load_model(self, spec: JobSpec, inputs: WorkerInputs) -> nn.Module:
        """The base model, before ``trainers.methods.prepare_model`` applies the method."""
        from transformers import AutoModelForCausalLM

        extra: dict[str, Any] = {}
        if spec.method == "qlora":
            from rayft.trainers.quantization import qlora_load_kwargs

            extra = qlora_load_kwargs(inputs.dtype)  # a 4-bit NF4 base on this worker's GPU
        return AutoModelForCausalLM.from_pretrained(
            inputs.model_dir,
            dtype=getattr(torch, inputs.dtype),
            attn_implementation="sdpa",
            **extra,
        )

    def row_tokenizer(self, spec: JobSpec) -> Callable[[dict[str, Any], str, Any], dict | None]:
        """``tokenize(row, fmt, tokenizer)`` for this objective's rows, run in Ray Data tasks.

        It returns ``input_ids``, ``labels`` and ``truncated`` (and any columns of the
        objective's own), or ``None`` for a row with nothing to learn from (counted as
        dropped); see ``trainers.formats.tokenize_example``.
        """
        max_seq_len, train_on_prompt = spec.data.max_seq_len, spec.data.train_on_prompt

        def tokenize(row: dict[str, Any], fmt: str, tokenizer: Any) -> dict[str, Any] | None:
            return tokenize_example(row, fmt, tokenizer, max_seq_len, train_on_prompt)

        return tokenize

    def prepare(self, worker: Worker) -> None:
        """Called once the DeepSpeed engine exists (e.g. to build a reference model)."""

    def collate(self, pad_id: int, spec: JobSpec) -> Any:
        """The ``collate_fn`` for this objective's Ray Data rows."""
        from rayft.trainers.packing import collate_fn

        return collate_fn(pad_id, spec.data.packing)

    def train_loss(self, worker: Worker, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Summed loss of one micro-batch (differentiable) and what it is a sum over.

        The step minimises ``total / count``; ``count`` also weights the logged loss.
        """
        engine = worker.engine
        return causal_lm_loss_sums(engine, engine.module.get_output_embeddings(), batch)

    def eval_sums(self, worker: Worker, batch: dict[str, Any]) -> dict[str, float]:
        """This batch's contribution to :attr:`eval_keys` (no autograd)."""
        engine = worker.engine
        total, count = causal_lm_loss_sums(engine, engine.module.get_output_embeddings(), batch)
        return {"loss_sum": float(total), "count": float(count)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The evaluation's metrics from the sums over the whole eval set."""
        loss = sums["loss_sum"] / max(sums["count"], 1.0)
        return {
            "eval_loss": loss,
            "eval_perplexity": perplexity(loss),
            "eval_tokens": int(sums["count"]),
        }


class CausalLMObjective(Objective):
    """Supervised fine-tuning: the next-token loss on the labelled tokens."""
