"""The job spec: one typed schema for every rayft job, validated at the edge.

A spec is written in YAML, overridden on the command line as ``dotted.key=value``
and travels through Ray as a plain dict (``JobSpec.model_dump(mode="json")``).
Every problem is reported with the dotted key the user must change.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# ':' is allowed after the first character for OpenAI-style names (``ft:<base>:<suffix>:<id>``);
# it is an ordinary character in local paths and object-store keys, never a separator.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class ConfigError(ValueError):
    """A job spec that cannot run; ``problems`` holds ``(dotted_key, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        head = f"invalid job spec {source}" if source else "invalid job spec"
        lines = [f"{head}: {len(problems)} problem(s)"]
        lines += [f"  {key or '<root>'}: {message}" for key, message in problems]
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Raised inside Ray workers and re-raised on the driver: rebuild from the pairs.
        return type(self), (self.problems, self.source)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Section):
    name: str = "smollm2-135m-instruct"
    """Builtin id (``rayft models list``), a local HF directory, or a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto`` is bfloat16 on GPUs/CPUs with native bf16 and float32 elsewhere."""
    adapter: str | None = None
    """A published LoRA adapter for ``name`` to continue training (its weights and LoRA
    shape); the new adapter records it as ``parent_adapter``."""


class DataSpec(_Section):
    train: str | list[str]
    eval: str | list[str] | None = None
    format: Literal["auto", "chat", "prompt_completion", "alpaca", "text", "preference"] = "auto"
    max_seq_len: int = Field(512, ge=8, le=131072)
    packing: bool = False
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    train_on_prompt: bool = False
    """Also compute the loss on prompt/user tokens (default: assistant/completion only)."""
    shuffle: bool = True


class LoraSpec(_Section):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA, Liu et al. 2024): PEFT's ``use_dora``."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``."""


class DpoSpec(_Section):
    """Direct preference optimisation (Rafailov et al. 2023), ``method: dpo``."""

    beta: float = Field(0.1, gt=0)
    """Strength of the KL penalty towards the reference model."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    weights: Literal["lora", "full"] = "lora"
    """What trains: a LoRA adapter (the reference is the base with the adapter disabled)
    or every weight (the reference is a frozen copy, sharded like the policy)."""


class ClassificationSpec(_Section):
    """Sequence classification (``task: classification``): a new head on the base model."""

    labels: list[str] | None = None
    """Label names, in class-id order; by default the sorted distinct labels of the data."""
    text_column: str = "text"
    label_column: str = "label"


class FreezeSpec(_Section):
    trainable_layers: int = Field(2, ge=1)
    """The last N transformer layers (plus final norm and LM head) train; the rest is frozen."""


class DeepSpeedSpec(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False


class OptimSpec(_Section):
    lr: float = Field(2e-4, gt=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; overrides ``epochs`` when set."""
    batch_size: int = Field(8, ge=1)
    """Micro-batch per worker."""
    grad_accum: int = Field(1, ge=1)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    """0 disables gradient clipping."""
    seed: int = 42
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
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Extra Ray resources per worker, e.g. ``{"trainer": 1}`` to place workers on tagged nodes."""
    max_failures: int = Field(3, ge=-1)
    """Worker-group failures Ray Train recovers from by restarting the workers from the
    newest verified checkpoint (``FailureConfig.max_failures``); ``-1`` = unlimited, 0 = none."""
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


class EvalSpec(_Section):
    every_steps: int | None = Field(None, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
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


class LoggingSpec(_Section):
    every_steps: int = Field(1, ge=1)


class OutputSpec(_Section):
    name: str | None = None
    """Registry name; defaults to the run id."""
    overwrite: bool = False
    """Replace an artifact already published under ``name``."""


class TuneSchedulerSpec(_Section):
    type: Literal["asha", "hyperband", "pbt", "none"] = "asha"
    grace_period: int = Field(1, ge=1)
    """In evaluations (reports), not optimizer steps."""
    reduction_factor: float = Field(2, gt=1)
    max_steps: int | None = Field(None, ge=1)
    perturbation_interval: int = Field(2, ge=1)
    mutations: dict[str, Any] = Field(default_factory=dict)
    synch: bool = False
    """PBT only: every trial waits at each perturbation until all have reached it."""


class TuneSpec(_Section):
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    num_samples: int = Field(1, ge=1)
    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: TuneSchedulerSpec = Field(default_factory=TuneSchedulerSpec)
    search: Literal["random", "grid", "optuna", "hyperopt"] = "random"
    max_concurrent_trials: int | None = Field(None, ge=1)
    publish_all: bool = False


class JobSpec(_Section):
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec
    task: Literal["causal_lm", "classification"] = "causal_lm"
    method: Literal["lora", "full", "freeze", "qlora", "dpo"] = "lora"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    dpo: DpoSpec = Field(default_factory=DpoSpec)
    classification: ClassificationSpec = Field(default_factory=ClassificationSpec)
    freeze: FreezeSpec = Field(default_factory=FreezeSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    storage: str | None = None
    """Root for runs, checkpoints and artifacts; defaults to ``$RAYFT_HOME`` (``./.rayft``)."""
    tune: TuneSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-safe dict that ``JobSpec.from_dict`` turns back into this spec."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        return validate_spec(data)

    def has_eval(self) -> bool:
        return self.data.eval is not None or self.data.eval_fraction > 0

    @property
    def weights(self) -> Literal["lora", "full", "freeze"]:
        """What the run trains: a LoRA adapter (``lora``, ``qlora``, DPO on LoRA), every
        weight (``full``, DPO on full weights) or the last layers (``freeze``)."""
        if self.method == "qlora":
            return "lora"
        if self.method == "dpo":
            return self.dpo.weights
        return self.method

    @property
    def objective(self) -> Literal["sft", "dpo", "classification"]:
        """What a step minimises: next-token loss, the DPO loss, or classification loss."""
        if self.method == "dpo":
            return "dpo"
        return "classification" if self.task == "classification" else "sft"


def combination_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """Cross-field checks that a per-field schema cannot express."""
    problems: list[tuple[str, str]] = []
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
    if spec.weights == "lora" and ds.zero_stage == 3 and ds.offload_params:
        problems.append(
            (
                "deepspeed.offload_params",
                "method lora with zero_stage 3 and offload_params is not supported: the frozen "
                "base weights cannot be partitioned to CPU while PEFT wraps them; use "
                "zero_stage 2 (LoRA only trains the small adapter) or method full",
            )
        )
    if spec.has_eval() is False:
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
    if spec.output.name is not None and not valid_name(spec.output.name):
        problems.append(
            (
                "output.name",
                f"{spec.output.name!r} is not a valid artifact name: use letters, digits, "
                "'.', '_', ':' and '-' (at most 128, not starting with '.', ':' or '-')",
            )
        )
    problems += adapter_problems(spec)
    problems += task_problems(spec)
    problems += dpo_problems(spec)
    problems += eval_problems(spec)
    problems += qlora_problems(spec)
    if spec.method == "freeze" and spec.deepspeed.offload_params:
        problems.append(
            (
                "deepspeed.offload_params",
                "method freeze keeps frozen layers in place; parameter offload is for method full",
            )
        )
    return problems


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
    if names and spec.objective != "sft":
        what = "method dpo" if spec.objective == "dpo" else "task classification"
        problems.append(
            (
                "eval.metrics",
                f"generation metrics score generated answers of supervised fine-tuning; {what} "
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
        if spec.task == "classification":
            problems.append(
                (
                    "eval.general",
                    "the general-knowledge check scores a language model's answers; a "
                    "classification model has none: leave eval.general out",
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


def dpo_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """What ``method: dpo`` cannot be combined with (``task`` is in :func:`task_problems`)."""
    problems: list[tuple[str, str]] = []
    if spec.method != "dpo":
        if spec.data.format == "preference":
            problems.append(
                ("data.format", "preference rows (chosen/rejected) train with method dpo")
            )
        return problems
    if spec.data.packing:
        problems.append(
            (
                "data.packing",
                "method dpo compares whole chosen and rejected answers; set data.packing=false",
            )
        )
    if spec.data.format not in ("auto", "preference"):
        problems.append(
            (
                "data.format",
                f"method dpo trains on preference rows, not {spec.data.format}; set "
                "data.format=preference or auto",
            )
        )
    return problems


def task_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """What ``task: classification`` cannot be combined with."""
    if spec.task != "classification":
        return []
    problems: list[tuple[str, str]] = []
    if spec.data.packing:
        problems.append(
            (
                "data.packing",
                "task classification classifies each row on its own; set data.packing=false",
            )
        )
    if spec.method == "dpo":
        problems.append(
            (
                "method",
                "method dpo trains a language model on preference pairs; task classification "
                "takes method lora, full or freeze",
            )
        )
    if spec.model.adapter is not None:
        problems.append(
            (
                "model.adapter",
                "task classification starts a new head on the base model; leave model.adapter out",
            )
        )
    labels = spec.classification.labels
    if labels is not None and (len(labels) < 2 or len(set(labels)) != len(labels)):
        problems.append(
            (
                "classification.labels",
                f"give at least 2 distinct label names, got {labels}",
            )
        )
    return problems


def adapter_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """What is wrong with ``model.adapter`` on its own (the registry is checked on the driver)."""
    name = spec.model.adapter
    if name is None:
        return []
    if not valid_name(name):
        return [("model.adapter", f"{name!r} is not a valid adapter name; give a published name")]
    if spec.weights != "lora":
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


def _pydantic_problem(error: dict[str, Any]) -> tuple[str, str]:
    # Union members add their type name to the location (``data.train.str``); drop them.
    loc = [str(p) for p in error["loc"] if not _is_type_tag(p)]
    key = ".".join(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        return key, "unknown key (check the spelling; `rayft validate --schema` lists every key)"
    if kind == "missing":
        return key, "required key is missing"
    given = error.get("input")
    shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
    return key, f"{error['msg']}{shown}"


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and (
        part in {"str", "int", "float", "bool", "list[str]", "function-after"}
        or part.startswith(("literal[", "list[", "dict[", "function-"))
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``dotted.key=value`` into key parts and a YAML-typed value."""
    if "=" not in text:
        raise ConfigError([(text, "an override is written dotted.key=value")])
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError([(key, "an override key is dotted names, e.g. optim.lr=1e-4")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
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
    try:
        data = yaml.safe_load(p.read_text()) or {}
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


def schema_keys() -> list[str]:
    """Every dotted key of the schema, for ``rayft validate --schema``."""

    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        keys = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = _section_type(ann)
            if sub is not None:
                keys += walk(sub, f"{prefix}{name}.")
            else:
                keys.append(f"{prefix}{name}")
        return keys

    return walk(JobSpec, "")


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
