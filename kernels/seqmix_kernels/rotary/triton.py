"""Rotary position embedding (rotate-half) on Triton: one read of x, one write of y, for any strides of B, T, H.

    y[:n] = x1 cos - x2 sin,   y[n:2n] = x2 cos + x1 sin,   y[2n:] = x[2n:]   (n = ceil(R/2) frequencies)

The fp32 cos/sin [B or 1, T, n] come from `rotary_cos_sin` (the reference's own arithmetic, so both paths
rotate by the same angles; the table is H * D / R times smaller than x). The backward is the same kernel
rotating by -angle. Twin: `seqmix_kernels.rotary.naive.rotary_ref`.
"""
from __future__ import annotations

from typing import Union

import torch
import triton
import triton.language as tl

from seqmix_kernels.backend import check_device
from seqmix_kernels.rotary.naive import check_rotary_dim, rotary_cos_sin


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr, T, H, D, R2, sxb, sxt, sxh, scb,
    CONJ: tl.constexpr, HAS_PASS: tl.constexpr, BN: tl.constexpr, BR2: tl.constexpr, BP: tl.constexpr,
):
    i_n, i_b = tl.program_id(0), tl.program_id(1)
    n = i_n * BN + tl.arange(0, BN)  # (t, h) pairs of sequence i_b
    t, h = n // H, n % H
    nm = n < T * H
    i = tl.arange(0, BR2)
    m = nm[:, None] & (i < R2)[None, :]
    x_row = x_ptr + i_b.to(tl.int64) * sxb + t.to(tl.int64) * sxt + h * sxh
    y_row = y_ptr + ((i_b.to(tl.int64) * T + t) * H + h) * D
    x1 = tl.load(x_row[:, None] + i[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_row[:, None] + R2 + i[None, :], mask=m, other=0.0).to(tl.float32)
    cs_off = i_b.to(tl.int64) * scb + t[:, None] * R2 + i[None, :]
    c = tl.load(cos_ptr + cs_off, mask=m, other=0.0)
    s = tl.load(sin_ptr + cs_off, mask=m, other=0.0)
    if CONJ:
        s = -s
    tl.store(y_row[:, None] + i[None, :], (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(y_row[:, None] + R2 + i[None, :], (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=m)
    if HAS_PASS:
        j = 2 * R2 + tl.arange(0, BP)
        pm = nm[:, None] & (j < D)[None, :]
        tl.store(y_row[:, None] + j[None, :], tl.load(x_row[:, None] + j[None, :], mask=pm), mask=pm)


def rotary_apply(x_BTHD: torch.Tensor, cos_BTR2: torch.Tensor, sin_BTR2: torch.Tensor, conj: bool) -> torch.Tensor:
    """Launch on x with unit stride over D; returns a contiguous [B, T, H, D] tensor of x's dtype."""
    B, T, H, D = x_BTHD.shape
    R2 = cos_BTR2.shape[-1]
    y = torch.empty(B, T, H, D, device=x_BTHD.device, dtype=x_BTHD.dtype)
    BR2 = triton.next_power_of_2(R2)
    BP = triton.next_power_of_2(max(D - 2 * R2, 1))
    on_gpu = x_BTHD.device.type == "cuda"
    BN = max(1, (2048 if on_gpu else 4096) // max(BR2, BP))
    grid = (triton.cdiv(T * H, BN), B)
    _rotary_kernel[grid](
        x_BTHD, cos_BTR2, sin_BTR2, y, T, H, D, R2, x_BTHD.stride(0), x_BTHD.stride(1), x_BTHD.stride(2),
        0 if cos_BTR2.shape[0] == 1 else T * R2,
        CONJ=conj, HAS_PASS=2 * R2 < D, BN=BN, BR2=BR2, BP=BP, num_warps=4 if on_gpu else 1,
    )
    return y


# The launch as a torch.library custom op (opaque to torch.compile: no graph break); the gradient is the same op
# rotating by -angle.
@torch.library.custom_op("seqmix_kernels::rotary_apply", mutates_args=())
def _rotary_op(x_BTHD: torch.Tensor, cos_BTR2: torch.Tensor, sin_BTR2: torch.Tensor, conj: bool) -> torch.Tensor:
    return rotary_apply(x_BTHD if x_BTHD.stride(-1) == 1 else x_BTHD.contiguous(), cos_BTR2, sin_BTR2, conj)


@_rotary_op.register_fake
def _(x_BTHD, cos_BTR2, sin_BTR2, conj):
    return x_BTHD.new_empty(x_BTHD.shape)


def _setup(ctx, inputs, output):
    _x, cos_BTR2, sin_BTR2, conj = inputs
    ctx.save_for_backward(cos_BTR2, sin_BTR2)
    ctx.conj = conj


def _backward(ctx, dy_BTHD):
    cos_BTR2, sin_BTR2 = ctx.saved_tensors
    return _rotary_op(dy_BTHD, cos_BTR2, sin_BTR2, not ctx.conj), None, None, None


_rotary_op.register_autograd(_backward, setup_context=_setup)


def rotary(
    x_BTHD: torch.Tensor,
    pos_offset: Union[int, torch.Tensor] = 0,
    rotary_dim: int = -1,
    base: float = 10000.0,
) -> torch.Tensor:
    """Rotate x_BTHD [B, T, H, D] (any strides over B, T, H; unit stride over D) at positions pos_offset + t.

    pos_offset: an int, or an int64 tensor [B] of per-sequence offsets. rotary_dim: R as in flash-attn's
    RotaryEmbedding (the first 2 * ceil(R/2) channels rotate; -1 = all); the rest are copied. fp32 angles and arithmetic; returns a contiguous tensor of x's dtype.
    Differentiable w.r.t. x.
    """
    B, T, H, D = x_BTHD.shape
    R = check_rotary_dim(rotary_dim, D)
    if R == 0:
        return x_BTHD
    check_device("rotary", x_BTHD)
    cos_BTR2, sin_BTR2 = rotary_cos_sin(B, T, R, pos_offset, base, x_BTHD.device)
    x = x_BTHD if x_BTHD.stride(-1) == 1 else x_BTHD.contiguous()
    return _rotary_op(x, cos_BTR2.contiguous(), sin_BTR2.contiguous(), False)
