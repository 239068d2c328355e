"""Rotary position embedding (GPT-NeoX rotate-half style) on the first `rotary_dim` channels, reference."""
from typing import Union

import torch


def rotary_ref(
    x_BTHD: torch.Tensor,
    pos_offset: Union[int, torch.Tensor] = 0,
    rotary_dim: int = -1,
    base: float = 10000.0,
) -> torch.Tensor:
    """Rotate x_BTHD [B, T, H, D] at positions pos_offset + t.

    pos_offset: an int, or an int64 tensor [B] (per-sequence offsets, e.g. during decode).
    rotary_dim: channels rotated (even, <= D; -1 means all of D); the rest pass through.
    Angles are computed in fp32; the result has x's dtype.
    """
    B, T, H, D = x_BTHD.shape
    R = D if rotary_dim == -1 else rotary_dim
    if R % 2 or R > D:
        raise ValueError(f"rotary_dim must be even and <= head dim {D}, got {R}")
    if R == 0:
        return x_BTHD
    dev = x_BTHD.device
    inv_freq_R2 = 1.0 / (base ** (torch.arange(0, R, 2, device=dev, dtype=torch.float32) / R))
    t_T = torch.arange(T, device=dev, dtype=torch.float32)
    if isinstance(pos_offset, torch.Tensor):
        pos_BT = pos_offset.to(dev, torch.float32)[:, None] + t_T[None]
    else:
        pos_BT = (t_T + pos_offset)[None].expand(B, T)
    ang_BTR2 = pos_BT[..., None] * inv_freq_R2
    cos_BT1R = torch.cat([ang_BTR2.cos()] * 2, -1)[:, :, None]
    sin_BT1R = torch.cat([ang_BTR2.sin()] * 2, -1)[:, :, None]
    xr = x_BTHD[..., :R].float()
    x1, x2 = xr[..., : R // 2], xr[..., R // 2 :]
    rot = torch.cat([-x2, x1], -1)
    out = (xr * cos_BT1R + rot * sin_BT1R).to(x_BTHD.dtype)
    return torch.cat([out, x_BTHD[..., R:]], -1) if R < D else out
