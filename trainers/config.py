"""The job spec: one typed schema for every rayft job, validated at the edge.

A spec is written in YAML, overridden on the command line as ``dotted.key=value``
and travels through Ray as a plain dict (``JobSpec.model_dump(mode="json")``).
Every problem is reported with the dotted key the user must change.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from rayft.trainers import bounded_yaml, defaults
from rayft.trainers.attention import AttnImplementation
from rayft.trainers.benchmarks import benchmark_problems
from rayft.trainers.objectives import objective_class
from rayft.trainers.validation_errors import ConfigError, error_key

# ':' is allowed after the first character for OpenAI-style names (``ft:<base>:<suffix>:<id>``);
# it is an ordinary character in local paths and object-store keys, never a separator.
log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class _Section(BaseModel):
    # Each field's docstring is its description: `rayft validate --schema` prints it.
    # No Infinity or NaN in any float: every bound below assumes a finite number.
    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
    )


class ModelSpec(_Section):
    name: str = "smollm2-135m-instruct"
    """Builtin id (``rayft models list``), a local HF directory, or a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto`` is bfloat16 on GPUs that have it (float16 on older GPUs) and float32 on CPUs."""
    attn_implementation: AttnImplementation = "auto"
    """Attention kernels: ``auto`` is ``flash_attention_2`` where the ``flash_attn`` package
    and a CUDA GPU are there (packed rows then need no mask), else ``sdpa``; or ``sdpa``,
    ``eager`` or ``flash_attention_2`` (CUDA and ``flash_attn`` only)."""
    compile: bool = False
    """``torch.compile`` the model for training (DeepSpeed's ``engine.compile()``, PyTorch's
    inductor): fused kernels and a faster step on GPUs (``bench/gpu_components.py
    --compile``: a 1B LoRA step 1.29x faster on an H200). The first steps of each new batch
    shape compile it (seconds to a minute), so it pays off in longer runs. Off by default, as
    Hugging Face's ``torch_compile``."""
    adapter: str | None = None
    """A published LoRA adapter for ``name`` to continue training (its weights and LoRA
    shape); the new adapter records it as ``parent_adapter``."""


class DataSpec(_Section):
    train: str | list[str]
    """Training data: one or more .jsonl/.json/.parquet/.csv files or URIs, or a saved HF
    dataset directory."""
    eval: str | list[str] | None = None
    """Evaluation data in the same forms as ``train``; or split ``train`` with ``eval_fraction``."""
    format: Literal["auto", "chat", "prompt_completion", "alpaca", "text", "preference"] = "auto"
    """Row format; ``auto`` detects it from the first row (``preference`` is for objective dpo)."""
    max_seq_len: int = Field(512, ge=8, le=131072)
    """Longest tokenized example; longer rows are truncated (and counted in the data summary)."""
    packing: bool = False
    """Pack several short examples into each ``max_seq_len`` row (attention kept per example)."""
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of ``train`` held out for evaluation when no ``eval`` file is given."""
    train_on_prompt: bool = False
    """Also compute the loss on prompt/user tokens (default: assistant/completion only)."""
    shuffle: bool = True
    """Shuffle the training rows every epoch (seeded by ``optim.seed``)."""
    prepare: Literal["auto", "driver", "ray"] = "auto"
    """Where rows are tokenized, split, shuffled and packed before training: ``driver``
    in the driver process (no Ray task to start: seconds sooner for small data), ``ray``
    as Ray Data tasks across the cluster (for data larger than the driver should hold),
    ``auto`` the driver for up to ``trainers.data.DRIVER_PREPARE_ROWS`` rows (train and
    eval together), else Ray. Both give the same rows in the same order."""


class LoraSpec(_Section):
    r: int = Field(defaults.LORA_RANK, ge=1, le=1024)
    """Rank of the LoRA update matrices (``trainers.defaults.LORA_RANK`` says why 16)."""
    alpha: float = Field(defaults.RSLORA_ALPHA, gt=0)
    """LoRA scaling numerator: the update is scaled by ``alpha / sqrt(r)`` (``use_rslora``)
    or ``alpha / r``. Default: 8 with rank-stabilised scaling (rank 16's scale is 2, as
    with the classic alpha 32 / r 16), ``2 r`` when ``use_rslora`` is set false."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """Modules that get adapters: ``all-linear`` (every linear layer but the head) or a
    list of module names (e.g. ``[q_proj, v_proj]``)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA, Liu et al. 2024): PEFT's ``use_dora``."""
    use_rslora: bool = True
    """Rank-stabilised LoRA (Kalajdzievski 2023): scale by ``alpha / sqrt(r)`` instead of
    ``alpha / r``, so raising the rank does not shrink the update and the learning rate
    carries over between ranks. Default: true, unless the spec sets ``alpha`` (then the
    classic ``alpha / r`` it was written for)."""


class DpoSpec(_Section):
    """Direct preference optimisation (Rafailov et al. 2023), ``objective: dpo``.

    The reference model follows ``method``: with ``lora`` it is the base with the adapter
    disabled (or the parent adapter when ``model.adapter`` continues one), with ``full`` a
    frozen copy sharded like the policy.
    """

    beta: float = Field(defaults.DPO_BETA, gt=0)
    """Strength of the KL penalty towards the reference model (0.1: the DPO paper's,
    TRL's and LLaMA-Factory's default)."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """``sigmoid``: the DPO loss; ``ipo``: the squared IPO loss (Azar et al. 2023)."""


class ClassificationSpec(_Section):
    """Sequence classification (``objective: classification``): a new head on the base model."""

    labels: list[str] | None = None
    """Label names, in class-id order; by default the sorted distinct labels of the data."""
    text_column: str = "text"
    """Column holding each row's text."""
    label_column: str = "label"
    """Column holding each row's label (a name or a class id)."""


class GrpoSpec(_Section):
    """Group relative policy optimisation (Shao et al. 2024), ``objective: grpo``.

    Each prompt row is answered ``num_generations`` times by the policy, on rayft's serving
    engine running as Ray actors beside the training workers; ``grader`` scores every
    answer, and each answer's advantage is its reward against its group's. The loss, the
    advantages and the log-probabilities are TRL's ``GRPOTrainer``'s for the same keys.
    """

    grader: dict[str, Any] | None = None
    """The reward: a grader in OpenAI's JSON (``string_check``, ``text_similarity``,
    ``python``, ``score_model``, ``label_model`` or ``multi``), with ``{{ item.<field> }}``
    naming the row's other fields and ``{{ sample.output_text }}`` the answer. Required."""
    num_generations: int = Field(4, ge=2, le=64)
    """Answers sampled per prompt (the group)."""
    max_new_tokens: int = Field(64, ge=1, le=4096)
    """Longest sampled answer (TRL's ``max_completion_length``)."""
    temperature: float = Field(1.0, gt=0.0, le=2.0)
    """Sampling temperature; log-probabilities are taken at the same temperature, as TRL."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    beta: float = Field(0.0, ge=0.0)
    """KL penalty towards the reference (the base, or ``model.adapter``'s adapter). 0, the
    default as in TRL, holds no reference at all."""
    epsilon: float = Field(0.2, gt=0.0, lt=1.0)
    """Lower clip of the importance ratio, ``1 - epsilon``."""
    epsilon_high: float | None = Field(None, gt=0.0)
    """Upper clip, ``1 + epsilon_high`` (DAPO's clip-higher); ``epsilon`` when unset."""
    loss: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """How token losses are aggregated, as TRL defines them: ``grpo`` (per-answer mean,
    then mean), ``bnpo`` (mean over the micro-batch's answer tokens), ``dr_grpo`` (sum over
    ``answers x max_new_tokens``), ``dapo`` (mean over the answer tokens of the step across
    workers; TRL's default)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group's reward standard deviation, the batch's, or not
    at all (Dr. GRPO)."""
    reward_scale: float = Field(1.0, gt=0.0)
    """Multiplies every grade before advantages are taken (a grader scores 0..1)."""
    num_iterations: int = Field(1, ge=1, le=16)
    """Optimizer passes over each generated batch (TRL's ``num_iterations``, the paper's
    mu); above 1 the ratio to the sampling policy is clipped by ``epsilon``."""
    share_prompt: bool = True
    """Train on each prompt once per group: the prompt and its group's answers in one row,
    each answer attending to the prompt and to itself (a block mask), so the prompt's
    tokens are computed once rather than ``num_generations`` times; the log-probs and
    gradients are those of one row per answer. Off: one row per answer, as TRL. Not under
    flash-attention 2 (its kernels take no such mask), nor for a group longer than 4,096
    tokens."""
    rollout_workers: int = Field(1, ge=1, le=16)
    """Rollout engines (Ray actors holding the policy for sampling); worker ``r`` samples
    on engine ``r % rollout_workers``."""
    rollout_cpus: float = Field(1.0, gt=0.0, le=64)
    """CPUs each rollout engine reserves."""
    rollout_gpus: float = Field(0.0, ge=0.0, le=8)
    """GPUs each rollout engine reserves."""
    rollout_engine: Literal["native", "vllm"] = "native"
    """What samples the answers: ``native`` (rayft's serving engine) or ``vllm`` (vLLM's
    server beside each rollout actor, ``serving.vllm_engine``; method lora only: the
    policy's adapter reaches it as a new LoRA after every step)."""


class FreezeSpec(_Section):
    trainable_layers: int = Field(2, ge=1)
    """The last N transformer layers (plus final norm and LM head) train; the rest is frozen."""


class DeepSpeedSpec(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 replicates everything, 1 shards optimizer state, 2 also gradients,
    3 also the parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state (and its step) on the CPU; needs zero_stage 1-3."""
    offload_params: bool = False
    """Keep parameters on the CPU between uses; needs zero_stage 3 and method full."""


class OptimSpec(_Section):
    lr: float = Field(defaults.LORA_LR, gt=0)
    """Peak learning rate of AdamW. Default per objective and method
    (``trainers.defaults``, which gives the evidence): LoRA/QLoRA 1e-3, full and freeze
    2e-5, DPO 5e-6 with LoRA and 5e-7 with full. The LoRA rate suits small models
    (SmolLM2-135M); for 7B+ models 2e-4..3e-4 is safer."""
    epochs: int = Field(1, ge=1)
    """Passes over the training data (unless ``max_steps`` is set)."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; overrides ``epochs`` when set."""
    effective_batch: int = Field(defaults.EFFECTIVE_BATCH, ge=1)
    """Examples per optimizer step over all workers (``batch_size x grad_accum x
    num_workers``). When neither ``batch_size`` nor ``grad_accum`` is set, both are derived
    from it (micro-batch at most 8), so 1, 2 or 4 workers take the same optimizer steps;
    with one of them set, the other is derived; with both set they decide and this key
    shows their product. Rounded up to a multiple of the workers. Default 8: LoRA pays for
    large batches and small datasets need the steps (``trainers.defaults.EFFECTIVE_BATCH``)."""
    batch_size: int = Field(8, ge=1)
    """Micro-batch per worker; derived from ``effective_batch`` when not set."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step; derived from ``effective_batch`` when
    not set."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    warmup_ratio: float = Field(defaults.WARMUP_RATIO, ge=0.0, le=1.0)
    """Fraction of the steps spent warming the learning rate up from 0 (0.03: Alpaca's
    and the QLoRA paper's)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay (never applied to biases and norms)."""
    max_grad_norm: float = Field(1.0, ge=0.0)
    """Gradient-norm clipping threshold; 0 disables gradient clipping."""
    seed: int = 42
    """Seed of the model's new weights, dropout and data shuffling."""
    gradient_checkpointing: bool | Literal["selective"] = "selective"
    """Activation checkpointing of the decoder layers: ``false`` keeps every activation,
    ``true`` recomputes each layer in backward (least memory), ``selective`` (the default)
    keeps the matmul and attention outputs and recomputes only the cheap elementwise ops:
    one LoRA step at [4, 512] on SmolLM2-135M peaked at 4797 MiB against 6893 MiB without,
    at about the same step time (``bench/checkpointing_step.py``). Under ZeRO-3
    ``selective`` runs as ``true``: its parameter gathers inside a layer cannot be replayed
    exactly (``trainers.checkpointing.effective_mode``)."""

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_mode(cls, value: Any) -> Any:
        # Only these three: pydantic's lax bool would read "yes" or 1 as true.
        if value is True or value is False or value == "selective":
            return value
        raise ValueError(f"must be false, true or 'selective', got {value!r}")


class ScalingSpec(_Section):
    num_workers: int = Field(2, ge=1)
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool | Literal["auto"] = "auto"
    """One GPU per worker; ``auto``: when the Ray cluster has GPUs."""
    cpus_per_worker: float = Field(1, gt=0)
    """CPUs Ray reserves for each worker."""
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Extra Ray resources per worker, e.g. ``{"trainer": 1}`` to place workers on tagged nodes."""
    max_failures: int = Field(3, ge=-1)
    """Worker-group failures Ray Train recovers from by restarting the workers from the
    newest verified checkpoint (``FailureConfig.max_failures``); ``-1`` = unlimited, 0 = none."""
    start_timeout_s: float = Field(600, gt=0, le=86400, allow_inf_nan=False)
    """Longest wait, in seconds, for the cluster to have what the run needs: a free CPU for
    Ray Data's tokenize tasks, then the workers' resources (Ray Train's worker-group start,
    ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``), then GRPO's rollout engines. The run fails after it, saying what it
    waited for, instead of waiting forever. At most 86400 (a day)."""
    allocator: Literal["auto", "system", "jemalloc"] = "auto"
    """The C allocator of the training workers. ``jemalloc``: the one Ray's wheel ships,
    preloaded into the worker processes and set to reuse freed pages without purging them
    (``trainers.driver.JEMALLOC_CONF``): a CPU worker's peak resident set stays near the
    memory it holds, where glibc's fragmentation adds ~60 %, and steps run faster.
    ``auto`` (the default): jemalloc where Ray ships it, else the system allocator.
    ``system``: glibc's malloc."""


class CheckpointSpec(_Section):
    every_steps: int | None = Field(None, ge=1)
    """Checkpoint every N optimizer steps; the final step is always checkpointed."""
    keep: int = Field(2, ge=1)
    """Newest checkpoints kept per run; older ones are deleted."""


class EvalSpec(_Section):
    every_steps: int | None = Field(None, ge=1)
    """Evaluate every N optimizer steps (besides the start and the end); needs eval data."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after N evaluations without a better ``eval_loss``; needs ``every_steps``."""
    at_start: bool = True
    """Evaluate the untrained model first, so the report shows before and after."""
    metrics: list[str] = Field(default_factory=list)
    """Generation metrics scored at every evaluation of supervised fine-tuning: each eval
    row's prompt is answered greedily and scored against its labelled answer
    (``exact_match``, ``token_f1``, ``rouge_1``, ``rouge_2``, ``rouge_l``, ``bleu``);
    reported as ``eval_<metric>``."""
    max_new_tokens: int = Field(64, ge=1, le=4096)
    """Longest generated answer for ``eval.metrics`` and ``eval.general``."""
    general: str | None = None
    """A general-knowledge set evaluated before and after training (loss, perplexity and
    exact match of greedy answers), so the artifact records what the fine-tune cost:
    ``builtin:general`` (shipped with rayft) or a data file of chat/prompt-completion rows."""
    benchmarks: list[str] = Field(default_factory=list)
    """lm-evaluation-harness tasks scored before and after training and recorded in
    ``rayft.json`` (``benchmarks``): rayft's ``rayft_capitals`` and ``rayft_arithmetic``,
    or tasks of ``eval.benchmarks_dir``. Needs ``pip install 'rayft[eval]'``."""
    benchmarks_dir: str | None = None
    """A local folder of lm-eval task YAML files whose tasks ``eval.benchmarks`` may name."""


class LoggingSpec(_Section):
    every_steps: int = Field(1, ge=1)
    """Print and report the training loss every N optimizer steps."""


class OutputSpec(_Section):
    name: str | None = None
    """Registry name; defaults to the run id."""
    overwrite: bool = False
    """Replace an artifact already published under ``name``."""


class TuneSchedulerSpec(_Section):
    type: Literal["asha", "hyperband", "pbt", "none"] = "asha"
    """Trial scheduler: ASHA or HyperBand early stopping, population-based training, or none."""
    grace_period: int = Field(1, ge=1)
    """In evaluations (reports), not optimizer steps."""
    reduction_factor: float = Field(2, gt=1)
    """ASHA/HyperBand: the fraction 1/N of trials promoted at each rung."""
    max_steps: int | None = Field(None, ge=1)
    """ASHA/HyperBand: the longest a trial runs, in optimizer steps; defaults to
    ``optim.max_steps``."""
    perturbation_interval: int = Field(2, ge=1)
    """PBT: reports between perturbations."""
    mutations: dict[str, Any] = Field(default_factory=dict)
    """PBT: dotted key -> distribution (the ``search_space`` syntax) a perturbation
    resamples from; at least one is needed."""
    synch: bool = False
    """PBT only: every trial waits at each perturbation until all have reached it."""


class TuneSpec(_Section):
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Dotted key -> distribution, e.g. ``optim.lr: {loguniform: [1e-4, 3e-3]}`` (``choice``,
    ``grid``, ``uniform``, ``loguniform``, ``randint``)."""
    num_samples: int = Field(1, ge=1)
    """Trials to run (with ``grid``: repeats of the whole grid)."""
    metric: str = "eval_loss"
    """Reported metric that ranks trials and drives the scheduler."""
    mode: Literal["min", "max"] = "min"
    """Whether a lower or a higher ``metric`` is better."""
    scheduler: TuneSchedulerSpec = Field(default_factory=TuneSchedulerSpec)
    """Trial scheduler; a bare name (``scheduler: asha``) takes its defaults."""
    search: Literal["random", "grid", "optuna", "hyperopt"] = "random"
    """How trial configurations are chosen from ``search_space``."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials running at once; by default as many as the cluster's CPUs/GPUs fit."""
    publish_all: bool = False
    """Publish every finished trial's artifact, not only the best one."""

    @field_validator("scheduler", mode="before")
    @classmethod
    def _bare_scheduler_name(cls, value: Any) -> Any:
        # `scheduler: asha` is the natural spelling of `scheduler: {type: asha}`.
        return {"type": value} if isinstance(value, str) else value


ObjectiveName = Literal["sft", "dpo", "classification", "grpo"]
MethodName = Literal["lora", "qlora", "full", "freeze"]
ADAPTER_METHODS = ("lora", "qlora")
"""Methods whose run trains, and publishes, a LoRA adapter (the others publish a model)."""


class JobSpec(_Section):
    model: ModelSpec = Field(default_factory=ModelSpec)
    """The base model (and an adapter to continue)."""
    data: DataSpec
    """Training and evaluation data."""
    objective: ObjectiveName = "sft"
    """What a step minimises: ``sft`` (the next-token loss on the labelled tokens), ``dpo``
    (the DPO loss on preference pairs, see ``dpo``) or ``classification`` (a new
    classification head, see ``classification``) or ``grpo`` (reinforcement fine-tuning
    on graded samples, see ``grpo``). Older spellings ``method: dpo`` and
    ``task: classification`` are still read."""
    method: MethodName = "lora"
    """What trains: ``lora`` (a PEFT adapter), ``qlora`` (LoRA on a 4-bit base, CUDA only),
    ``full`` (every weight) or ``freeze`` (the last ``freeze.trainable_layers`` layers)."""
    lora: LoraSpec = Field(default_factory=LoraSpec)
    """LoRA adapter shape (method lora and qlora)."""
    dpo: DpoSpec = Field(default_factory=DpoSpec)
    """DPO settings (objective dpo)."""
    classification: ClassificationSpec = Field(default_factory=ClassificationSpec)
    """Classification columns and labels (objective classification)."""
    grpo: GrpoSpec = Field(default_factory=GrpoSpec)
    """Rollouts, grader and loss (objective grpo)."""
    freeze: FreezeSpec = Field(default_factory=FreezeSpec)
    """What trains under method freeze."""
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    """DeepSpeed ZeRO sharding and offload."""
    optim: OptimSpec = Field(default_factory=OptimSpec)
    """Optimizer, schedule and length of training."""
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    """Ray Train workers and their resources."""
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    """When checkpoints are written and how many are kept."""
    eval: EvalSpec = Field(default_factory=EvalSpec)
    """When and how the model is evaluated during training."""
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    """How often progress is reported."""
    output: OutputSpec = Field(default_factory=OutputSpec)
    """Where the result is published in the registry."""
    storage: str | None = None
    """Root for runs, checkpoints and artifacts; defaults to ``$RAYFT_HOME`` (``./.rayft``)."""
    tune: TuneSpec | None = None
    """Sweep settings, read by ``rayft tune`` only."""

    @model_validator(mode="after")
    def _defaults(self) -> JobSpec:
        # Every JobSpec, however made (validate_spec, model_validate, JobSpec(...)), carries
        # the per-method defaults in the keys it left unset.
        resolve_defaults(self)
        return self

    @model_validator(mode="before")
    @classmethod
    def _older_spellings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data, notes = upgrade_spelling(data)
        if notes:
            # One line on stderr, also where the CLI hides libraries' FutureWarnings.
            log.warning("job spec: %s", "; ".join(notes))
        return data

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-safe dict that ``JobSpec.from_dict`` turns back into this spec."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        return validate_spec(data)

    def has_eval(self) -> bool:
        return self.data.eval is not None or self.data.eval_fraction > 0

    def older_keys(self) -> dict[str, str]:
        """``method`` and ``task`` as rayft wrote them before ``objective`` existed
        (``method: dpo``, ``task: classification``), for records older readers parse:
        an artifact's ``rayft.json`` and a fine-tuning job's ``rayft`` part."""
        return {
            "method": "dpo" if self.objective == "dpo" else self.method,
            "task": "classification" if self.objective == "classification" else "causal_lm",
        }


def upgrade_spelling(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``data`` with the older spellings of the objective rewritten, and a note for each.

    ``method: dpo`` (with ``dpo.weights``) becomes ``objective: dpo`` with ``method:
    <dpo.weights>``; ``task: classification`` becomes ``objective: classification``;
    ``task: causal_lm`` is dropped. ``data`` itself is not changed.

    Raises:
        PydanticCustomError: An older spelling contradicts another key (``ctx["key"]``
            names the one to change).
    """
    out = dict(data)
    weights = None
    if isinstance(out.get("dpo"), dict) and "weights" in out["dpo"]:
        out["dpo"] = dict(out["dpo"])
        weights = out["dpo"].pop("weights")
    task = out.pop("task", None)
    if task not in (None, "causal_lm", "classification"):
        raise PydanticCustomError(
            "older_spelling",
            "task: {task} is not a task; write objective: sft, dpo or classification",
            {"key": "task", "task": repr(task)},
        )
    _settle_objective(out, task)
    notes: list[str] = []
    if data.get("method") == "dpo":
        out["method"] = weights or "lora"
        notes.append(f"method: dpo is now written objective: dpo with method: {out['method']}")
    elif weights is not None:
        if out.get("objective") == "dpo" and out.setdefault("method", weights) != weights:
            _conflict("dpo.weights", f"dpo.weights: {weights}", f"method: {out['method']}")
        notes.append(f"dpo.weights: {weights} is now written method: {weights}")
    if task == "classification":
        notes.append("task: classification is now written objective: classification")
    elif task == "causal_lm":
        notes.append("task: causal_lm is no longer written (objective: sft is the default)")
    return out, notes


def _settle_objective(out: dict[str, Any], task: str | None) -> None:
    """Set ``objective`` from what the spec says, in any spelling, if they agree."""
    claims = []  # (key, as written, the objective it means)
    if "objective" in out:
        claims.append(("objective", f"objective: {out['objective']}", out["objective"]))
    if out.get("method") == "dpo":
        claims.append(("method", "method: dpo", "dpo"))
    if task == "classification":
        claims.append(("task", "task: classification", "classification"))
    if task == "causal_lm" and out.get("objective") == "classification":
        _conflict("task", "task: causal_lm", "objective: classification")
    for key, written, objective in claims[1:]:
        if objective != claims[0][2]:
            _conflict(key, written, claims[0][1])
    if claims:
        out["objective"] = claims[0][2]


def _conflict(key: str, older: str, other: str) -> None:
    raise PydanticCustomError(
        "older_spelling",
        "{older} (an older spelling) contradicts {other}; write one objective, and the "
        "method that trains",
        {"key": key, "older": older, "other": other},
    )


Problems = list[tuple[str, str]]


def combination_problems(spec: JobSpec) -> Problems:
    """Cross-field checks that a per-field schema cannot express."""
    checks = (
        deepspeed_problems,
        eval_data_problems,
        output_problems,
        adapter_problems,
        objective_problems,
        eval_problems,
        benchmark_spec_problems,
        qlora_problems,
        attention_problems,
    )
    return [problem for check in checks for problem in check(spec)]


def deepspeed_problems(spec: JobSpec) -> Problems:
    """ZeRO stages and offloads that do not go together, or not with ``method``."""
    problems: Problems = []
    ds = spec.deepspeed
    if ds.offload_params and ds.zero_stage != 3:
        problems.append(
            (
                "deepspeed.offload_params",
                f"parameter offload needs ZeRO stage 3, got zero_stage={ds.zero_stage}; "
                "set deepspeed.zero_stage=3 or deepspeed.offload_params=false",
            )
        )
    if ds.offload_optimizer and ds.zero_stage == 0:
        problems.append(
            (
                "deepspeed.offload_optimizer",
                "optimizer offload needs ZeRO stage 1, 2 or 3; set deepspeed.zero_stage>=1",
            )
        )
    if spec.method in ADAPTER_METHODS and ds.zero_stage == 3 and ds.offload_params:
        problems.append(
            (
                "deepspeed.offload_params",
                f"method {spec.method} with zero_stage 3 and offload_params is not supported: "
                "the frozen base weights cannot be partitioned to CPU while PEFT wraps them; "
                "use zero_stage 2 (LoRA only trains the small adapter) or method full",
            )
        )
    if spec.method == "freeze" and ds.offload_params:
        problems.append(
            (
                "deepspeed.offload_params",
                "method freeze keeps frozen layers in place; parameter offload is for method full",
            )
        )
    return problems


def eval_data_problems(spec: JobSpec) -> Problems:
    """Evaluation settings that need evaluation data, or periodic evaluation."""
    problems: Problems = []
    if not spec.has_eval():
        if spec.eval.every_steps is not None:
            problems.append(
                (
                    "eval.every_steps",
                    "evaluation needs data: set data.eval or data.eval_fraction > 0",
                )
            )
        if spec.eval.early_stopping_patience is not None:
            problems.append(
                (
                    "eval.early_stopping_patience",
                    "early stopping needs evaluation data: set data.eval or data.eval_fraction",
                )
            )
    if spec.eval.early_stopping_patience is not None and spec.eval.every_steps is None:
        problems.append(
            (
                "eval.early_stopping_patience",
                "early stopping needs periodic evaluation: set eval.every_steps",
            )
        )
    if spec.data.eval is not None and spec.data.eval_fraction > 0:
        problems.append(
            (
                "data.eval_fraction",
                "give either data.eval (a file) or data.eval_fraction (a split of train), not both",
            )
        )
    return problems


def output_problems(spec: JobSpec) -> Problems:
    """``output.name`` must be one safe registry path component."""
    name = spec.output.name
    if name is None or valid_name(name):
        return []
    return [
        (
            "output.name",
            f"{name!r} is not a valid artifact name: use letters, digits, "
            "'.', '_', ':' and '-' (at most 128, not starting with '.', ':' or '-')",
        )
    ]


def eval_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """What ``eval.metrics`` and ``eval.general`` need."""
    from rayft.trainers.metrics import GENERATION_METRICS

    problems: list[tuple[str, str]] = []
    names = spec.eval.metrics
    unknown = [n for n in names if n not in GENERATION_METRICS]
    if unknown:
        problems.append(
            (
                "eval.metrics",
                f"unknown metric {unknown[0]!r}; choose from {', '.join(GENERATION_METRICS)}",
            )
        )
    objective = objective_class(spec)
    if names and not objective.generation_metrics:
        problems.append(
            (
                "eval.metrics",
                "generation metrics score generated answers of supervised fine-tuning; "
                f"objective {spec.objective} "
                "reports its own evaluation metrics: leave eval.metrics out",
            )
        )
    if names and not spec.has_eval():
        problems.append(
            (
                "eval.metrics",
                "generation metrics need evaluation data: set data.eval or data.eval_fraction",
            )
        )
    general = spec.eval.general
    if (names or general) and spec.deepspeed.zero_stage == 3:
        key = "eval.metrics" if names else "eval.general"
        problems.append(
            (
                key,
                "generating answers during training is not supported with ZeRO stage 3 yet "
                "(its parameter prefetch breaks the next step's activation recompute); set "
                "deepspeed.zero_stage=2, or score a published model with `rayft eval`",
            )
        )
    if general is not None:
        if not objective.language_model:
            problems.append(
                (
                    "eval.general",
                    "the general-knowledge check scores a language model's answers; a "
                    f"{spec.objective} model has none: leave eval.general out",
                )
            )
        if general.startswith("builtin:") and general not in BUILTIN_EVAL_SETS:
            problems.append(
                (
                    "eval.general",
                    f"no builtin set {general!r}; use {', '.join(BUILTIN_EVAL_SETS)} or a data file",
                )
            )
    return problems


BUILTIN_EVAL_SETS = ("builtin:general",)


def benchmark_spec_problems(spec: JobSpec) -> Problems:
    """``eval.benchmarks``: tasks rayft ships or ``eval.benchmarks_dir`` holds, for a
    language model."""
    tasks, folder = spec.eval.benchmarks, spec.eval.benchmarks_dir
    if not tasks:
        return (
            [("eval.benchmarks_dir", "no task of it is named in eval.benchmarks")] if folder else []
        )
    if not objective_class(spec).language_model:
        return [
            (
                "eval.benchmarks",
                f"lm-eval benchmarks score a language model; a {spec.objective} model has "
                "none: leave eval.benchmarks out",
            )
        ]
    problems = [("eval.benchmarks", problem) for problem in benchmark_problems(tasks, folder)]
    if importlib.util.find_spec("lm_eval") is None:
        problems.append(
            ("eval.benchmarks", "benchmarks need lm-evaluation-harness: pip install 'rayft[eval]'")
        )
    return problems


def attention_problems(spec: JobSpec) -> Problems:
    """``flash_attention_2`` runs on CUDA only: refused where the spec keeps workers off GPUs.

    With ``scaling.use_gpu`` ``true`` or ``auto`` the workers check again when they load the
    model (``trainers.attention.resolve_attention``), where the GPU and ``flash_attn`` are.
    """
    if spec.model.attn_implementation != "flash_attention_2" or spec.scaling.use_gpu is not False:
        return []
    return [
        (
            "model.attn_implementation",
            "flash_attention_2 needs a CUDA GPU, but scaling.use_gpu is false; set "
            "model.attn_implementation=auto or sdpa, or scaling.use_gpu=true",
        )
    ]


def qlora_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """``method: qlora`` quantizes the base with bitsandbytes, which needs CUDA.

    With ``scaling.use_gpu: true`` the workers are promised GPUs elsewhere (a driver on a
    CPU head node), so only ``false``, or ``auto`` where no CUDA device is visible, is
    refused here; the workers check again when they load the model.
    """
    if spec.method != "qlora" or spec.scaling.use_gpu is True:
        return []
    if spec.scaling.use_gpu == "auto":
        import torch

        if torch.cuda.is_available():
            return []
        where = "no CUDA device is visible on this machine"
    else:
        where = "scaling.use_gpu is false"
    return [
        (
            "method",
            f"method: qlora needs a CUDA GPU (bitsandbytes 4-bit NF4 weights), but {where}; "
            "use method lora, or run on a machine with a CUDA GPU (scaling.use_gpu=true)",
        )
    ]


def objective_problems(spec: JobSpec) -> Problems:
    """What ``spec.objective`` refuses in the rest of the spec (its ``spec_problems`` hook,
    ``trainers.objective``)."""
    return objective_class(spec).spec_problems(spec)


def adapter_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """What is wrong with ``model.adapter`` on its own (the registry is checked on the driver)."""
    name = spec.model.adapter
    if name is None:
        return []
    if not valid_name(name):
        return [("model.adapter", f"{name!r} is not a valid adapter name; give a published name")]
    if spec.method not in ADAPTER_METHODS:
        return [
            (
                "model.adapter",
                f"continuing from adapter {name!r} needs method lora (got {spec.method}); "
                "set method=lora, or leave model.adapter out to fine-tune the base model",
            )
        ]
    return []


def valid_name(name: str) -> bool:
    """True when ``name`` is safe as one path component in the registry."""
    return bool(NAME_PATTERN.match(name)) and ".." not in name


def validate_spec(data: dict[str, Any], source: str | None = None) -> JobSpec:
    """Build a ``JobSpec`` from a plain dict, or raise ``ConfigError`` listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError([("", f"a job spec is a mapping, got {type(data).__name__}")], source)
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as err:
        raise ConfigError([_pydantic_problem(e) for e in err.errors()], source) from None
    problems = combination_problems(spec)
    if problems:
        raise ConfigError(problems, source)
    return spec


def resolve_defaults(spec: JobSpec) -> None:
    """Write the per-method defaults (``trainers.defaults``) into the keys ``spec`` left unset.

    Only keys the spec did not set change (pydantic's ``model_fields_set``); a value the
    user wrote always wins. ``optim.lr`` follows the objective and method;
    ``optim.batch_size``/``grad_accum`` are split from ``optim.effective_batch`` over the
    workers (``defaults.split_batch``) and ``effective_batch`` then says their product;
    ``lora.use_rslora`` is false when the spec sets ``lora.alpha``, and ``lora.alpha`` is
    ``2 r`` when the spec turns rsLoRA off. Every resolved key is then set, so resolving
    again, or validating ``to_dict()``, gives the same spec. ``JobSpec`` runs it on
    construction.
    """
    optim, lora = spec.optim, spec.lora
    optim_set, lora_set = set(optim.model_fields_set), set(lora.model_fields_set)
    if "lr" not in optim_set:
        optim.lr = defaults.default_lr(spec.objective, spec.method)
    workers = spec.scaling.num_workers
    given = {k: getattr(optim, k) for k in ("batch_size", "grad_accum") if k in optim_set}
    if "effective_batch" in optim_set or not given:
        optim.batch_size, optim.grad_accum = defaults.split_batch(
            optim.effective_batch, workers, **given
        )
    # else batch_size or grad_accum alone keeps the other at its plain default
    optim.effective_batch = optim.batch_size * optim.grad_accum * workers
    lora.use_rslora = lora.use_rslora if "use_rslora" in lora_set else "alpha" not in lora_set
    if "alpha" not in lora_set:
        lora.alpha = defaults.lora_alpha(lora.r, lora.use_rslora)


def _pydantic_problem(error: dict[str, Any]) -> tuple[str, str]:
    ctx = error.get("ctx") or {}
    key = error_key(error["loc"], JobSpec) or str(ctx.get("key", ""))
    kind = error["type"]
    if kind == "extra_forbidden":
        return key, "unknown key (check the spelling; `rayft validate --schema` lists every key)"
    if kind == "missing":
        return key, "required key is missing"
    given = error.get("input")
    shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
    return key, f"{error['msg']}{shown}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``dotted.key=value`` into key parts and a YAML-typed value."""
    if "=" not in text:
        raise ConfigError([(text, "an override is written dotted.key=value")])
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError([(key, "an override key is dotted names, e.g. optim.lr=1e-4")])
    try:
        value = bounded_yaml.load(raw) if raw.strip() else ""
    except bounded_yaml.SpecBoundsError as err:
        where = ".".join(part for part in (key.strip(), err.key) if part)
        raise ConfigError([(where, err.message)]) from None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with every ``dotted.key=value`` applied."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                key = ".".join(parts[: depth + 1])
                raise ConfigError([(key, f"is a value, not a section; cannot set {text!r}")])
            node = child
        node[parts[-1]] = value
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key`` (dotted) set to ``value``."""
    import copy

    out = copy.deepcopy(data)
    parts = key.split(".")
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML job spec; a missing or unparsable file is a ``ConfigError``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([("", f"config file not found: {p}")], str(p))
    size, most = p.stat().st_size, bounded_yaml.MAX_BYTES
    if size > most:
        raise ConfigError([("", f"the file is {size} bytes; a spec has at most {most}")], str(p))
    try:
        data = bounded_yaml.load(p.read_bytes()) or {}
    except bounded_yaml.SpecBoundsError as err:
        raise ConfigError([(err.key, err.message)], str(p)) from None
    except UnicodeDecodeError:
        raise ConfigError([("", f"{p}: not UTF-8 text")], str(p)) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError([("", f"{where}: not valid YAML ({err})")], str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError([("", "a job spec is a YAML mapping of sections")], str(p))
    return data


def load_spec(path: str | os.PathLike[str], overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a job spec file."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return validate_spec(data, source=str(path))


def dump_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)


@dataclass(frozen=True)
class SchemaField:
    """One leaf key of the job spec, as ``rayft validate --schema`` lists it."""

    key: str
    """Dotted key, e.g. ``optim.lr``."""
    type: str
    """Accepted values, e.g. ``float``, ``auto|float32|bfloat16|float16``, ``int | None``."""
    default: str | None
    """The default as YAML would write it; ``None`` for a required key."""
    description: str
    """What the key does (the field's docstring)."""


def schema_fields() -> list[SchemaField]:
    """Every leaf key of the schema with its type, default and description."""

    def walk(model: type[BaseModel], prefix: str) -> list[SchemaField]:
        rows: list[SchemaField] = []
        for name, field in model.model_fields.items():
            sub = _section_type(field.annotation)
            if sub is not None:
                rows += walk(sub, f"{prefix}{name}.")
                continue
            default = None if field.is_required() else field.get_default(call_default_factory=True)
            rows.append(
                SchemaField(
                    key=f"{prefix}{name}",
                    type=_type_text(field.annotation),
                    default=None if field.is_required() else _yaml_value(default),
                    description=" ".join((field.description or "").split()),
                )
            )
        return rows

    return walk(JobSpec, "")


def schema_keys() -> list[str]:
    """Every dotted key of the schema, for ``rayft validate --schema``."""
    return [row.key for row in schema_fields()]


def _type_text(ann: Any) -> str:
    import types
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_type_text(a) for a in args)
    if ann is type(None):
        return "None"
    if args:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_text(a) for a in args)}]"
    return getattr(ann, "__name__", str(ann))


def _yaml_value(value: Any) -> str:
    return (
        yaml.safe_dump(value, default_flow_style=True, width=1000)
        .strip()
        .removesuffix("...")
        .strip()
    )


def _section_type(ann: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(ann, type) and issubclass(ann, _Section):
        return ann
    for arg in typing.get_args(ann):
        if isinstance(arg, type) and issubclass(arg, _Section):
            return arg
    return None


def has_key(key: str) -> bool:
    """True when ``key`` (dotted) names a leaf of the job-spec schema."""
    return key in set(schema_keys())
