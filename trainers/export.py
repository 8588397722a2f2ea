"""Merging a published LoRA adapter into its base model as a plain HF model."""

from __future__ import annotations

from pathlib import Path

from rayft.trainers.registry import ArtifactManifest, RegistryError, resolve_adapter
from rayft.trainers.storage import StorageRoot


def export_merged(name: str, out: str | Path, root: StorageRoot) -> Path:
    """Write adapter ``name`` merged into its base as safetensors + tokenizer under ``out``.

    Refuses a non-empty ``out`` so nothing already written is overwritten.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayft.trainers.models import resolve_model

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RegistryError(f"{out} exists and is not empty; choose a new directory for --merge")
    adapter_dir = resolve_adapter(name, root)
    manifest = ArtifactManifest.find(adapter_dir)
    base = (manifest.base_model if manifest is not None else None) or _base_from_config(adapter_dir)
    base_dir = resolve_model(base, root.models, root)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(
        adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    ).save_pretrained(out)
    return out


def _base_from_config(adapter_dir: Path) -> str:
    import json

    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
