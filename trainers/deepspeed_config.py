"""The DeepSpeed config as one pure function of a few typed options."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayft.trainers.config import JobSpec


def zero_config(spec: JobSpec, world_size: int, dtype: str, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed config for ``spec`` on ``world_size`` workers.

    The optimizer and LR schedule are built by rayft and passed to
    ``deepspeed.initialize`` as client objects, so the config carries no
    ``optimizer``/``scheduler`` blocks; DeepSpeed owns gradient accumulation,
    clipping, mixed precision and ZeRO partitioning/offload.

    Args:
        spec: The validated job spec.
        world_size: Number of data-parallel workers.
        dtype: Resolved compute dtype: ``float32``, ``bfloat16`` or ``float16``.
        on_gpu: Whether workers run on CUDA (pins offloaded memory).
    """
    ds = spec.deepspeed
    optim = spec.optim
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(
            {
                "overlap_comm": on_gpu,
                "contiguous_gradients": True,
                "reduce_bucket_size": 5e7,
            }
        )
    if ds.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": 5e7,
                "stage3_param_persistence_threshold": 1e5,
                # Saves a full 16-bit model on save_16bit_model; rayft gathers weights itself.
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": optim.batch_size,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": optim.batch_size * optim.grad_accum * world_size,
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # rayft passes torch's AdamW; allow it with offload instead of DeepSpeedCPUAdam,
        # whose C++ extension would need a compiler on every worker.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
    }
    return config
