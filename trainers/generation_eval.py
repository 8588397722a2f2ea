"""Evaluation by generation during training: ``eval.metrics`` and the ``eval.general`` check.

``eval.metrics``: at every evaluation of a supervised fine-tune, each eval sample's
prompt (its tokens before the first labelled one) is answered greedily and the answer is
scored against the labelled completion with ``trainers.metrics``; the scores are
reported as ``eval_<metric>`` next to the eval loss.

``eval.general``: a small general-knowledge set (``builtin:general``, 50 short factual
questions shipped with rayft, or a data file) is scored before and after training:
teacher-forced loss and perplexity of its answers, and exact match of greedy answers.
The artifact's ``rayft.json`` records ``general: {set, rows, before, after, delta}``,
so a user sees what the fine-tune cost in general ability.

Every function that runs the model is called on all workers together: each worker
takes every ``world``-th sample, and workers with fewer samples run a throw-away pass so
that ZeRO-3's parameter gathers (and ``generate(synced_gpus=True)``) stay in lockstep.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from rayft.trainers.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from rayft.trainers.loop import Worker

EVAL_SETS_DIR = Path(__file__).parent / "eval_sets"
BUILTIN_SETS = {"builtin:general": "general.jsonl"}
GENERAL_METRICS = ("loss", "perplexity", "exact_match")

Sample = tuple[list[int], list[int]]
"""``(prompt_ids, answer_ids)``: what the model is asked and the labelled answer."""


# --------------------------------------------------------------------------- samples


def split_sample(input_ids: list[int], labels: list[int]) -> Sample | None:
    """The prompt (tokens before the first labelled one) and the first labelled answer.

    A multi-turn conversation is asked its first assistant turn. ``None`` when there is
    no prompt (a text row, labelled from its first token) or no label.
    """
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
    if first is None or first == 0:
        return None
    end = first
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    return list(input_ids[:first]), list(input_ids[first:end])


def batch_samples(batch: dict[str, Any]) -> list[Sample]:
    """Every sample of a collated eval batch (``trainers.packing.collate``), in order.

    Packed rows are split where ``position_ids`` restart at 0; padding is dropped.
    """
    out: list[Sample] = []
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    mask = batch["attention_mask"]
    for row in range(ids.shape[0]):
        if mask.dim() == 2:
            length = int(mask[row].sum())
            starts = [0]
        else:
            length = ids.shape[1]
            starts = (positions[row] == 0).nonzero().flatten().tolist()
        bounds = [*starts, length]
        for start, end in zip(bounds, bounds[1:], strict=False):
            sample = split_sample(ids[row, start:end].tolist(), labels[row, start:end].tolist())
            if sample is not None:
                out.append(sample)
    return out


def general_set_rows(name: str) -> list[dict[str, Any]]:
    """The rows of ``eval.general``: a builtin set, or every row of a data file.

    A data file is read in this process as ``trainers.data.read_rows`` reads it (any
    format rayft trains on; each row's non-null fields).
    """
    if name in BUILTIN_SETS:
        path = EVAL_SETS_DIR / BUILTIN_SETS[name]
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    from rayft.trainers.data import driver_rows

    return [json.loads(row) for row in driver_rows([name], "auto").column("row").to_pylist()]


def general_examples(
    name: str, tokenizer: Any, max_seq_len: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Tokenized rows of ``eval.general`` as ``(input_ids, labels)`` pairs (tuples, hashable).

    Raises:
        ValueError: The set has no row with a prompt and an answer.
    """
    from rayft.trainers.formats import detect_format, tokenize_example

    examples = []
    for row in general_set_rows(name):
        example = tokenize_example(row, detect_format(row), tokenizer, max_seq_len)
        if example is not None and split_sample(example["input_ids"], example["labels"]):
            examples.append((tuple(example["input_ids"]), tuple(example["labels"])))
    if not examples:
        raise ValueError(
            f"eval.general {name!r} has no row with a prompt and an answer; give chat, "
            "prompt_completion or alpaca rows"
        )
    return tuple(examples)


# --------------------------------------------------------------------------- running


def _my_share(items: list[Any], worker: Worker, per_round: int) -> tuple[list[Any], int]:
    """This worker's items and the number of rounds every worker runs."""
    mine = items[worker.rank :: worker.world]
    most = math.ceil(len(items) / worker.world)
    return mine, math.ceil(most / per_round) if most else 0


def _stop_ids(worker: Worker) -> list[int]:
    from rayft.trainers.formats import end_of_turn_ids

    return sorted(end_of_turn_ids(worker.tokenizer)) or [worker.pad_id]


@torch.no_grad()
def greedy_answers(worker: Worker, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy answers to this worker's share of ``prompts``, decoded; on all workers.

    Returns:
        The answers to ``prompts[rank::world]``, in that order.
    """
    batch_size = worker.spec.optim.batch_size
    mine, rounds = _my_share(prompts, worker, batch_size)
    model = worker.engine.module
    # Validation keeps ZeRO-3 out today; generate would need every rank in lockstep there.
    zero3 = worker.spec.deepspeed.zero_stage == 3
    answers: list[str] = []
    was_training = model.training
    model.eval()
    for r in range(rounds):
        chunk = mine[r * batch_size : (r + 1) * batch_size]
        real = bool(chunk)
        chunk = chunk or [[worker.pad_id]]  # a throw-away pass keeps ZeRO-3 in lockstep
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), worker.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, prompt in enumerate(chunk):
            # Left padding: every row's next token is in the last column.
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        out = model.generate(
            input_ids=ids.to(worker.device),
            attention_mask=mask.to(worker.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=_stop_ids(worker),
            pad_token_id=worker.pad_id,
            synced_gpus=zero3 and worker.world > 1,
        )
        if real:
            answers += worker.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    if was_training:
        model.train()
    return [a.strip() for a in answers]


def gather(items: list[Any]) -> list[Any]:
    """Every worker's ``items``, concatenated in rank order (identity without a group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(items)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def _interleave(shares: list[list[Any]]) -> list[Any]:
    """Undo ``items[rank::world]``: the items back in their original order."""
    out = []
    for i in range(max((len(s) for s in shares), default=0)):
        out += [s[i] for s in shares if i < len(s)]
    return out


def score_answers(
    worker: Worker, samples: list[Sample], names: list[str], max_new_tokens: int
) -> dict[str, float]:
    """Generate an answer to every sample's prompt and score ``names`` over all of them.

    Returns:
        ``{metric: score}`` over every sample, the same on every worker.
    """
    from rayft.trainers.metrics import generation_metrics

    if not samples or not names:
        return {}
    mine = samples[worker.rank :: worker.world]
    answers = greedy_answers(worker, [p for p, _ in samples], max_new_tokens)
    references = worker.tokenizer.batch_decode([a for _, a in mine], skip_special_tokens=True)
    pairs = list(zip(answers, (r.strip() for r in references), strict=True))
    everything = _interleave(gather([pairs]))
    return generation_metrics([p for p, _ in everything], [r for _, r in everything], names)


def generation_scores(worker: Worker, batches: list[dict[str, Any]]) -> dict[str, float]:
    """``eval_<metric>`` for ``eval.metrics`` over the eval batches (all workers)."""
    names = worker.spec.eval.metrics
    samples = [s for batch in batches for s in batch_samples(batch)]
    scores = score_answers(worker, samples, names, worker.spec.eval.max_new_tokens)
    return {f"eval_{k}": v for k, v in scores.items()}


def _padded(examples: list[tuple[tuple[int, ...], tuple[int, ...]]], pad_id: int) -> dict:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(examples):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    positions = torch.arange(width).expand(len(examples), width).clone()
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}


@torch.no_grad()
def general_scores(worker: Worker) -> dict[str, float]:
    """Loss, perplexity and exact match on ``eval.general`` (all workers, same result)."""
    from rayft.trainers.collectives import all_sum
    from rayft.trainers.loss import causal_lm_loss_sums, perplexity

    examples = list(worker.inputs.general)
    engine = worker.engine
    batch_size = worker.spec.optim.batch_size
    mine, rounds = _my_share(examples, worker, batch_size)
    total = count = 0.0
    was_training = engine.training
    engine.eval()
    head = engine.module.get_output_embeddings()
    for r in range(rounds):
        chunk = mine[r * batch_size : (r + 1) * batch_size]
        # A worker out of rows scores one unlabelled token: no loss, same collectives.
        batch = _padded(chunk or [((worker.pad_id,), (IGNORE_INDEX,))], worker.pad_id)
        loss, n = causal_lm_loss_sums(
            engine, head, {k: v.to(worker.device) for k, v in batch.items()}
        )
        total += float(loss)
        count += n
    total, count = all_sum([total, count])
    loss = total / max(count, 1.0)
    samples = [split_sample(list(ids), list(labels)) for ids, labels in examples]
    answers = score_answers(
        worker, [s for s in samples if s], ["exact_match"], worker.spec.eval.max_new_tokens
    )
    if was_training:
        engine.train()
    return {
        "loss": loss,
        "perplexity": perplexity(loss),
        "exact_match": answers.get("exact_match", 0.0),
    }


def general_record(
    name: str, rows: int, before: dict[str, float], after: dict[str, float]
) -> dict[str, Any]:
    """What ``rayft.json`` records: both results and ``after - before`` per metric."""
    delta = {k: after[k] - before[k] for k in GENERAL_METRICS if k in before and k in after}
    return {"set": name, "rows": rows, "before": before, "after": after, "delta": delta}


def general_line(record: dict[str, Any]) -> str:
    """One line for the driver's output: before → after (delta) per metric."""
    before, after, delta = record["before"], record["after"], record["delta"]
    parts = [
        f"{key} {before[key]:.4g} -> {after[key]:.4g} ({delta[key]:+.4g})"
        for key in ("loss", "exact_match")
        if key in delta
    ]
    return f"[rayft] general knowledge ({record['set']}, {record['rows']} rows): " + ", ".join(
        parts
    )
