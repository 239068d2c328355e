"""The one place a DeepSpeed config is made: `build_ds_config(recipe, world_size)` -> the dict for deepspeed.initialize.

The optimizer and learning-rate schedule are not in it: the loop builds them (AdamW with parameter groups, see
`seqmix.train.loop.make_optimizer`) and hands them to DeepSpeed, so one code path serves every ZeRO stage.
"""
from __future__ import annotations

from typing import Any

from seqmix.train.schema import Recipe, grad_accum_steps


def _offload(device: str, nvme_path) -> dict[str, Any]:
    if device == "cpu":
        return {"device": "cpu", "pin_memory": True}
    return {"device": "nvme", "nvme_path": nvme_path, "pin_memory": True}


def build_ds_config(recipe: Recipe, world_size: int) -> dict[str, Any]:
    """DeepSpeed config for `recipe` on `world_size` ranks.

    Gradient accumulation is derived: global_batch = micro_batch * world_size * accumulation, or a RecipeError
    that says which micro batches fit. The run directory records the result as ds_config.json.
    """
    t, z = recipe.train, recipe.zero
    accum = grad_accum_steps(t.global_batch, t.micro_batch, world_size)
    zero: dict[str, Any] = {
        "stage": z.stage,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": z.contiguous_gradients,
        "reduce_bucket_size": z.bucket_size,
    }
    if z.stage in (1, 2):
        zero["allgather_bucket_size"] = z.bucket_size
    if z.stage == 3:
        zero["stage3_prefetch_bucket_size"] = z.bucket_size
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # the loop exports fp32 masters itself
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(z.offload_optimizer, z.nvme_path)
    if z.offload_param != "none":
        zero["offload_param"] = _offload(z.offload_param, z.nvme_path)
    return {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": recipe.optim.grad_clip,
        # bf16 has fp32's range, so nothing overflows that a loss scale could fix; DeepSpeed's default check runs
        # 4-6 small kernels per gradient tensor and a host sync every step (ZeRO 1/2) only to skip a step
        # silently. seqmix's own guard stops the run on a NaN/inf gradient norm instead (seqmix.train.guards).
        "bf16": {"enabled": t.dtype == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": t.dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        "steps_per_print": 1 << 62,  # the loop logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
