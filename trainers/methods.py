"""What trains: LoRA adapters (PEFT), the full model, or only the last layers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from rayft.trainers.config import ADAPTER_METHODS, FreezeSpec, JobSpec, LoraSpec

if TYPE_CHECKING:
    from rayft.trainers.objective import Objective


def apply_lora(model: nn.Module, lora: LoraSpec, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA model; only the adapter weights require grad.

    ``task_type`` is the objective's (``Objective.peft_task_type``): ``SEQ_CLS`` also
    trains (and saves) a new sequence-level head whole, as ``modules_to_save``.

    ``lora.use_dora`` adds DoRA's per-output magnitude vector (``lora_magnitude_vector``);
    ``lora.use_rslora`` scales the update by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        task_type=task_type,
        bias="none",
    )
    return get_peft_model(model, config)


def load_lora(model: nn.Module, parent: Any, lora: LoraSpec) -> nn.Module:
    """Wrap ``model`` in the published adapter ``parent``, trainable, to continue training it.

    The adapter keeps its own rank, alpha, target modules, DoRA and rsLoRA settings (its
    weights have that shape and scale); only ``lora.dropout`` comes from the spec.
    """
    from peft import PeftConfig, PeftModel

    path = str(parent.local_dir())
    config = PeftConfig.from_pretrained(path)
    config.lora_dropout = lora.dropout
    return PeftModel.from_pretrained(model, path, config=config, is_trainable=True)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a causal LM (``model.model.layers`` for Llama-likes)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(
        f"cannot find the {n} decoder layers of {type(model).__name__}; method freeze supports "
        "models whose blocks sit in one ModuleList (Llama, Mistral, Qwen, GPT-2, ...)"
    )


def apply_freeze(model: nn.Module, freeze: FreezeSpec) -> list[str]:
    """Freeze everything but the last ``trainable_layers`` blocks, the final norm and the head.

    With tied input/output embeddings the head is the embedding matrix, so it stays
    frozen: training it would change the early layers this method promises to keep.

    Returns:
        Names of the parameters left trainable.
    """
    layers = decoder_layers(model)
    if freeze.trainable_layers > len(layers):
        raise ValueError(
            f"freeze.trainable_layers={freeze.trainable_layers} but the model has only "
            f"{len(layers)} layers"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for block in list(layers)[-freeze.trainable_layers :]:
        for param in block.parameters():
            param.requires_grad_(True)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    if head is not None and not tied:
        head.weight.requires_grad_(True)
    base = getattr(model, model.base_model_prefix, None)
    norm = getattr(base, "norm", None) or getattr(base, "final_layernorm", None)
    if isinstance(norm, nn.Module):
        for param in norm.parameters():
            param.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def prepare_model(
    model: nn.Module, spec: JobSpec, parent: Any = None, objective: Objective | None = None
) -> nn.Module:
    """Apply ``spec.method`` (and ``optim.gradient_checkpointing``) to a freshly loaded model.

    ``parent`` (a ``trainers.lineage.ParentAdapter``, for ``model.adapter``) is the
    published adapter a LoRA run continues instead of starting a new one. ``objective``
    (default: the spec's, from ``trainers.objectives``) gives the PEFT task type and any
    head that must train whatever the method freezes.
    """
    from rayft.trainers.checkpointing import effective_mode, enable_checkpointing

    if objective is None:
        from rayft.trainers.objectives import objective_for

        objective = objective_for(spec)
    if spec.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Freezes the 4-bit base and keeps norms and the head in float32 for stable
        # training; activation checkpointing is rayft's own (below), not PEFT's.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    mode = effective_mode(spec.optim.gradient_checkpointing, spec.deepspeed.zero_stage)
    enable_checkpointing(model, mode)
    if spec.method in ADAPTER_METHODS:
        if mode:
            model.enable_input_require_grads()
        return (
            apply_lora(model, spec.lora, objective.peft_task_type)
            if parent is None
            else load_lora(model, parent, spec.lora)
        )
    if spec.method == "freeze":
        apply_freeze(model, spec.freeze)
        for param in objective.trainable_head(model):
            param.requires_grad_(True)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split so biases and norms get no weight decay (as HF Trainer)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
