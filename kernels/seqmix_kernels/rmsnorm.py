"""RMSNorm, reference: y = x * rsqrt(mean(x^2) + eps) * w, computed in fp32, returned in x's dtype."""
import torch


def rms_norm_ref(x_BTD: torch.Tensor, weight_D: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x_BTD: [..., D] any float dtype; weight_D: [D]. Normalises over the last dim in fp32."""
    xf = x_BTD.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight_D.float()).to(x_BTD.dtype)
