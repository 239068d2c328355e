"""RMSNorm, reference: y = x * rsqrt(mean(x^2) + eps) * w, computed in fp32; and its fusion with the residual add.

The Triton twin of `rms_norm_residual_ref` (same signature) is `seqmix_kernels.rmsnorm.triton.rms_norm_residual`;
`seqmix_kernels.rmsnorm.rms_norm_residual_fn(impl)` returns the one for a resolved impl.
"""
from typing import Optional

import torch


def rms_norm_ref(x_BTD: torch.Tensor, weight_D: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x_BTD: [..., D] any float dtype; weight_D: [D]. Normalises over the last dim in fp32."""
    xf = x_BTD.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight_D.float()).to(x_BTD.dtype)


def rms_norm_residual_ref(
    x_BTD: Optional[torch.Tensor],
    residual_BTD: torch.Tensor,
    weight_D: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm block boundary: residual += x (in fp32), then y = RMSNorm(residual) * w.

    x_BTD: [..., D] a branch output (any float dtype), or None to only normalise the residual.
    residual_BTD: [..., D] fp32 residual stream. weight_D: [D].
    Returns (y in weight's dtype, the new fp32 residual). Not in place.
    """
    r = residual_BTD.float() if x_BTD is None else residual_BTD.float() + x_BTD.float()
    y = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * weight_D.float()
    return y.to(weight_D.dtype), r
