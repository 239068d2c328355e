"""Rotary position embedding (GPT-NeoX rotate-half style) over the first channels of each head, reference.

`rotary_dim` R means what it means in flash-attn's RotaryEmbedding(dim=R), which the Based models use:
ceil(R/2) frequencies base^(-2i / R) (the denominator is R itself) rotating the first 2 * ceil(R/2) channels
rotate-half style, so an odd R = 35 rotates 36 channels. `rotated_channels(R)` gives that width.

The Triton twin (same signature) is `seqmix_kernels.rotary.triton.rotary`; `seqmix_kernels.rotary.rotary_fn(impl)`
picks one. Both take their angles from `rotary_cos_sin`, so they rotate by bit-identical fp32 cos/sin.
"""
from typing import Union

import torch


def rotated_channels(rotary_dim: int) -> int:
    """Channels a rotary dim of R rotates: 2 * ceil(R / 2) (R itself when even)."""
    return rotary_dim + rotary_dim % 2


def check_rotary_dim(rotary_dim: int, head_dim: int) -> int:
    """R for a head of `head_dim` channels (-1 = all); raises ValueError unless 0 <= 2*ceil(R/2) <= head_dim."""
    R = head_dim if rotary_dim == -1 else rotary_dim
    if R < 0 or rotated_channels(R) > head_dim:
        raise ValueError(f"rotary_dim {R} rotates {rotated_channels(R)} channels, more than the head dim "
                         f"{head_dim} (rotary_dim R rotates 2 * ceil(R/2) channels; use 0 <= R <= {head_dim})")
    return R


def rotary_cos_sin(
    batch: int, seqlen: int, rotary_dim: int, pos_offset: Union[int, torch.Tensor], base: float, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin [B or 1, T, ceil(rotary_dim / 2)] of the angles (pos_offset + t) * base^(-2i / rotary_dim).

    The leading dim is 1 for an int offset (shared by the batch) and B for a per-sequence offset tensor [B].
    """
    R = rotary_dim
    inv_freq_R2 = 1.0 / (base ** (torch.arange(0, R, 2, device=device, dtype=torch.float32) / R))
    t_T = torch.arange(seqlen, device=device, dtype=torch.float32)
    if isinstance(pos_offset, torch.Tensor):
        pos_BT = pos_offset.to(device, torch.float32)[:, None] + t_T[None]
    else:
        pos_BT = (t_T + pos_offset)[None]
    ang_BTR2 = pos_BT[..., None] * inv_freq_R2
    return ang_BTR2.cos(), ang_BTR2.sin()


def rotary_ref(
    x_BTHD: torch.Tensor,
    pos_offset: Union[int, torch.Tensor] = 0,
    rotary_dim: int = -1,
    base: float = 10000.0,
) -> torch.Tensor:
    """Rotate x_BTHD [B, T, H, D] at positions pos_offset + t.

    pos_offset: an int, or an int64 tensor [B] (per-sequence offsets, e.g. during decode).
    rotary_dim: R as in flash-attn's RotaryEmbedding(dim=R) (module docstring; -1 means all of D): the first
    2 * ceil(R/2) channels are rotated, the rest pass through. Angles in fp32; the result has x's dtype.
    """
    B, T, H, D = x_BTHD.shape
    R = check_rotary_dim(rotary_dim, D)
    if R == 0:
        return x_BTHD
    cos_BTR2, sin_BTR2 = rotary_cos_sin(B, T, R, pos_offset, base, x_BTHD.device)
    n = cos_BTR2.shape[-1]  # ceil(R / 2) frequencies over 2n channels
    cos_BT1R = torch.cat([cos_BTR2] * 2, -1)[:, :, None]
    sin_BT1R = torch.cat([sin_BTR2] * 2, -1)[:, :, None]
    xr = x_BTHD[..., : 2 * n].float()
    x1, x2 = xr[..., :n], xr[..., n:]
    rot = torch.cat([-x2, x1], -1)
    out = (xr * cos_BT1R + rot * sin_BT1R).to(x_BTHD.dtype)
    return torch.cat([out, x_BTHD[..., 2 * n :]], -1) if 2 * n < D else out
