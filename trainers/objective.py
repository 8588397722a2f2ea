"""The :class:`Objective` seam: what a training step minimises and what an evaluation reports.

The training loop (``trainers.loop``), the methods (``trainers.methods``), the data
pipeline and scan (``trainers.data``), the driver (``trainers.driver``) and the spec's
checks (``trainers.config``) ask the run's :class:`Objective` for everything that differs
between objectives: the spec's combinations it refuses, the data formats it trains on, its
own row check in the data scan, what the scan's findings add to the spec, the model to
build, the PEFT task type and any head that must always train, the row tokenizer and
collate, the loss of a micro-batch, the metrics of an evaluation and the manifest's fields.
None of them names an objective.

Supervised fine-tuning (:class:`CausalLMObjective`) is the next-token loss of
``trainers.loss`` and lives here, as the defaults every objective starts from; DPO lives in
``trainers.dpo`` and sequence classification in ``trainers.classification``.
``trainers.objectives`` registers them by name.

The hooks asked before training (the class methods and attributes) need no torch: torch and
the modules built on it are imported where a worker uses them, so ``rayft validate`` stays
light.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from rayft.trainers.formats import tokenize_example

if TYPE_CHECKING:
    import torch
    from torch import nn

    from rayft.trainers.config import JobSpec
    from rayft.trainers.data import SourceScan
    from rayft.trainers.loop import Worker, WorkerInputs

Problems = list[tuple[str, str]]
"""``(dotted_key, message)`` pairs, as ``trainers.config.ConfigError`` holds them."""


class RowCheck(Protocol):
    """An objective's own check of every row in the data scan (``trainers.data.scan_source``).

    It replaces the format checks of ``data.format``: the scan reports its rows as
    :attr:`format` and calls :meth:`check` on each.
    """

    format: str
    """The format the scan reports for these rows (also what the row tokenizer is given)."""
    described: str
    """How a refused row's message names the check, e.g. ``objective x``."""

    def check(self, row: dict[str, Any]) -> None:
        """Check one row (a JSON object); raises ``trainers.formats.RowError``."""
        ...

    def labels(self) -> list[str]:
        """The label names the rows carry, in class-id order (``[]`` for unlabelled rows)."""
        ...


class Objective:
    """The objective-specific parts of a training run; one instance per worker."""

    eval_keys: tuple[str, ...] = ("loss_sum", "count")
    """Keys of :meth:`eval_sums`, summed over batches and workers in this order."""
    peft_task_type: str = "CAUSAL_LM"
    """PEFT's ``task_type`` for a LoRA run of this objective."""
    generation_metrics: bool = True
    """Whether ``eval.metrics`` (scores of generated answers) applies to this objective."""
    language_model: bool = True
    """Whether the model answers in text, so ``eval.general`` can score it."""
    scan_tokenizes: bool = True
    """Whether the data scan tokenizes every row (``trainers.data.scan_rows``) to count what
    the row tokenizer keeps; rows that cannot lose their label to truncation are counted."""

    def __init__(self, spec: JobSpec) -> None:
        """One objective for the run of ``spec``, on a worker or in a Ray Data task."""

    # ------------------------------------------------------------------ before training

    @classmethod
    def spec_problems(cls, spec: JobSpec) -> Problems:
        """What this objective refuses in ``spec`` (it is ``spec.objective``).

        ``trainers.config.validate_spec`` reports them with the schema's own problems.
        Preference rows train with DPO only.
        """
        if spec.data.format == "preference":
            return [("data.format", "preference rows (chosen/rejected) train with objective dpo")]
        return []

    @classmethod
    def judges(cls, spec: JobSpec) -> list[tuple[str, str]]:
        """The judge models ``spec`` names, as ``(dotted key, model)`` pairs: none for SFT;
        GRPO's model graders'. The driver and the API check that each loads before Ray
        starts (``trainers.rollout.check_judges``)."""
        return []

    @classmethod
    def format_problem(cls, fmt: str) -> str | None:
        """Why this objective cannot train on rows of format ``fmt`` (found by the data scan),
        or ``None``; the scan puts the first row's ``file:line`` in front."""
        if fmt == "preference":
            return (
                "a preference row (chosen/rejected) trains with objective: dpo; set "
                "objective=dpo, or give rows with one answer each"
            )
        return None

    @classmethod
    def row_check(cls, spec: JobSpec) -> RowCheck | None:
        """This objective's own check of every row, or ``None`` to check ``data.format``."""
        return None

    @classmethod
    def with_scan(cls, spec: JobSpec, scanned: SourceScan, say: Callable[[str], None]) -> JobSpec:
        """The run's spec completed by what the data scan found (on the driver).

        Raises:
            ConfigError: The data leaves a setting the run needs unresolved.
        """
        return spec

    @classmethod
    def manifest_fields(cls, spec: JobSpec) -> dict[str, Any]:
        """This objective's fields of the published ``ArtifactManifest``."""
        return {}

    # ------------------------------------------------------------------ on the workers

    def trainable_head(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters that train whatever the method freezes (a new head); none by default."""
        return []

    def load_model(self, spec: JobSpec, inputs: WorkerInputs) -> nn.Module:
        """The base model, before ``trainers.methods.prepare_model`` applies the method."""
        import torch
        from transformers import AutoModelForCausalLM

        from rayft.trainers.attention import resolve_attention

        extra: dict[str, Any] = {}
        if spec.method == "qlora":
            from rayft.trainers.quantization import qlora_load_kwargs

            extra = qlora_load_kwargs(inputs.dtype)  # a 4-bit NF4 base on this worker's GPU
        return AutoModelForCausalLM.from_pretrained(
            inputs.model_dir,
            dtype=getattr(torch, inputs.dtype),
            attn_implementation=resolve_attention(spec.model.attn_implementation),
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
        """The ``collate_fn`` for this objective's Ray Data rows.

        Packed rows are flattened with restarting ``position_ids`` and no mask where the
        model runs flash-attention 2 (resolved on this worker as in :meth:`load_model`),
        else they carry the 4-D block-diagonal mask. On a CUDA worker, masked packed rows
        are padded to ``data.max_seq_len``, so every batch has one shape: cuDNN's attention
        builds a plan for each new shape, which made a 1B LoRA step on an H200 3x slower
        with widths that changed from batch to batch (``bench/gpu_components.py
        --pad-to-longest``).
        """
        from rayft.trainers.attention import cuda_available, resolve_attention, uses_varlen_packing
        from rayft.trainers.packing import collate_fn

        packed = spec.data.packing
        if not packed:
            return collate_fn(pad_id, packed)
        attn = resolve_attention(spec.model.attn_implementation)
        varlen = uses_varlen_packing(attn, packed)
        width = spec.data.max_seq_len if cuda_available() and not varlen else None
        return collate_fn(pad_id, packed, varlen=varlen, width=width)

    def expand(self, worker: Worker, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The micro-batches one collated batch of the data trains as (this batch, once).

        An online objective makes its training batches here: GRPO samples and grades
        answers to the batch's prompts and yields the result once per optimizer pass.
        Called on every worker in lockstep, so it may use collectives.
        """
        yield batch

    def log_fields(self, worker: Worker) -> dict[str, float]:
        """Fields this objective adds to each logged ``train`` record (collective)."""
        return {}

    def train_loss(self, worker: Worker, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Summed loss of one micro-batch (differentiable) and what it is a sum over.

        The step minimises ``total / count``; ``count`` also weights the logged loss.
        """
        from rayft.trainers.loss import causal_lm_loss_sums

        engine = worker.engine
        return causal_lm_loss_sums(engine, engine.module.get_output_embeddings(), batch)

    def eval_sums(self, worker: Worker, batch: dict[str, Any]) -> dict[str, float]:
        """This batch's contribution to :attr:`eval_keys` (no autograd)."""
        from rayft.trainers.loss import causal_lm_loss_sums

        engine = worker.engine
        total, count = causal_lm_loss_sums(engine, engine.module.get_output_embeddings(), batch)
        return {"loss_sum": float(total), "count": float(count)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The evaluation's metrics from the sums over the whole eval set."""
        from rayft.trainers.loss import perplexity

        loss = sums["loss_sum"] / max(sums["count"], 1.0)
        return {
            "eval_loss": loss,
            "eval_perplexity": perplexity(loss),
            "eval_tokens": int(sums["count"]),
        }


class CausalLMObjective(Objective):
    """Supervised fine-tuning: the next-token loss on the labelled tokens."""
