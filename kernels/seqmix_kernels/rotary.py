"""Rotary position embedding (GPT-NeoX rotate-half style) on the first `rotary_dim` channels, reference.

The Triton twin (same signature) is `triton_ops/rotary.py::rotary`; `rotary_fn(impl)` picks one. Both take
their angles from `rotary_cos_sin`, so they rotate by bit-identical fp32 cos/sin.
"""
from typing import Callable, Union

import torch


def rotary_cos_sin(
    batch: int, seqlen: int, rotary_dim: int, pos_offset: Union[int, torch.Tensor], base: float, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin [B or 1, T, rotary_dim / 2] of the angles (pos_offset + t) * base^(-2i / rotary_dim).

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
    rotary_dim: channels rotated (even, <= D; -1 means all of D); the rest pass through.
    Angles are computed in fp32; the result has x's dtype.
    """
    B, T, H, D = x_BTHD.shape
    R = D if rotary_dim == -1 else rotary_dim
    if R % 2 or R > D:
        raise ValueError(f"rotary_dim must be even and <= head dim {D}, got {R}")
    if R == 0:
        return x_BTHD
    cos_BTR2, sin_BTR2 = rotary_cos_sin(B, T, R, pos_offset, base, x_BTHD.device)
    cos_BT1R = torch.cat([cos_BTR2] * 2, -1)[:, :, None]
    sin_BT1R = torch.cat([sin_BTR2] * 2, -1)[:, :, None]
    xr = x_BTHD[..., :R].float()
    x1, x2 = xr[..., : R // 2], xr[..., R // 2 :]
    rot = torch.cat([-x2, x1], -1)
    out = (xr * cos_BT1R + rot * sin_BT1R).to(x_BTHD.dtype)
    return torch.cat([out, x_BTHD[..., R:]], -1) if R < D else out


def rotary_fn(impl: str) -> Callable:
    """`rotary` for a resolved impl ("reference" or "triton", see `backend.resolve_impl`)."""
    if impl == "reference":
        return rotary_ref
    if impl == "triton":
        from seqmix_kernels.triton_ops.rotary import rotary

        return rotary
    raise ValueError(f"rotary impl must be 'reference' or 'triton', got {impl!r}")
