"""Which dtype a model computes in on the device it runs on (``model.dtype``).

Needs only torch, so the GPU checks that run without Ray, DeepSpeed or pydantic can import it.
"""

from __future__ import annotations

import torch

BF16_GPU_TYPES = frozenset(
    {"A100", "A10G", "A10", "A30", "A40", "L4", "L40", "L40S", "H100", "H200", "H20", "GH200"}
    | {"B100", "B200", "GB200", "RTX-PRO-6000"}
)
"""Ray's ``accelerator_type`` names of NVIDIA GPUs with native bfloat16 (compute capability
8.0 or newer). An allow-list: a GPU type not named here computes in float16."""


def gpu_has_bf16(cluster_resources: dict[str, float]) -> bool | None:
    """Whether the GPUs that will train have native bfloat16.

    The GPU of this process answers when there is one (``torch.cuda.is_bf16_supported()``).
    A driver without one (a CPU head node, or a Ray actor, which sees no GPU) reads the
    ``accelerator_type:<name>`` resources Ray gives each GPU node: bf16 only when every GPU
    type in the cluster is in :data:`BF16_GPU_TYPES`.

    Returns:
        ``True`` or ``False``, or ``None`` when neither this process nor the cluster says.
    """
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    prefix = "accelerator_type:"
    types = {key[len(prefix) :] for key in cluster_resources if key.startswith(prefix)}
    gpu_types = {t for t in types if not t.upper().startswith("TPU")}
    if not gpu_types:
        return None
    return gpu_types <= BF16_GPU_TYPES


def resolve_dtype(requested: str, on_gpu: bool, gpu_bf16: bool | None = None) -> str:
    """Turn ``model.dtype`` into the dtype workers compute in.

    ``auto`` is bfloat16 on GPUs that have it (``gpu_bf16``, see :func:`gpu_has_bf16`;
    ``None`` asks this process's GPU), float16 on other GPUs, and float32 on CPUs: even
    CPUs that advertise AVX512-BF16/AMX often run bf16 matmuls far slower than fp32 under
    PyTorch (measured ~100x on such a virtual machine), so bf16 on a CPU is only used
    when asked for explicitly.
    """
    if requested == "auto":
        if on_gpu:
            if gpu_bf16 is None:
                gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            return "bfloat16" if gpu_bf16 else "float16"
        return "float32"
    if requested == "float16" and not on_gpu:
        raise ValueError("model.dtype=float16 needs a GPU; use float32 or auto on CPU")
    return requested
