"""What a fine-tuning job's HTTP body may hold before it becomes a job spec.

* The ``rayft`` extension sets job-spec keys from an allow-list, ``ALLOWED``: each
  allowed leaf is a plain value (a number, bool, choice or short name of something
  inside the model or the data, never of a file, directory, URI or module) or a
  reference, accepted only as an uploaded file id (``file-...``), a builtin or a
  published name. A key not in the list, including every key added to ``JobSpec``
  later, is refused (400 naming the dotted key) until it is classified here: a
  request never makes the server read a path or URI it chose, nor tells whether one
  exists. ``SET_BY_JOB`` says why the keys a job sets itself are refused.
* ``load_json`` parses the body with its numbers bounded: integers of at most
  ``MAX_DIGITS`` digits and finite floats, or 400 naming the key.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from rayft.serving.errors import BadRequest
from rayft.trainers.config import BUILTIN_EVAL_SETS, schema_keys

Reference = Literal["file_id", "builtin", "published"]
FILE_ID = re.compile(r"file-[A-Za-z0-9]{1,59}")
MAX_DIGITS = 100
"""Longest integer a job body may hold, in digits."""
MAX_TEXT = 256
"""Longest string value of the extension."""
MAX_ITEMS = 64
"""Most items of a list value of the extension."""


@dataclass(frozen=True)
class Allowed:
    """How an allowed key of the extension may be set.

    Attributes:
        refs: Empty for a plain value; otherwise the only forms the value may take.
        builtins: The builtin values accepted (with ``"builtin"`` in ``refs``).
    """

    refs: tuple[Reference, ...] = ()
    builtins: tuple[str, ...] = ()

    def describe(self) -> str:
        forms = {
            "builtin": " or ".join(self.builtins) or "a builtin",
            "file_id": "the id of an uploaded file (file-..., POST /v1/files)",
            "published": "a published model or adapter name",
        }
        return " or ".join(forms[r] for r in self.refs)


VALUE = Allowed()
# Keys that hold names of things inside the model or the data, not of anything the
# server could read: plain values, with strings bounded by MAX_TEXT.
NAMES_NOTHING = {
    "lora.target_modules": "module names inside the model (q_proj, ...)",
    "classification.labels": "label names of the data",
    "classification.text_column": "a column of the data",
    "classification.label_column": "a column of the data",
    "eval.metrics": "metric names (exact_match, ...)",
    "eval.benchmarks": "lm-eval task names of rayft's allow-list (rayft_capitals, ...)",
}
ALLOWED: dict[str, Allowed] = {
    **{
        key: VALUE
        for key in (
            "model.dtype",
            "data.format",
            "data.max_seq_len",
            "data.packing",
            "data.eval_fraction",
            "data.train_on_prompt",
            "data.shuffle",
            "objective",
            "method",
            "lora.r",
            "lora.alpha",
            "lora.dropout",
            "lora.target_modules",
            "lora.use_dora",
            "lora.use_rslora",
            "dpo.beta",
            "dpo.loss",
            "grpo.num_generations",
            "grpo.max_new_tokens",
            "grpo.temperature",
            "grpo.top_p",
            "grpo.beta",
            "grpo.epsilon",
            "grpo.epsilon_high",
            "grpo.loss",
            "grpo.scale_rewards",
            "grpo.reward_scale",
            "grpo.num_iterations",
            "grpo.share_prompt",
            "grpo.rollout_workers",
            "grpo.rollout_cpus",
            "grpo.rollout_gpus",
            "model.attn_implementation",
            "model.compile",
            "classification.labels",
            "classification.text_column",
            "classification.label_column",
            "freeze.trainable_layers",
            "deepspeed.zero_stage",
            "deepspeed.offload_optimizer",
            "deepspeed.offload_params",
            "optim.lr",
            "optim.epochs",
            "optim.max_steps",
            "optim.effective_batch",
            "optim.batch_size",
            "optim.grad_accum",
            "optim.scheduler",
            "optim.warmup_ratio",
            "optim.weight_decay",
            "optim.max_grad_norm",
            "optim.seed",
            "optim.gradient_checkpointing",
            "scaling.num_workers",
            "scaling.use_gpu",
            "scaling.cpus_per_worker",
            "scaling.max_failures",
            "scaling.start_timeout_s",
            "scaling.allocator",
            "checkpoint.every_steps",
            "checkpoint.keep",
            "eval.every_steps",
            "eval.early_stopping_patience",
            "eval.at_start",
            "eval.metrics",
            "eval.max_new_tokens",
            "eval.benchmarks",
            "logging.every_steps",
        )
    },
    "eval.general": Allowed(refs=("builtin", "file_id"), builtins=BUILTIN_EVAL_SETS),
}
"""Every job-spec key the extension may set, and how."""
OLDER_SPELLINGS = {"task": VALUE, "dpo.weights": VALUE}
"""Keys of older specs that ``JobSpec`` rewrites (``trainers.config.upgrade_spelling``)."""
SET_BY_JOB = {
    "storage": "jobs write to the server's storage root",
    "output": "the job publishes under its fine_tuned_model name",
    "tune": "a job is one training run; run sweeps with `rayft tune`",
    "data.train": "set training_file",
    "data.eval": "set validation_file",
    "model.name": "set model",
    "model.adapter": "set model to the adapter or fine_tuned_model to start from",
    "scaling.resources_per_worker": "where workers are placed is the server's choice",
    "data.prepare": "where a job's rows are prepared is the server's choice, by their count",
    "eval.benchmarks_dir": "a job runs rayft's own benchmarks only (eval.benchmarks)",
    "grpo.grader": "set method.reinforcement.grader (method.type reinforcement)",
    "grpo.rollout_engine": "the engine that samples a job's answers is the server's choice",
}
"""Keys (or whole sections) a job body may not set, and what to do instead."""


def _sections() -> set[str]:
    keys = schema_keys()
    return {".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 1)}


def _refuse(key: str, message: str) -> BadRequest:
    return BadRequest(f"rayft.{key}: {message}", code="invalid_job_spec", param=f"rayft.{key}")


def check_extension(extension: dict[str, Any] | None) -> None:
    """Refuse any key of the ``rayft`` extension that is not allowed, or set otherwise.

    Raises:
        BadRequest: Naming the first such key (``rayft.eval.general``) and what is allowed.
    """
    if extension:
        _walk(extension, "", _sections())


def _walk(node: dict[str, Any], prefix: str, sections: set[str]) -> None:
    allowed = {**ALLOWED, **OLDER_SPELLINGS}
    for name, value in node.items():
        key = f"{prefix}{name}"
        if key in SET_BY_JOB:
            raise _refuse(key, f"set by the job: {SET_BY_JOB[key]}")
        if key in allowed:
            _check_value(key, value, allowed[key])
        elif key in sections:
            if isinstance(value, dict):
                _walk(value, f"{key}.", sections)
            # A section that is not a mapping is named by the spec's own validation.
        else:
            raise _refuse(key, f"not a setting a fine-tuning job may set; {_choices(prefix)}")


def _choices(prefix: str) -> str:
    depth = prefix.count(".")
    names = sorted({k.split(".")[depth] for k in ALLOWED if k.startswith(prefix)})
    where = f"under rayft.{prefix.rstrip('.')}" if prefix else "the rayft extension"
    return f"{where} may set {', '.join(names)}"


def _check_value(key: str, value: Any, allowed: Allowed) -> None:
    if allowed.refs:
        _check_reference(key, value, allowed)
        return
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_ITEMS:
        raise _refuse(key, f"a list of {len(items)} items; at most {MAX_ITEMS}")
    for item in items:
        if isinstance(item, dict | list):
            raise _refuse(key, "a value, not a mapping or nested list")
        if isinstance(item, str) and len(item) > MAX_TEXT:
            raise _refuse(key, f"a text of {len(item)} characters; at most {MAX_TEXT}")


def _check_reference(key: str, value: Any, allowed: Allowed) -> None:
    if value is None:
        return
    if isinstance(value, str):
        if "builtin" in allowed.refs and value in allowed.builtins:
            return
        if "file_id" in allowed.refs and FILE_ID.fullmatch(value):
            return
    # The value is never looked up: a path's or URI's existence is nobody's business.
    raise _refuse(key, f"give {allowed.describe()}; paths and URIs are not accepted")


def file_references(extension: dict[str, Any] | None) -> dict[str, str]:
    """``{dotted key: file id}`` for each file id the extension gives (resolve them)."""
    found: dict[str, str] = {}
    for key, allowed in ALLOWED.items():
        if "file_id" not in allowed.refs:
            continue
        node: Any = extension or {}
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, str) and FILE_ID.fullmatch(node):
            found[key] = node
    return found


# -------------------------------------------------------------- JSON numbers


@dataclass(frozen=True)
class _BadNumber:
    """A number of the body refused once its key is known."""

    problem: str


def _parse_int(text: str) -> int | _BadNumber:
    digits = len(text.lstrip("-"))
    if digits > MAX_DIGITS:
        return _BadNumber(f"a number of {digits} digits; at most {MAX_DIGITS}")
    return int(text)


def _parse_float(text: str) -> float | _BadNumber:
    value = float(text)
    if not math.isfinite(value):
        return _BadNumber(f"{text[:20]} is past the largest number; give a finite number")
    return value


def _parse_constant(text: str) -> _BadNumber:
    return _BadNumber(f"{text} is not a number; give a finite number")


def load_json(raw: bytes) -> Any:
    """The JSON body ``raw``, with every number finite and every integer short.

    Raises:
        BadRequest: Not JSON (``invalid_json``), or a number out of bounds (naming its key).
    """
    try:
        body = json.loads(
            raw,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
        _check_numbers(body, "")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("the request body is not valid JSON", code="invalid_json") from None
    return body


def _check_numbers(value: Any, key: str) -> None:
    if isinstance(value, _BadNumber):
        raise BadRequest(
            f"{key or 'body'}: {value.problem}", code="invalid_request", param=key or None
        )
    if isinstance(value, dict):
        children: Any = value.items()
    elif isinstance(value, list):
        children = enumerate(value)
    else:
        return
    for name, child in children:
        _check_numbers(child, f"{key}.{name}" if key else str(name))
