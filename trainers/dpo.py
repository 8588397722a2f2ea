"""Direct preference optimisation (DPO, Rafailov et al. 2023): ``objective: dpo``.

A preference row is a prompt with a chosen and a rejected answer
(``trainers.formats.preference_pair``). Each pair is tokenized into the chosen sequence
(``input_ids``/``labels``, only the answer labelled) and the rejected one (the columns
``rejected_input_ids``/``rejected_labels``); the collate stacks a batch of ``B`` pairs
into one ``[2B, T]`` batch, chosen rows first. A step compares the sequence
log-probabilities of both answers under the policy and under a frozen reference:

* LoRA weights: the reference is the base model with the adapter disabled (no second
  copy); continuing a published adapter (``model.adapter``), it is that adapter, loaded
  a second time as the frozen adapter ``ref`` (TRL's ``ref_adapter_name``).
* Full weights: a frozen copy of the base model in its own DeepSpeed engine, sharded
  like the policy under ZeRO-3 and replicated otherwise (as TRL's ``prepare_deepspeed``).

The loss is TRL's: ``sigmoid`` is ``-logsigmoid(beta * (log-ratio chosen - log-ratio
rejected))``; ``ipo`` is ``(delta - 1 / (2 beta))^2`` with each log-ratio divided by its
answer's token count. Rewards are ``beta * log-ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rayft.trainers.formats import (
    IGNORE_INDEX,
    ChatTemplateError,
    RowError,
    _encode,
    _render,
    _with_eos,
    end_of_turn_ids,
    preference_pair,
)
from rayft.trainers.objective import Objective, Problems

if TYPE_CHECKING:
    import torch

    from rayft.trainers.config import JobSpec
    from rayft.trainers.loop import Worker

REF_ADAPTER = "ref"
"""PEFT adapter name of the frozen reference when a published adapter is continued."""


# --------------------------------------------------------------------------- tokenizing


def _chat_answer(
    prompt: list[dict[str, Any]], answer: list[dict[str, Any]], tokenizer: Any
) -> tuple[list[int], list[int], list[int]]:
    """Prompt ids, answer ids and answer labels through the chat template.

    The prompt is ``render(prompt, add_generation_prompt=True)``, the answer the rest of
    ``render(prompt + answer)``; labels stop after the answer's last end-of-turn token,
    as in supervised fine-tuning (``trainers.formats``).
    """
    prompt_text = _render(tokenizer, prompt, generation_prompt=True)
    full = _render(tokenizer, prompt + answer, generation_prompt=False)
    if not full.startswith(prompt_text):
        raise ChatTemplateError(
            "the chat template renders the prompt with a generation prompt as text that is "
            "not a prefix of prompt + answer, so the answer tokens cannot be located; use a "
            "template whose earlier turns render the same in every prefix"
        )
    prompt_ids = _encode(tokenizer, prompt_text, add_special_tokens=False)
    answer_ids = _encode(tokenizer, full[len(prompt_text) :], add_special_tokens=False)
    end_ids = end_of_turn_ids(tokenizer)
    ends = [k for k, t in enumerate(answer_ids) if t in end_ids]
    stop = ends[-1] + 1 if ends else len(answer_ids)
    labels = answer_ids[:stop] + [IGNORE_INDEX] * (len(answer_ids) - stop)
    return prompt_ids, answer_ids, labels


def _pair_tokens(
    row: dict[str, Any], tokenizer: Any
) -> tuple[list[int], tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    prompt, chosen, rejected = preference_pair(row)
    if getattr(tokenizer, "chat_template", None):
        if isinstance(prompt, str):
            # As SFT does with prompt_completion rows: one user turn, one assistant turn.
            prompt = [{"role": "user", "content": prompt}]
            chosen = [{"role": "assistant", "content": chosen}]
            rejected = [{"role": "assistant", "content": rejected}]
        prompt_ids, c_ids, c_labels = _chat_answer(prompt, chosen, tokenizer)
        _, r_ids, r_labels = _chat_answer(prompt, rejected, tokenizer)
        return prompt_ids, (c_ids, c_labels), (r_ids, r_labels)
    if not isinstance(prompt, str):
        raise ChatTemplateError(
            "conversational preference rows need a tokenizer with a chat template; this "
            "tokenizer has none (set tokenizer.chat_template or write prompt/chosen/rejected "
            "as strings)"
        )
    prompt_ids = _encode(tokenizer, prompt, add_special_tokens=True)
    c_ids = _with_eos(tokenizer, _encode(tokenizer, chosen, add_special_tokens=False))
    r_ids = _with_eos(tokenizer, _encode(tokenizer, rejected, add_special_tokens=False))
    return prompt_ids, (c_ids, list(c_ids)), (r_ids, list(r_ids))


def preference_tokens(
    row: dict[str, Any], tokenizer: Any, max_seq_len: int
) -> dict[str, Any] | None:
    """Tokenize one preference pair into its chosen and rejected sequences.

    Truncation: when prompt + the longer answer exceed ``max_seq_len``, the prompt keeps
    its end (at least half of ``max_seq_len`` when the answers are long), then each
    answer is cut from the right to what is left.

    Args:
        row: A preference row (``trainers.formats.preference_pair`` accepts it).
        tokenizer: A Hugging Face tokenizer; its chat template is used when it has one.
        max_seq_len: Longest sequence kept.

    Returns:
        ``input_ids``/``labels`` of prompt + chosen answer (``-100`` on the prompt),
        ``rejected_input_ids``/``rejected_labels`` of prompt + rejected answer and
        ``truncated``; ``None`` when either answer has no labelled token left.

    Raises:
        RowError: The row is not a preference pair.
        ChatTemplateError: The chat template cannot locate the answer tokens.
    """
    prompt, (c_ids, c_labels), (r_ids, r_labels) = _pair_tokens(row, tokenizer)
    longest = max(len(c_ids), len(r_ids))
    truncated = len(prompt) + longest > max_seq_len
    if truncated:
        keep = max(max_seq_len - longest, max_seq_len // 2)
        prompt = prompt[-keep:] if len(prompt) > keep else prompt
        budget = max_seq_len - len(prompt)
        c_ids, c_labels, r_ids, r_labels = (x[:budget] for x in (c_ids, c_labels, r_ids, r_labels))
    masked = [IGNORE_INDEX] * len(prompt)
    chosen_labels, rejected_labels = masked + c_labels, masked + r_labels
    # labels[0] is never predicted (causal LM); both answers must keep a target.
    for labels in (chosen_labels, rejected_labels):
        if all(label == IGNORE_INDEX for label in labels[1:]):
            return None
    return {
        "input_ids": prompt + c_ids,
        "labels": chosen_labels,
        "rejected_input_ids": prompt + r_ids,
        "rejected_labels": rejected_labels,
        "truncated": truncated,
    }


# --------------------------------------------------------------------------- batching


def collate_pairs(batch: dict[str, Any], pad_id: int) -> dict[str, Any]:
    """One ``[2B, T]`` batch from ``B`` tokenized pairs: the chosen rows, then the rejected.

    Rows with no tokens (they only carry a ``num_dropped`` count) are left out.

    Returns:
        The keys of ``trainers.packing.collate`` (unpacked): ``input_ids``, ``labels``,
        ``attention_mask``, ``position_ids``, ``sample_ids`` (one list per pair) and the
        counts ``num_tokens`` (both sequences), ``num_label_tokens``, ``num_truncated``,
        ``num_dropped``.
    """
    import numpy as np
    import torch

    from rayft.trainers.packing import pad_rows, row_arrays

    chosen = row_arrays(batch["input_ids"])
    keep = [i for i, row in enumerate(chosen) if len(row) > 0]
    rejected, c_labels = row_arrays(batch.get("rejected_input_ids")), row_arrays(batch["labels"])
    r_labels = row_arrays(batch.get("rejected_labels"))
    inputs = [chosen[i] for i in keep] + [rejected[i] for i in keep]
    labels_rows = [c_labels[i] for i in keep] + [r_labels[i] for i in keep]
    lengths = [len(row) for row in inputs]
    width = max(lengths, default=0)
    input_ids = pad_rows(inputs, width, pad_id)
    labels = pad_rows(labels_rows, width, IGNORE_INDEX)
    lengths_t = torch.tensor(lengths, dtype=torch.long).reshape(-1, 1)
    dropped = batch.get("num_dropped")
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": (torch.arange(width)[None, :] < lengths_t).long(),
        "position_ids": torch.arange(width, dtype=torch.long).expand(len(inputs), width).clone(),
        "sample_ids": [[str(s) for s in row_arrays(batch["sample_ids"])[i]] for i in keep],
        "num_tokens": int(sum(lengths)),
        "num_label_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        "num_truncated": int(np.asarray(batch["num_truncated"]).sum()),
        "num_dropped": int(np.asarray(dropped).sum()) if dropped is not None else 0,
    }


# --------------------------------------------------------------------------- the loss


def dpo_losses(
    policy: torch.Tensor,
    reference: torch.Tensor,
    counts: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and rewards from the ``[2B]`` sequence log-probs (chosen first).

    Args:
        policy: Policy log-probs of the ``2B`` sequences (chosen rows, then rejected).
        reference: Reference log-probs of the same sequences.
        counts: Labelled tokens per sequence (``ipo`` averages over them).
        beta: ``dpo.beta``.
        loss: ``sigmoid`` or ``ipo`` (TRL's definitions).

    Returns:
        ``losses`` ``[B]``, ``chosen_rewards`` and ``rejected_rewards`` ``[B]``
        (``beta * (policy - reference)``, detached).
    """
    import torch.nn.functional as F

    ratios = policy - reference
    chosen, rejected = ratios.chunk(2)
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen - rejected))
    elif loss == "ipo":
        c_count, r_count = counts.float().clamp(min=1.0).chunk(2)
        delta = chosen / c_count - rejected / r_count
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown dpo.loss {loss!r}; expected sigmoid or ipo")
    return losses, beta * chosen.detach(), beta * rejected.detach()


# --------------------------------------------------------------------------- the objective


def inner_model(engine: Any) -> Any:
    """The model inside a DeepSpeed engine (or the model itself)."""
    return getattr(engine, "module", engine)


class DpoObjective(Objective):
    """``objective: dpo``: the DPO loss against a frozen reference; reward metrics at eval."""

    eval_keys = ("loss_sum", "pairs", "correct", "margin_sum", "chosen_sum", "rejected_sum")
    generation_metrics = False

    @classmethod
    def spec_problems(cls, spec: JobSpec) -> Problems:
        """Methods lora or full (those have a reference), no packing, preference rows."""
        problems: Problems = []
        if spec.method not in ("lora", "full"):
            problems.append(
                (
                    "method",
                    f"objective dpo trains method lora (the reference is the base with the "
                    f"adapter disabled) or full (a frozen reference copy), not {spec.method}",
                )
            )
        if spec.data.packing:
            problems.append(
                (
                    "data.packing",
                    "objective dpo compares whole chosen and rejected answers; set "
                    "data.packing=false",
                )
            )
        if spec.data.format not in ("auto", "preference"):
            problems.append(
                (
                    "data.format",
                    f"objective dpo trains on preference rows, not {spec.data.format}; set "
                    "data.format=preference or auto",
                )
            )
        return problems

    @classmethod
    def format_problem(cls, fmt: str) -> str | None:
        """Preference rows only."""
        if fmt == "preference":
            return None
        return (
            "objective dpo needs preference rows ('prompt', 'chosen', 'rejected', or OpenAI's "
            "'input', 'preferred_output', 'non_preferred_output'), got a "
            f"{fmt} row; give preference data or choose another objective"
        )

    def __init__(self, spec: JobSpec) -> None:
        self.beta = spec.dpo.beta
        self.loss = spec.dpo.loss
        self.reference: Any = None
        """The reference model's DeepSpeed engine (full weights only)."""
        self.ref_adapter = False

    def row_tokenizer(self, spec: JobSpec) -> Callable[[dict[str, Any], str, Any], dict | None]:
        """Preference rows to chosen + rejected sequences (:func:`preference_tokens`)."""
        max_seq_len = spec.data.max_seq_len

        def tokenize(row: dict[str, Any], fmt: str, tokenizer: Any) -> dict[str, Any] | None:
            if fmt != "preference":
                raise RowError(f"objective dpo trains on preference rows, got {fmt} rows")
            return preference_tokens(row, tokenizer, max_seq_len)

        return tokenize

    def collate(self, pad_id: int, spec: JobSpec) -> Any:
        """:func:`collate_pairs` as a Ray Data ``collate_fn``."""
        from ray.data.collate_fn import NumpyBatchCollateFn

        class PairCollateFn(NumpyBatchCollateFn):
            def __init__(self) -> None:
                self.pad_id = pad_id

            def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
                return collate_pairs(batch, self.pad_id)

        return PairCollateFn()

    def prepare(self, worker: Worker) -> None:
        """Build the reference: a frozen DeepSpeed engine (full weights) or, continuing a
        published adapter, that adapter loaded again as the frozen adapter ``ref``."""
        spec = worker.spec
        if spec.method == "full":
            self.reference = reference_engine(self, worker)
        elif worker.inputs.parent_adapter is not None:
            load_reference_adapter(worker)
            self.ref_adapter = True

    @contextmanager
    def _reference_mode(self, worker: Worker) -> Iterator[Any]:
        """The forward of the reference model (the policy's engine with LoRA)."""
        if self.reference is not None:
            yield self.reference
            return
        with adapter_reference(worker, self.ref_adapter) as forward:
            yield forward

    def pair_logps(
        self, worker: Worker, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Policy log-probs (differentiable when autograd is on), reference log-probs and
        labelled-token counts of the ``[2B]`` sequences."""
        import torch

        from rayft.trainers.loss import sequence_logps

        engine = worker.engine
        policy, counts = sequence_logps(engine, inner_model(engine).get_output_embeddings(), batch)
        with torch.no_grad(), self._reference_mode(worker) as forward:
            reference, _ = sequence_logps(
                forward, inner_model(forward).get_output_embeddings(), batch
            )
        return policy, reference, counts

    def train_loss(self, worker: Worker, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Summed DPO loss over the batch's pairs, and the number of pairs."""
        policy, reference, counts = self.pair_logps(worker, batch)
        pairs = policy.size(0) // 2
        if pairs == 0:  # an all-dropped batch: a zero loss that still has a backward
            return policy.sum() * 0.0, 0
        losses, _, _ = dpo_losses(policy, reference, counts, self.beta, self.loss)
        return losses.sum() + policy.sum() * 0.0, pairs

    def eval_sums(self, worker: Worker, batch: dict[str, Any]) -> dict[str, float]:
        """Loss, pair count, correctly ranked pairs and reward sums of this batch."""
        policy, reference, counts = self.pair_logps(worker, batch)
        if policy.size(0) // 2 == 0:
            return dict.fromkeys(self.eval_keys, 0.0)
        losses, chosen, rejected = dpo_losses(policy, reference, counts, self.beta, self.loss)
        return {
            "loss_sum": float(losses.sum()),
            "pairs": float(losses.numel()),
            # A tie (e.g. the untrained adapter, where policy == reference) counts half:
            # accuracy starts at chance, 0.5, not at 0.
            "correct": float((chosen > rejected).sum() + 0.5 * (chosen == rejected).sum()),
            "margin_sum": float((chosen - rejected).sum()),
            "chosen_sum": float(chosen.sum()),
            "rejected_sum": float(rejected.sum()),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """``eval_loss`` (the DPO loss) and the reward accuracy, margin and means."""
        return eval_metrics(sums)


def eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    """DPO evaluation metrics from sums over the eval pairs (see ``DpoObjective.eval_keys``)."""
    pairs = max(sums["pairs"], 1.0)
    return {
        "eval_loss": sums["loss_sum"] / pairs if sums["pairs"] else math.nan,
        "eval_reward_accuracy": sums["correct"] / pairs,
        "eval_reward_margin": sums["margin_sum"] / pairs,
        "eval_rewards_chosen": sums["chosen_sum"] / pairs,
        "eval_rewards_rejected": sums["rejected_sum"] / pairs,
        "eval_pairs": int(sums["pairs"]),
    }


def load_reference_adapter(worker: Worker) -> None:
    """Load the continued adapter (``model.adapter``) again, frozen, as adapter ``ref``:
    the reference of a LoRA run that continues a published adapter (as TRL's
    ``ref_adapter_name``)."""
    module = inner_model(worker.engine)
    path = str(worker.inputs.parent_adapter.local_dir())
    module.load_adapter(
        path, adapter_name=REF_ADAPTER, is_trainable=False, torch_device=str(worker.device)
    )
    module.set_adapter("default")


@contextmanager
def adapter_reference(worker: Worker, ref_adapter: bool) -> Iterator[Any]:
    """The policy's engine answering as the reference of a LoRA run: adapter ``ref``
    (:func:`load_reference_adapter`) when ``ref_adapter``, else the base (adapter off)."""
    module = inner_model(worker.engine)
    if ref_adapter:
        module.set_adapter(REF_ADAPTER)
        try:
            yield worker.engine
        finally:
            module.set_adapter("default")
    else:
        with module.disable_adapter():
            yield worker.engine


def reference_config(config: dict[str, Any]) -> dict[str, Any]:
    """The policy's DeepSpeed config for a frozen, optimizer-less reference engine.

    ZeRO-3 shards the reference like the policy; under stages 0-2 (which shard only
    optimizer state and gradients, which a frozen model has none of) it is replicated.
    """
    config = {**config, "zero_optimization": dict(config["zero_optimization"])}
    zero = config["zero_optimization"]
    zero.pop("offload_optimizer", None)
    if zero.get("stage", 0) != 3:
        config["zero_optimization"] = {"stage": 0}
    return config


def reference_engine(objective: Objective, worker: Worker) -> Any:
    """A frozen copy of the base model in its own DeepSpeed engine (full-weight DPO)."""
    import deepspeed

    from rayft.trainers.deepspeed_config import zero_config

    spec, inputs = worker.spec, worker.inputs
    model = objective.load_model(spec, inputs)
    model.requires_grad_(False)
    model.eval()
    on_gpu = worker.device.type == "cuda"
    config = reference_config(zero_config(spec, worker.world, inputs.dtype, on_gpu))
    engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
    engine.eval()
    return engine
