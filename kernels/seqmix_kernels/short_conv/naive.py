"""Causal depthwise short convolution (kernel size K, 2-4 in practice), reference forward and decode step.

Decode state convention (shared by `conv` and `mamba`): state_BCK holds the last K inputs, most recent at
index K-1, zeros before the sequence starts. y_t = gate_t * act(sum_j w[c, j] * x_{t-K+1+j} + bias)
(act and gate optional). The Triton twins with the same signatures live in `seqmix_kernels.short_conv.triton`;
`seqmix_kernels.short_conv.short_conv_fns(impl)` returns the pair for a resolved impl.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def _activate(y: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    if activation == "silu":
        return F.silu(y)
    if activation is not None:
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    return y


def short_conv_ref(
    x_BTC: torch.Tensor,
    weight_CK: torch.Tensor,
    bias_C: Optional[torch.Tensor] = None,
    *,
    state_BCK: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    gate_BTC: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y_BTC, new_state_BCK). state_BCK: the carried last-K inputs, or None for zeros.

    activation: None or "silu", applied after the bias; gate_BTC: multiplies the activated output.
    Computed in fp32, returned in x's dtype; the new state has the carried state's dtype (x's if None).
    """
    B, T, C = x_BTC.shape
    K = weight_CK.shape[-1]
    if state_BCK is None:
        state_BCK = x_BTC.new_zeros(B, C, K)
    xpad_BCT = torch.cat([state_BCK[:, :, 1:].to(x_BTC.dtype), x_BTC.transpose(1, 2)], -1)  # [B, C, K-1+T]
    y = F.conv1d(xpad_BCT.float(), weight_CK.float()[:, None, :], None if bias_C is None else bias_C.float(),
                 groups=C)
    y = _activate(y, activation)
    if gate_BTC is not None:
        y = y * gate_BTC.float().transpose(1, 2)
    full_BCK = torch.cat([state_BCK.to(x_BTC.dtype), x_BTC.transpose(1, 2)], -1)[:, :, -K:]
    return y.transpose(1, 2).to(x_BTC.dtype), full_BCK.to(state_BCK.dtype).contiguous()


def short_conv_step_ref(
    x_BC: torch.Tensor,
    state_BCK: torch.Tensor,
    weight_CK: torch.Tensor,
    bias_C: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    gate_BC: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One token: shifts x_BC into state_BCK IN PLACE and returns y_BC (times gate_BC if given)."""
    state_BCK.copy_(torch.roll(state_BCK, -1, dims=-1))
    state_BCK[:, :, -1] = x_BC.to(state_BCK.dtype)
    y = (state_BCK.float() * weight_CK.float()).sum(-1)
    if bias_C is not None:
        y = y + bias_C.float()
    y = _activate(y, activation)
    if gate_BC is not None:
        y = y * gate_BC.float()
    return y.to(x_BC.dtype)
