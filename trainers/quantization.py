"""How ``method: qlora`` loads its base: 4-bit NF4 weights through bitsandbytes, on CUDA."""

from __future__ import annotations

from typing import Any

import torch


def qlora_quantization(compute_dtype: str) -> Any:
    """The ``BitsAndBytesConfig`` of ``method: qlora``: a 4-bit NF4 base (Dettmers et al. 2023).

    Double quantization also quantizes the per-block scales; matmuls run in
    ``compute_dtype`` (bfloat16 on GPUs that have it). The packed 4-bit weights are
    stored in that same dtype so ZeRO-3 can partition them with every other parameter.
    """
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def qlora_load_kwargs(compute_dtype: str) -> dict[str, Any]:
    """``from_pretrained`` arguments that load the base in 4-bit on this worker's GPU.

    Raises:
        RuntimeError: No CUDA device, or bitsandbytes is not installed.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "method: qlora needs a CUDA GPU on every training worker and this one has none; "
            "use method lora, or give the workers GPUs (scaling.use_gpu=true)"
        )
    try:
        import bitsandbytes  # noqa: F401 - transformers imports it by name
    except ImportError:
        raise RuntimeError(
            "method: qlora needs bitsandbytes on the training workers: "
            "pip install 'rayft[gpu]' (or pip install bitsandbytes)"
        ) from None
    # Ray Train gives each worker one visible GPU: its current device.
    return {
        "quantization_config": qlora_quantization(compute_dtype),
        "device_map": {"": torch.cuda.current_device()},
    }
