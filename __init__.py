"""rayft: fine-tune, sweep, serve and evaluate LLMs with LoRA and DeepSpeed ZeRO on Ray.

The Python API::

    import rayft

    result = rayft.train("configs/extract-lora.yaml", overrides=["optim.max_steps=20"])
    print(result.run_id, result.artifact.name, result.artifact.manifest.metrics)
    model = rayft.load_adapter(result.artifact.name)  # a peft.PeftModel on its base
    url = rayft.serve("smollm2-135m-instruct")          # the OpenAI-compatible API at url/v1

Every name is imported on first use, so ``import rayft`` loads no torch, Ray or
transformers; the functions live in :mod:`rayft.cluster.api`.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = metadata.version("rayft")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"

# Public name -> "module:attribute" it is imported from on first use.
_EXPORTS = {
    "train": "rayft.cluster.api:train",
    "tune": "rayft.cluster.api:tune",
    "submit": "rayft.cluster.api:submit",
    "serve": "rayft.cluster.api:serve",
    "load_adapter": "rayft.cluster.api:load_adapter",
    "TrainResult": "rayft.cluster.api:TrainResult",
    "SweepResult": "rayft.cluster.api:SweepResult",
    "RunHandle": "rayft.cluster.api:RunHandle",
    "JobSpec": "rayft.trainers.config:JobSpec",
    "ServeArgs": "rayft.serving.app:ServeArgs",
    "ArtifactManifest": "rayft.trainers.registry:ArtifactManifest",
    "ConfigError": "rayft.trainers.config:ConfigError",
    "DataError": "rayft.trainers.data:DataError",
    "ModelError": "rayft.trainers.models:ModelError",
    "RegistryError": "rayft.trainers.registry:RegistryError",
    "UserError": "rayft.cluster.errors:UserError",
    "ClusterError": "rayft.cluster.errors:ClusterError",
    "TrainingFailed": "rayft.cluster.errors:TrainingFailed",
}

__all__ = [
    "__version__",
    "train",
    "tune",
    "submit",
    "serve",
    "load_adapter",
    "TrainResult",
    "SweepResult",
    "RunHandle",
    "JobSpec",
    "ServeArgs",
    "ArtifactManifest",
    "ConfigError",
    "DataError",
    "ModelError",
    "RegistryError",
    "UserError",
    "ClusterError",
    "TrainingFailed",
]

if TYPE_CHECKING:
    from rayft.cluster.api import (
        RunHandle,
        SweepResult,
        TrainResult,
        load_adapter,
        serve,
        submit,
        train,
        tune,
    )
    from rayft.cluster.errors import ClusterError, TrainingFailed, UserError
    from rayft.serving.app import ServeArgs
    from rayft.trainers.config import ConfigError, JobSpec
    from rayft.trainers.data import DataError
    from rayft.trainers.models import ModelError
    from rayft.trainers.registry import ArtifactManifest, RegistryError


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562) and keep it for the next lookup."""
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'rayft' has no attribute {name!r}")
    module, _, attribute = target.partition(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
