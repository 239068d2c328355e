"""RMSNorm fused with the residual add, on Triton: r = residual + x (fp32), y = r * rsqrt(mean(r^2) + eps) * w.

Forward reads x and the fp32 residual once and writes the new residual and y once (plus 4 bytes of 1/rms per
row, kept for the backward). Backward reads dy, the saved residual and the incoming residual gradient once and
writes d residual (fp32) and dx; dw is summed in registers over the rows a program visits and the per-program
partials are summed by the launcher (deterministic). Twin: `seqmix_kernels.rmsnorm.naive.rms_norm_residual_ref`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from seqmix_kernels.backend import check_device


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, rout_ptr, rstd_ptr, M, D, eps,
    HAS_X: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    m = (rows < M)[:, None] & (cols < D)[None, :]
    off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    r = tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
    if HAS_X:
        r += tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        tl.store(rout_ptr + off, r, mask=m)
    rstd = tl.rsqrt(tl.sum(r * r, 1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, (r * rstd[:, None] * w[None, :]).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, drout_ptr, r_ptr, rstd_ptr, w_ptr, dr_ptr, dx_ptr, dw_ptr, M, D, blocks_per_prog,
    HAS_DROUT: tl.constexpr, STORE_DX: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BD)
    cm = cols < D
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros([BD], tl.float32)
    for i in range(0, blocks_per_prog):
        rows = (pid * blocks_per_prog + i) * BM + tl.arange(0, BM)
        m = (rows < M)[:, None] & cm[None, :]
        off = rows.to(tl.int64)[:, None] * D + cols[None, :]
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        n = tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32) * rstd[:, None]
        dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
        dn = dy * w[None, :]
        dr = rstd[:, None] * (dn - n * (tl.sum(dn * n, 1) / D)[:, None])
        if HAS_DROUT:
            dr += tl.load(drout_ptr + off, mask=m, other=0.0).to(tl.float32)
        tl.store(dr_ptr + off, dr, mask=m)
        if STORE_DX:
            tl.store(dx_ptr + off, dr.to(dx_ptr.dtype.element_ty), mask=m)
        dw += tl.sum(dy * n, 0)
    tl.store(dw_ptr + pid.to(tl.int64) * D + cols, dw, mask=cm)


def _rows_per_block(D: int, device: torch.device) -> tuple[int, int, int]:
    """(BM, BD, num_warps): about 8K fp32 values per program."""
    BD = triton.next_power_of_2(D)
    BM = max(1, min(16, 8192 // BD))
    if device.type != "cuda":
        return BM, BD, 1
    return BM, BD, 4 if BD * BM <= 8192 else 8


def rms_norm_residual_fwd(x_MD, r_MD, w_D, eps, out_dtype):
    """(y_MD, r_out_MD or None, rstd_M) for contiguous 2D inputs."""
    M, D = r_MD.shape
    BM, BD, nw = _rows_per_block(D, r_MD.device)
    y = torch.empty(M, D, device=r_MD.device, dtype=out_dtype)
    rout = torch.empty(M, D, device=r_MD.device, dtype=torch.float32) if x_MD is not None else None
    rstd = torch.empty(M, device=r_MD.device, dtype=torch.float32)
    _rms_norm_fwd_kernel[(triton.cdiv(M, BM),)](
        x_MD if x_MD is not None else r_MD, r_MD, w_D, y, rout if rout is not None else y, rstd, M, D, eps,
        HAS_X=x_MD is not None, BM=BM, BD=BD, num_warps=nw,
    )
    return y, rout, rstd


def rms_norm_residual_bwd(dy_MD, drout_MD, r_MD, rstd_M, w_D, x_dtype):
    """(d residual fp32, dx in x_dtype or None, dw) for contiguous 2D inputs."""
    M, D = r_MD.shape
    dev = r_MD.device
    BM, BD, nw = _rows_per_block(D, dev)
    n_blocks = triton.cdiv(M, BM)
    n_prog = min(n_blocks, 4 * torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2)
    blocks_per_prog = triton.cdiv(n_blocks, n_prog)
    n_prog = triton.cdiv(n_blocks, blocks_per_prog)
    dr = torch.empty(M, D, device=dev, dtype=torch.float32)
    dx = torch.empty(M, D, device=dev, dtype=x_dtype) if x_dtype is not None else None
    dw_part = torch.empty(n_prog, D, device=dev, dtype=torch.float32)
    _rms_norm_bwd_kernel[(n_prog,)](
        dy_MD, drout_MD if drout_MD is not None else dr, r_MD, rstd_M, w_D, dr, dx if dx is not None else dr,
        dw_part, M, D, blocks_per_prog,
        HAS_DROUT=drout_MD is not None, STORE_DX=dx is not None, BM=BM, BD=BD, num_warps=nw,
    )
    return dr, dx, dw_part.sum(0).to(w_D.dtype)


# The autograd pair as torch.library custom ops, so torch.compile treats each launch as one opaque node (no graph
# break, no tracing into the launcher) and inductor fuses the PyTorch glue around it.
@torch.library.custom_op("seqmix_kernels::rms_norm_residual_fwd", mutates_args=())
def _fwd_op(x_MD: Optional[torch.Tensor], r_MD: torch.Tensor, w_D: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y in w's dtype, new residual fp32 (empty [0] when x is None), 1/rms [M] fp32)."""
    y, rout, rstd = rms_norm_residual_fwd(x_MD, r_MD, w_D, eps, w_D.dtype)
    return y, (rout if rout is not None else r_MD.new_empty(0)), rstd


@_fwd_op.register_fake
def _(x_MD, r_MD, w_D, eps):
    M, D = r_MD.shape
    rout = r_MD.new_empty(M, D) if x_MD is not None else r_MD.new_empty(0)
    return r_MD.new_empty(M, D, dtype=w_D.dtype), rout, r_MD.new_empty(M)


@torch.library.custom_op("seqmix_kernels::rms_norm_residual_bwd", mutates_args=())
def _bwd_op(dy_MD: torch.Tensor, drout_MD: Optional[torch.Tensor], r_MD: torch.Tensor, rstd_M: torch.Tensor,
            w_D: torch.Tensor, has_x: bool, x_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d residual fp32, dx in x_dtype (empty [0] without x), dw in w's dtype)."""
    dr, dx, dw = rms_norm_residual_bwd(dy_MD.contiguous(), None if drout_MD is None else drout_MD.contiguous(),
                                       r_MD, rstd_M, w_D, x_dtype if has_x else None)
    return dr, (dx if dx is not None else dr.new_empty(0, dtype=x_dtype)), dw


@_bwd_op.register_fake
def _(dy_MD, drout_MD, r_MD, rstd_M, w_D, has_x, x_dtype):
    M, D = r_MD.shape
    dx = r_MD.new_empty(M, D, dtype=x_dtype) if has_x else r_MD.new_empty(0, dtype=x_dtype)
    return r_MD.new_empty(M, D), dx, w_D.new_empty(D)


def _setup(ctx, inputs, output):
    x_MD, r_MD, w_D, _eps = inputs
    _y, rout, rstd = output
    ctx.has_x = x_MD is not None
    ctx.x_dtype = x_MD.dtype if x_MD is not None else r_MD.dtype
    ctx.save_for_backward(rout if ctx.has_x else r_MD, rstd, w_D)


def _backward(ctx, dy_MD, drout_MD, _drstd):
    r, rstd, w = ctx.saved_tensors
    if not ctx.has_x:
        drout_MD = None  # the empty placeholder output
    if dy_MD is None:  # only the residual was used: the add passes its gradient through
        dx = None if not ctx.has_x or drout_MD is None else drout_MD.to(ctx.x_dtype)
        return dx, drout_MD, None, None
    dr, dx, dw = _bwd_op(dy_MD, drout_MD, r, rstd, w, ctx.has_x, ctx.x_dtype)
    return (dx if ctx.has_x else None), dr, dw, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def rms_norm_residual(
    x_BTD: Optional[torch.Tensor],
    residual_BTD: torch.Tensor,
    weight_D: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm block boundary, fused: residual += x in fp32, y = RMSNorm(residual) * weight.

    x_BTD: [B, T, D] (any leading dims) branch output in any float dtype, or None to only normalise.
    residual_BTD: [B, T, D] fp32 residual stream; weight_D: [D] (D <= 16384).
    Returns (y in weight's dtype, new residual fp32 [B, T, D]); with x None the residual is returned as is.
    Differentiable w.r.t. x, residual and weight.
    """
    if residual_BTD.dtype != torch.float32:
        raise TypeError(f"the residual stream must be fp32, got {residual_BTD.dtype}")
    D = residual_BTD.shape[-1]
    if tuple(weight_D.shape) != (D,) or (x_BTD is not None and x_BTD.shape != residual_BTD.shape):
        raise ValueError(f"rms_norm_residual wants x and residual [..., D] of one shape and weight [D]; got "
                         f"x {None if x_BTD is None else list(x_BTD.shape)}, residual {list(residual_BTD.shape)}, "
                         f"weight {list(weight_D.shape)}")
    if D > 16384:
        raise ValueError(f"rms_norm_residual keeps a row in registers: D <= 16384, got {D}")
    check_device("rms_norm_residual", x_BTD, residual_BTD, weight_D)
    r = residual_BTD.contiguous().view(-1, D)
    x = None if x_BTD is None else x_BTD.contiguous().view(-1, D)
    y, rout, _ = _fwd_op(x, r, weight_D.contiguous(), float(eps))
    if x is None:
        return y.view(residual_BTD.shape), residual_BTD
    return y.view(residual_BTD.shape), rout.view(residual_BTD.shape)
