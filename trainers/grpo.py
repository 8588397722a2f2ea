"""Group relative policy optimisation (GRPO, Shao et al. 2024): ``objective: grpo``.

A row is a prompt: chat ``messages`` whose last message is the user's (OpenAI's
reinforcement fine-tuning rows), or a ``prompt`` string. Every other field of the row
reaches the grader as ``item``. A training step:

1. **Rollouts.** The policy answers each prompt of the micro-batch ``grpo.num_generations``
   times on the run's rollout engines (``trainers.rollout``: rayft's serving engine as Ray
   actors; batched decoding). Before sampling, a policy that changed since the engines last
   saw it is pushed to them (its LoRA tensors, or its full weights).
2. **Rewards.** ``grpo.grader`` (OpenAI's grader JSON, ``trainers.graders``) scores every
   answer, the groups in parallel on a threaded grading actor (one per training worker);
   a grader's fault scores 0 and is reported naming the row.
3. **Advantages.** ``(reward - group mean) / (std + 1e-4)`` (the std of the group, of the
   batch, or none: ``grpo.scale_rewards``), as TRL computes them.
4. **Loss.** The clipped importance-ratio loss of TRL's ``GRPOTrainer`` on the answer
   tokens, plus ``beta`` times the k3 estimate of the KL to the reference, aggregated as
   ``grpo.loss`` says (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``). Log-probabilities are
   taken at the sampling temperature, as TRL takes them. A generated batch feeds
   ``grpo.num_iterations`` optimizer passes (:meth:`GrpoObjective.expand`).

An evaluation answers each held-out prompt once, greedily, and reports the mean grade
(``eval_reward``); ``eval_loss`` is its negative, so lower is better as for every objective
(early stopping and sweeps read it unchanged).

Resuming continues at the next unused prompt batch (the data position is the rollout
position) and answers are seeded by step and row, so a resumed run samples what the
interrupted one would have. A checkpoint taken between the passes of one generated
batch (``num_iterations`` above 1) resumes at the next batch.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rayft.trainers import defaults
from rayft.trainers.dpo import adapter_reference, inner_model, load_reference_adapter
from rayft.trainers.formats import IGNORE_INDEX, ChatTemplateError, RowError, _encode, _render
from rayft.trainers.objective import Objective, Problems

if TYPE_CHECKING:
    import torch

    from rayft.trainers.config import GrpoSpec, JobSpec
    from rayft.trainers.loop import Worker

PROMPT_FORMAT = "prompt"
"""The format the data scan reports for GRPO's rows."""
PROMPT_KEYS = ("messages", "prompt")
"""Row fields that make the prompt; every other field is the grader's ``item``."""
PHASES = ("sync_s", "generate_s", "grade_s", "reference_s")
"""Where a step's time goes before its forward and backward (``train`` records)."""
STD_EPS = 1e-4
"""Added to the reward standard deviation before dividing (TRL's value)."""
SHARED = "shared_"
"""The prefix of :func:`shared_prompt_rows`' keys in a training batch."""
SHARED_ROW_KEYS = ("input_ids", "attention_mask", "position_ids")
"""What the model reads of :func:`shared_prompt_rows`."""
PROMPT_SEGMENT = 1
"""The prompt's segment in a shared row; answer ``j`` is segment ``PROMPT_SEGMENT + 1 + j``."""
SHARED_ROW_LIMIT = 4096
"""The longest shared row (a prompt and its group's answers): its block mask is
``tokens**2`` floats, so longer groups train one row per answer."""


# --------------------------------------------------------------------------- rows


def prompt_of(row: dict[str, Any]) -> list[dict[str, Any]] | str:
    """The prompt of a GRPO row: its chat messages (the last one the user's) or its string.

    Raises:
        RowError: The row has neither, or its last message is not the user's.
    """
    messages = row.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise RowError("'messages' must be a non-empty list of chat messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise RowError(f"messages[{index}] must be an object with a 'role'")
            if not isinstance(message.get("content"), str):
                raise RowError(f"messages[{index}].content must be a string")
        if messages[-1]["role"] != "user":
            raise RowError(
                "the last message must be the user's (the policy writes the answer); drop "
                f"the trailing {messages[-1]['role']!r} message"
            )
        return messages
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prompt
    raise RowError(
        "a grpo row needs 'messages' (chat, the last message the user's) or a 'prompt' string"
    )


def item_of(row: dict[str, Any]) -> dict[str, Any]:
    """What the grader sees as ``item``: every field of the row but the prompt."""
    return {k: v for k, v in row.items() if k not in PROMPT_KEYS}


class PromptRows:
    """The data scan's check of every GRPO row (``Objective.row_check``)."""

    format = PROMPT_FORMAT
    described = "objective grpo"

    def check(self, row: dict[str, Any]) -> None:
        prompt_of(row)

    def labels(self) -> list[str]:
        return []


def prompt_tokens(row: dict[str, Any], tokenizer: Any, max_prompt_len: int) -> dict[str, Any]:
    """Tokenize one GRPO row: the prompt (with the generation prompt), cut from the left
    to ``max_prompt_len`` tokens, and the row's ``item`` as JSON."""
    prompt = prompt_of(row)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = _encode(tokenizer, _render(tokenizer, messages, generation_prompt=True), False)
    elif isinstance(prompt, str):
        ids = _encode(tokenizer, prompt, add_special_tokens=True)
    else:
        raise ChatTemplateError(
            "chat rows need a tokenizer with a chat template; this tokenizer has none (set "
            "tokenizer.chat_template or write the prompt as a 'prompt' string)"
        )
    truncated = len(ids) > max_prompt_len
    return {
        "input_ids": ids[-max_prompt_len:],
        "labels": [],
        "truncated": truncated,
        "item": json.dumps(item_of(row), ensure_ascii=False),
    }


def collate_prompts(batch: dict[str, Any]) -> dict[str, Any]:
    """A micro-batch of prompts (token ids and items), before any answer is sampled."""
    import numpy as np

    from rayft.trainers.packing import row_arrays

    prompts = row_arrays(batch["input_ids"])
    keep = [i for i, row in enumerate(prompts) if len(row) > 0]
    items = list(batch.get("item", [])) if batch.get("item") is not None else []
    dropped = batch.get("num_dropped")
    return {
        "prompts": [[int(t) for t in prompts[i]] for i in keep],
        "items": [json.loads(str(items[i])) for i in keep],
        "sample_ids": [[str(s) for s in row_arrays(batch["sample_ids"])[i]] for i in keep],
        "num_truncated": int(np.asarray(batch["num_truncated"]).sum()),
        "num_dropped": int(np.asarray(dropped).sum()) if dropped is not None else 0,
    }


# --------------------------------------------------------------------------- the maths


def group_advantages(
    rewards: torch.Tensor, group: int, scale: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's advantages of ``[N * group]`` rewards (each group's answers consecutive).

    Returns:
        ``advantages`` ``[N * group]`` and the standard deviation each was divided by.
    """
    import torch

    grouped = rewards.view(-1, group)
    mean = grouped.mean(dim=1).repeat_interleave(group)
    if scale == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = grouped.std(dim=1).repeat_interleave(group)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + STD_EPS)
    return advantages, std


def token_logps(
    forward: Callable[..., Any],
    head: Any,
    batch: dict[str, torch.Tensor],
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probability of every labelled token, ``[batch, seq - 1]`` (0 elsewhere).

    Position ``t`` holds ``log p(labels[t + 1] | tokens <= t)`` at ``temperature``, from
    the same lean head as ``trainers.loss``: logits only for labelled positions. A batch
    that carries :func:`shared_prompt_rows` is computed from those rows.
    """
    import torch

    from rayft.trainers.loss import hidden_states_forward, shifted_targets

    shared = SHARED + "input_ids" in batch
    rows = {k: batch[SHARED + k] for k in SHARED_ROW_KEYS} if shared else batch
    out = hidden_states_forward(forward, head, rows)
    hidden = out.hidden_states[-1]
    device = hidden.device
    if shared:  # each answer token from the position that predicts it in the shared rows
        picked = hidden[batch[SHARED + "src_row"].to(device), batch[SHARED + "src_pos"].to(device)]
        wanted = batch[SHARED + "targets"].to(device)
        where = (batch[SHARED + "dst_row"].to(device), batch[SHARED + "dst_pos"].to(device))
    else:
        targets = shifted_targets(batch["labels"].to(device))[:, :-1]
        keep = targets != IGNORE_INDEX
        picked, wanted = hidden[:, :-1][keep], targets[keep]
        where = keep.nonzero(as_tuple=True)
    values = _chunked_logps(head, picked, wanted, temperature, hidden.requires_grad)
    n, width = batch["input_ids"].shape
    zero = out.logits[..., :1].float().sum() * 0.0 + hidden[:, :1, :1].float().sum() * 0.0
    full = torch.zeros((n, width - 1), dtype=torch.float32, device=device) + zero
    return full if values is None else full.index_put(where, values)


def _chunked_logps(
    head: Any, picked: torch.Tensor, wanted: torch.Tensor, temperature: float, grad: bool
) -> torch.Tensor | None:
    """The tempered log-probs of ``wanted`` from the hidden states ``picked``, a chunk of
    positions at a time; with autograd on, each chunk's logits are recomputed in backward
    rather than kept. ``None`` for no positions."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from rayft.trainers.loss import CHUNK_POSITIONS

    remember = torch.is_grad_enabled() and grad
    parts = []
    for start in range(0, int(wanted.numel()), CHUNK_POSITIONS):
        h, t = picked[start : start + CHUNK_POSITIONS], wanted[start : start + CHUNK_POSITIONS]
        if remember:
            parts.append(checkpoint(_tempered_logps, head, h, t, temperature, use_reentrant=False))
        else:
            parts.append(_tempered_logps(head, h, t, temperature))
    return torch.cat(parts) if parts else None


def _tempered_logps(head: Any, hidden: Any, targets: Any, temperature: float) -> Any:
    import torch

    logits = head(hidden).float() / temperature
    return -torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def grpo_loss_sums(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    grpo: GrpoSpec,
    dapo_tokens: float | None = None,
) -> tuple[torch.Tensor, float, dict[str, float]]:
    """TRL's GRPO loss on one micro-batch, as a sum and what the step divides it by.

    Args:
        logps: The policy's token log-probs ``[N, T]`` (differentiable).
        old_logps: The sampling policy's (``None``: this policy, detached).
        ref_logps: The reference's (needed when ``grpo.beta > 0``).
        advantages: ``[N]``.
        mask: ``[N, T]``, 1 on answer tokens.
        grpo: The spec's ``grpo`` section (``loss``, ``epsilon``, ``beta``...).
        dapo_tokens: ``dapo``'s divisor: the answer tokens of the step over all workers,
            divided by the number of workers (this micro-batch's tokens when ``None``).

    Returns:
        ``(total, count, stats)``: the loss is ``total / count``; ``stats`` holds the mean
        KL and the clipped fraction of this micro-batch.
    """
    import torch

    mask = mask.float()
    old = logps.detach() if old_logps is None else old_logps
    coef_1 = torch.exp(logps - old)
    high = grpo.epsilon_high if grpo.epsilon_high is not None else grpo.epsilon
    coef_2 = torch.clamp(coef_1, 1 - grpo.epsilon, 1 + high)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    kl = torch.zeros_like(per_token)
    if grpo.beta != 0.0:
        assert ref_logps is not None, "beta > 0 needs the reference's log-probs"
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + grpo.beta * kl
    tokens = mask.sum()
    rows = per_token.size(0)
    if grpo.loss == "grpo":
        total = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
        count = float(rows)
    elif grpo.loss == "bnpo":
        total, count = (per_token * mask).sum(), float(tokens.clamp(min=1.0))
    elif grpo.loss == "dr_grpo":
        total, count = (per_token * mask).sum(), float(rows * grpo.max_new_tokens)
    else:  # dapo
        divisor = dapo_tokens if dapo_tokens is not None else float(tokens)
        total, count = (per_token * mask).sum(), max(divisor, 1.0)
    clipped = ((coef_1 < 1 - grpo.epsilon) & (adv < 0)) | ((coef_1 > 1 + high) & (adv > 0))
    denominator = float(tokens.clamp(min=1.0))
    stats = {
        "kl": float((kl * mask).sum()) / denominator,
        "clip_ratio": float((clipped.float() * mask).sum()) / denominator,
    }
    return total, count, stats


# --------------------------------------------------------------------------- grading


GRADER_THREADS = 8
"""Groups one grading actor grades at once, and answers of one group graded at once: at
most 64 sandboxed grader processes per training worker."""


def grade_group(
    grader_json: dict[str, Any],
    texts: list[str],
    item: dict[str, Any],
    row: int,
    judges: Any = None,
    storage: str | None = None,
) -> list[tuple[float, list[str]]]:
    """Grade one prompt's answers: ``(score, error details)`` per answer.

    The answers are graded at once, one thread each: a ``python`` grader spends its time
    waiting for the sandboxed process it starts per call, a model grader for its reply.
    A model grader's judge comes from ``judges`` (the run's ``RolloutEngines``: it loads
    the judge in this process on first use, from the registry at ``storage``).
    """
    from concurrent.futures import ThreadPoolExecutor

    from rayft.trainers.graders import GradeContext, grade, judge_models, parse_grader

    grader = parse_grader(grader_json)
    judge = judges.judge(storage) if judges is not None and judge_models(grader) else None
    context = GradeContext(row=row, judge=judge)

    def one(text: str) -> tuple[float, list[str]]:
        result = grade(grader, text, item, context)
        return float(result.score), [issue.details for issue in result.errors]

    with ThreadPoolExecutor(max_workers=max(1, min(len(texts), GRADER_THREADS))) as pool:
        return list(pool.map(one, texts))


class GradingActor:
    """Grades groups of answers for one training worker, in threads.

    An actor rather than a task per group: it starts once per run and keeps its process,
    where a task would wait, at every step, for Ray to start a worker process while the
    run's workers and rollout engines hold every CPU. ``python`` graders still run each
    call in a sandboxed process of their own (``trainers.grader_sandbox``).
    """

    def grade(
        self,
        grader_json: dict[str, Any],
        texts: list[str],
        item: dict[str, Any],
        row: int,
        judges: Any = None,
        storage: str | None = None,
    ) -> list[tuple[float, list[str]]]:
        return grade_group(grader_json, texts, item, row, judges, storage)


def grade_groups(
    grader_json: dict[str, Any],
    groups: list[list[str]],
    items: list[dict[str, Any]],
    first: int,
    judges: Any = None,
    storage: str | None = None,
) -> list[list[tuple[float, list[str]]]]:
    """Grade every group, in parallel on this process's grading actor (here without Ray)."""
    import ray

    rows = range(first, first + len(groups))
    work = list(zip(groups, items, rows, strict=True))
    if not ray.is_initialized():
        return [grade_group(grader_json, g, i, r, judges, storage) for g, i, r in work]

    def graded() -> list[list[tuple[float, list[str]]]]:
        actor, args = _grader(), (judges, storage)
        return ray.get([actor.grade.remote(grader_json, g, i, r, *args) for g, i, r in work])

    try:
        return graded()
    except ray.exceptions.RayActorError:
        _GRADER.clear()  # the actor died (its node went): start another, once
        return graded()


def _grader() -> Any:
    """This process's grading actor, started on first use; it ends with the process."""
    import ray

    if not _GRADER:
        # No CPU reserved: the run's workers and rollout engines may hold every CPU, and a
        # python grader runs in its own limited process anyway.
        _GRADER.append(
            ray.remote(GradingActor)
            .options(num_cpus=0, max_concurrency=GRADER_THREADS, scheduling_strategy="DEFAULT")
            .remote()
        )
    return _GRADER[0]


_GRADER: list[Any] = []


# --------------------------------------------------------------------------- the objective


class GrpoObjective(Objective):
    """``objective: grpo``: sample groups on rollout engines, grade them, TRL's GRPO loss."""

    eval_keys = ("grade_sum", "count", "tokens")
    generation_metrics = False
    scan_tokenizes = False

    # ------------------------------------------------------------------ before training

    @classmethod
    def judges(cls, spec: JobSpec) -> list[tuple[str, str]]:
        """The judges of the run's model graders, with their keys under ``grpo.grader``."""
        from rayft.trainers.graders import judge_keys, parse_grader

        return judge_keys(parse_grader(spec.grpo.grader), "grpo.grader")

    @classmethod
    def spec_problems(cls, spec: JobSpec) -> Problems:
        """A parsable grader; methods lora or full; no packing; room for the answers."""
        from rayft.trainers.graders import GraderError, parse_grader

        problems: Problems = []
        grpo = spec.grpo
        if grpo.grader is None:
            problems.append(
                (
                    "grpo.grader",
                    "objective grpo needs a grader (OpenAI's grader JSON), e.g. {type: "
                    "string_check, name: exact, input: '{{ sample.output_text }}', "
                    "reference: '{{ item.answer }}', operation: eq}",
                )
            )
        else:
            try:
                parse_grader(grpo.grader)
            except GraderError as err:
                key = err.param.replace("grader", "grpo.grader", 1)
                problems.append((key, str(err)))
        if spec.method not in ("lora", "full"):
            problems.append(
                (
                    "method",
                    f"objective grpo trains method lora or full (the rollout engines take "
                    f"the policy's adapter or its weights), not {spec.method}",
                )
            )
        if spec.data.packing:
            problems.append(("data.packing", "objective grpo samples whole answers; set false"))
        if spec.data.format not in ("auto", "chat"):
            problems.append(
                ("data.format", "objective grpo reads prompt rows; set data.format=auto")
            )
        if grpo.max_new_tokens >= spec.data.max_seq_len:
            problems.append(
                (
                    "grpo.max_new_tokens",
                    f"{grpo.max_new_tokens} leaves no room for the prompt within "
                    f"data.max_seq_len={spec.data.max_seq_len}; lower it or raise max_seq_len",
                )
            )
        if grpo.rollout_engine == "vllm":
            problems += vllm_rollout_problems(spec)
        if grpo.beta > 0 and spec.method == "full":
            problems.append(
                (
                    "grpo.beta",
                    "a KL penalty with method full needs a frozen reference copy, not kept "
                    "here; set grpo.beta=0 (TRL's default) or train method lora",
                )
            )
        return problems

    @classmethod
    def format_problem(cls, fmt: str) -> str | None:
        return None

    @classmethod
    def row_check(cls, spec: JobSpec) -> PromptRows:
        return PromptRows()

    @classmethod
    def manifest_fields(cls, spec: JobSpec) -> dict[str, Any]:
        return {}

    # ------------------------------------------------------------------ on the workers

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.grpo = spec.grpo
        self.engine: Any = None
        """This worker's rollout engine (a Ray actor handle)."""
        self.owned_engines: list[Any] = []
        """Rank 0's handles to the engines it started: Ray ends an actor that is not
        detached once every handle to it is gone, so rank 0 keeps them for the run."""
        self.synced_step: int | None = None
        self.ref_adapter = False
        self.rewards = [0.0, 0.0]
        """Reward sum and count since the last logged step (``log_fields``)."""
        self.stats: dict[str, float] = {}
        self.phases = dict.fromkeys(PHASES, 0.0)
        """Seconds spent in each rollout phase since the last logged step."""

    def row_tokenizer(self, spec: JobSpec) -> Callable[[dict[str, Any], str, Any], dict | None]:
        max_prompt = spec.data.max_seq_len - spec.grpo.max_new_tokens

        def tokenize(row: dict[str, Any], fmt: str, tokenizer: Any) -> dict[str, Any] | None:
            return prompt_tokens(row, tokenizer, max_prompt)

        return tokenize

    def collate(self, pad_id: int, spec: JobSpec) -> Any:
        from ray.data.collate_fn import NumpyBatchCollateFn

        class PromptCollateFn(NumpyBatchCollateFn):
            def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
                return collate_prompts(batch)

        return PromptCollateFn()

    def prepare(self, worker: Worker) -> None:
        """Start (rank 0) or find this worker's rollout engine; load a continued adapter
        again as the frozen reference when ``beta`` asks for one."""
        import ray.train

        from rayft.trainers.collectives import all_sum

        rollouts = worker.inputs.rollouts
        run = ray.train.get_context().get_experiment_name()
        batch = worker.spec.optim.batch_size * self.grpo.num_generations
        if worker.rank == 0:
            self.owned_engines = rollouts.start(
                worker.spec, run, worker.inputs.model_dir, worker.inputs.dtype, batch
            )
        all_sum([0.0])  # every engine exists before any worker looks for its own
        self.engine = rollouts.find(worker.spec, run, worker.rank)
        if self.grpo.beta > 0 and worker.inputs.parent_adapter is not None:
            load_reference_adapter(worker)
            self.ref_adapter = True

    # ------------------------------------------------------------------ rollouts

    def sync_policy(self, worker: Worker, step: int) -> None:
        """Push the policy to the rollout engines if it changed since they last got it.

        Collective (ZeRO-3 gathers the weights on every rank); rank 0 sends them.
        """
        import ray

        from rayft.trainers.collectives import all_sum

        if self.synced_step == step:
            return
        weights = policy_weights(worker)
        if worker.rank == 0:
            engines = all_engines(worker)
            if worker.spec.method == "lora":
                config = inner_model(worker.engine).peft_config["default"].to_dict()
                refs = [e.set_adapter.remote(config, weights) for e in engines]
            else:
                refs = [e.set_base.remote(weights) for e in engines]
            ray.get(refs)
        all_sum([0.0])  # no worker samples before every engine holds the new policy
        self.synced_step = step

    def sample(
        self, worker: Worker, prompts: list[list[int]], n: int, greedy: bool, seed: int
    ) -> list[Any]:
        import ray

        grpo = self.grpo
        return ray.get(
            self.engine.generate.remote(
                prompts,
                n,
                grpo.max_new_tokens,
                0.0 if greedy else grpo.temperature,
                grpo.top_p,
                seed,
            )
        )

    def expand(self, worker: Worker, batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Sample, grade and score one prompt micro-batch; yield it ``num_iterations`` times."""
        import torch

        from rayft.trainers.collectives import all_sum

        grpo, group = self.grpo, self.grpo.num_generations
        step = worker_step(worker)
        clock = time.perf_counter()
        self.sync_policy(worker, step)
        clock = self._lap("sync_s", clock)
        seed = _seed(worker.spec.optim.seed, step, worker.rank)
        answers = self.sample(worker, batch["prompts"], group, greedy=False, seed=seed)
        clock = self._lap("generate_s", clock)
        rewards, errors = self.rewards_of(worker, batch, answers, group)
        clock = self._lap("grade_s", clock)
        rewards = rewards * grpo.reward_scale
        advantages, _ = group_advantages(rewards, group, grpo.scale_rewards)
        part = answer_batch(batch["prompts"], answers, group, worker.pad_id)
        if self.shares_prompts(worker):
            width = part["input_ids"].shape[1]
            part.update(
                shared_prompt_rows(batch["prompts"], answers, group, worker.pad_id, width) or {}
            )
        part.update(
            {
                "advantages": advantages,
                "sample_ids": [s for s in batch["sample_ids"] for _ in range(group)],
                "num_dropped": batch["num_dropped"],
                "num_truncated": batch["num_truncated"],
            }
        )
        tokens = float(part["completion_mask"].sum())
        part["dapo_tokens"] = all_sum([tokens])[0] / worker.world
        self.rewards[0] += float(rewards.sum())
        self.rewards[1] += float(rewards.numel())
        if errors and worker.rank == 0:
            _say(worker, f"[rayft] grader: {errors[0]} ({len(errors)} fault(s) scored 0)")
        device = worker.device
        tensors = {k: v.to(device) for k, v in part.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            if grpo.num_iterations > 1:
                part["old_logps"] = self.policy_logps(worker, tensors).detach()
            if grpo.beta > 0:
                with adapter_reference(worker, self.ref_adapter) as forward:
                    head = inner_model(forward).get_output_embeddings()
                    part["ref_logps"] = token_logps(forward, head, tensors, grpo.temperature)
        self._lap("reference_s", clock)
        for _ in range(grpo.num_iterations):
            yield part

    def shares_prompts(self, worker: Worker) -> bool:
        """``grpo.share_prompt``, where the model takes a block mask (not under
        flash-attention 2, whose kernels take none)."""
        config = inner_model(worker.engine).config
        return self.grpo.share_prompt and config._attn_implementation != "flash_attention_2"

    def _lap(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.phases[phase] += now - since
        return now

    def rewards_of(
        self, worker: Worker, batch: dict[str, Any], answers: list[Any], group: int
    ) -> tuple[torch.Tensor, list[str]]:
        """The grades of the answers (prompt-major), and the graders' faults (each names
        the row's sample id)."""
        import torch

        texts = [
            [answers[i * group + j].text for j in range(group)] for i in range(len(batch["items"]))
        ]
        graded = grade_groups(
            self.grpo.grader or {},
            texts,
            batch["items"],
            0,
            worker.inputs.rollouts,  # loads model graders' judges where the grading runs
            worker.spec.storage,
        )
        scores = [score for g in graded for score, _ in g]
        errors = [
            f"sample {batch['sample_ids'][i][0] if batch['sample_ids'][i] else i}: {e}"
            for i, g in enumerate(graded)
            for _, errs in g
            for e in errs
        ]
        return torch.tensor(scores, dtype=torch.float32), errors

    def policy_logps(self, worker: Worker, batch: dict[str, Any]) -> torch.Tensor:
        engine = worker.engine
        head = inner_model(engine).get_output_embeddings()
        return token_logps(engine, head, batch, self.grpo.temperature)

    def train_loss(self, worker: Worker, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        logps = self.policy_logps(worker, batch)
        mask = batch["completion_mask"][:, 1:]
        total, count, stats = grpo_loss_sums(
            logps,
            batch.get("old_logps"),
            batch.get("ref_logps"),
            batch["advantages"],
            mask,
            self.grpo,
            batch.get("dapo_tokens"),
        )
        self.stats = stats
        return total, count  # type: ignore[return-value]  # a float divisor (dapo, bnpo)

    def log_fields(self, worker: Worker) -> dict[str, float]:
        """The mean grade of the answers sampled since the last logged step (all workers)."""
        from rayft.trainers.collectives import all_sum

        total, count, *phases = all_sum(self.rewards + [self.phases[p] for p in PHASES])
        self.rewards = [0.0, 0.0]
        self.phases = dict.fromkeys(PHASES, 0.0)
        # Phase times are the workers' mean: they run side by side.
        timing = {p: t / worker.world for p, t in zip(PHASES, phases, strict=True)}
        return {"reward": total / max(count, 1.0), **timing}

    # ------------------------------------------------------------------ evaluation

    def eval_sums(self, worker: Worker, batch: dict[str, Any]) -> dict[str, float]:
        """Each held-out prompt answered once, greedily, and graded."""
        step = worker_step(worker)
        self.sync_policy(worker, step)
        answers = self.sample(worker, batch["prompts"], 1, greedy=True, seed=0)
        rewards, _ = self.rewards_of(worker, batch, answers, 1)
        return {
            "grade_sum": float(rewards.sum()),
            "count": float(rewards.numel()),
            "tokens": float(sum(len(a.token_ids) for a in answers)),
        }

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """``eval_reward`` (the mean grade), ``eval_loss`` (its negative), answer tokens."""
        count = sums["count"]
        reward = sums["grade_sum"] / count if count else math.nan
        return {
            "eval_loss": -reward,
            "eval_reward": reward,
            "eval_tokens": int(sums["tokens"]),
            "eval_prompts": int(count),
        }


# --------------------------------------------------------------------------- helpers


def answer_batch(
    prompts: list[list[int]], answers: list[Any], group: int, pad_id: int
) -> dict[str, Any]:
    """Prompt + answer rows, right-padded: ``input_ids``, ``attention_mask``,
    ``position_ids``, ``labels`` (the answer tokens; ``-100`` elsewhere) and
    ``completion_mask`` (1 on answer tokens, aligned with ``input_ids``)."""
    import torch

    rows, labels, masks = [], [], []
    for i, prompt in enumerate(prompts):
        for j in range(group):
            answer = answers[i * group + j].token_ids
            rows.append(list(prompt) + list(answer))
            labels.append([IGNORE_INDEX] * len(prompt) + list(answer))
            masks.append([0] * len(prompt) + [1] * len(answer))
    width = max((len(r) for r in rows), default=1)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    label_t = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask_t = torch.zeros((n, width), dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for k, (row, lab, m) in enumerate(zip(rows, labels, masks, strict=True)):
        input_ids[k, : len(row)] = torch.tensor(row)
        label_t[k, : len(row)] = torch.tensor(lab)
        mask_t[k, : len(row)] = torch.tensor(m)
        attention[k, : len(row)] = 1
    return {
        "input_ids": input_ids,
        "labels": label_t,
        "attention_mask": attention,
        "position_ids": torch.arange(width).expand(n, width).clone(),
        "completion_mask": mask_t,
        "num_tokens": int(attention.sum()),
        "num_label_tokens": int(mask_t.sum()),
    }


def shared_prompt_rows(
    prompts: list[list[int]], answers: list[Any], group: int, pad_id: int, width: int
) -> dict[str, Any] | None:
    """Each prompt once, followed by its group's answers, for the policy's forward.

    A group's ``group`` rows of :func:`answer_batch` repeat the prompt ``group`` times; here
    the prompt's tokens are computed once. Each answer attends to the prompt and to its own
    earlier tokens (a 4-D block mask) at the positions it has in its own row, so every
    answer token's log-prob is the one its own row gives, and the prompt's gradients are the
    sum over the group's answers, as the separate rows add them.

    Args:
        prompts: Each prompt's token ids.
        answers: The sampled answers, prompt-major (``.token_ids``).
        group: Answers per prompt.
        pad_id: Token id for padding.
        width: :func:`answer_batch`'s row width, whose layout the log-probs are put back in.

    Returns:
        ``shared_``-prefixed tensors: ``input_ids``, ``attention_mask`` (additive float32,
        ``[prompts, 1, L, L]``), ``position_ids``; for every answer token, the shared row
        and position whose hidden state predicts it (``src_row``, ``src_pos``), the token
        (``targets``), and where :func:`token_logps` puts it in ``answer_batch``'s layout
        (``dst_row``, ``dst_pos``). ``None`` when a group's row would be longer than
        :data:`SHARED_ROW_LIMIT`.
    """
    import torch

    from rayft.trainers.packing import block_causal_mask

    rows, spans = [], []
    for i, prompt in enumerate(prompts):
        row, starts = list(prompt), []
        for j in range(group):
            starts.append(len(row))
            row += list(answers[i * group + j].token_ids)
        rows.append(row)
        spans.append(starts)
    length = max((len(r) for r in rows), default=1)
    if length > SHARED_ROW_LIMIT:
        return None
    n = len(rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    positions = torch.zeros((n, length), dtype=torch.long)
    # Segment per position: 1 the prompt, j + 2 answer j, 0 padding (block_causal_mask's).
    segments = torch.zeros((n, length), dtype=torch.long)
    src_row, src_pos, targets, dst_row, dst_pos = [], [], [], [], []
    for i, (row, starts) in enumerate(zip(rows, spans, strict=True)):
        size = len(prompts[i])
        input_ids[i, : len(row)] = torch.tensor(row)
        positions[i, :size] = torch.arange(size)
        segments[i, :size] = PROMPT_SEGMENT
        for j, start in enumerate(starts):
            answer = answers[i * group + j].token_ids
            end = start + len(answer)
            positions[i, start:end] = torch.arange(size, size + len(answer))
            segments[i, start:end] = PROMPT_SEGMENT + 1 + j
            for m, token in enumerate(answer):
                src_row.append(i)
                src_pos.append(size - 1 if m == 0 else start + m - 1)
                targets.append(int(token))
                dst_row.append(i * group + j)
                dst_pos.append(size + m - 1)
    mask = block_causal_mask(segments, torch.float32, shared=PROMPT_SEGMENT)
    assert not dst_pos or max(dst_pos) <= width - 2
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return {
        SHARED + "input_ids": input_ids,
        SHARED + "attention_mask": mask,
        SHARED + "position_ids": positions,
        SHARED + "src_row": as_long(src_row),
        SHARED + "src_pos": as_long(src_pos),
        SHARED + "targets": as_long(targets),
        SHARED + "dst_row": as_long(dst_row),
        SHARED + "dst_pos": as_long(dst_pos),
    }


def policy_weights(worker: Worker) -> dict[str, Any] | None:
    """The policy's weights for the rollout engines, on rank 0 (``None`` elsewhere).

    LoRA: the adapter's tensors (``get_peft_model_state_dict``); full: the state dict.
    Under ZeRO-3 every rank takes part in gathering them.
    """
    from rayft.trainers.compat import zero3_full_state_dict

    engine, spec = worker.engine, worker.spec
    module = inner_model(engine)
    if spec.deepspeed.zero_stage == 3:
        state = zero3_full_state_dict(engine)
    else:
        state = None
    if worker.rank != 0:
        return None
    if spec.method == "lora":
        from peft import get_peft_model_state_dict

        weights = get_peft_model_state_dict(module, state_dict=state, adapter_name="default")
    else:
        weights = state if state is not None else module.state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}


def all_engines(worker: Worker) -> list[Any]:
    import ray.train

    run = ray.train.get_context().get_experiment_name()
    find = worker.inputs.rollouts.find
    return [find(worker.spec, run, r) for r in range(worker.spec.grpo.rollout_workers)]


def worker_step(worker: Worker) -> int:
    return int(worker.engine.global_steps)


def _seed(base: int, step: int, rank: int) -> int:
    return (base * 1_000_003 + step * 10_007 + rank * 101) % (1 << 62)


def _say(worker: Worker, line: str) -> None:
    from rayft.trainers.progress import message_record

    if worker.sink is not None:
        worker.sink.push.remote(message_record(line))


def vllm_rollout_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """Why vLLM cannot sample this run's policy, if it cannot (method full: it reloads the
    weights after every step; method lora: it loads the adapter)."""
    native = "or sample on the native engine (grpo.rollout_engine=native)"
    if spec.method != "lora":
        return []
    if spec.lora.use_dora:
        why = "vllm serves no DoRA adapters; set lora.use_dora=false"
    elif spec.lora.r > defaults.VLLM_LORA_RANKS[-1]:
        why = f"vllm takes LoRA ranks up to {defaults.VLLM_LORA_RANKS[-1]}; lower lora.r"
    else:
        return []
    return [("grpo.rollout_engine", f"{why}, {native}")]
