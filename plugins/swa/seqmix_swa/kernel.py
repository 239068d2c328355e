"""Sliding-window causal attention on Triton: forward and backward that visit only the key blocks in the window.

Query t attends keys s with t - W < s <= t. A [BM]-query block needs keys [m0 - W + 1, m0 + BM), so the
forward loops over about (W + BM) / BN key blocks instead of m0 / BN: cost O(T * W), not O(T^2).
  forward   one program per (query block, batch*head): online softmax in base 2, stores o and the row
            log-sum-exp (lse, base 2) for the backward.
  backward  delta = rowsum(o * do); then one program per key block accumulates dk, dv over the query blocks
            that see it, and one program per query block accumulates dq over its key blocks (no atomics).
q, k, v come in rotated already (the mixer applies `rotary_ref`); any strides over B, T, H, unit stride over
the head dim (<= 128, padded to a power of two >= 16; 64 and 112 are the sizes that matter).
Twin: `seqmix_swa.naive.swa_ref` (same signature).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from seqmix_kernels.backend import check_device

LOG2E = 1.4426950408889634


class SwaConfig(NamedTuple):
    """Launch parameters of one kernel: query block, key block, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = 1


@triton.jit
def _swa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    T, H, WINDOW, qk_scale,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows = i_m * BM + tl.arange(0, BM)
    d = tl.arange(0, BD)
    dm = d < D
    q = tl.load(q_ptr + i_b.to(tl.int64) * sqb + i_h * sqh + rows.to(tl.int64)[:, None] * sqt + d[None, :],
                mask=(rows < T)[:, None] & dm[None, :], other=0.0).to(DT)
    k_base = k_ptr + i_b.to(tl.int64) * skb + i_h * skh
    v_base = v_ptr + i_b.to(tl.int64) * svb + i_h * svh
    m_i = tl.full([BM], -1.0e30, tl.float32)  # finite: a row whose first block is all masked stays NaN-free
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    lo = (tl.maximum(i_m * BM - WINDOW + 1, 0) // BN) * BN
    hi = tl.minimum((i_m + 1) * BM, T)
    for n0 in range(lo, hi, BN):
        cols = n0 + tl.arange(0, BN)
        c64 = cols.to(tl.int64)
        kt = tl.load(k_base + c64[None, :] * skt + d[:, None], mask=(cols < T)[None, :] & dm[:, None], other=0.0)
        s = tl.dot(q, kt.to(DT), input_precision=PREC) * qk_scale
        band = (cols[None, :] <= rows[:, None]) & (cols[None, :] > rows[:, None] - WINDOW) & (cols < T)[None, :]
        s = tl.where(band, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + c64[:, None] * svt + d[None, :], mask=(cols < T)[:, None] & dm[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), v.to(DT), input_precision=PREC)
        m_i = m_new
    rm = rows < T
    l_i = tl.where(rm, l_i, 1.0)  # rows past T saw no key; every row < T sees at least itself
    o_off = ((i_b.to(tl.int64) * T + rows) * H + i_h)[:, None] * D + d[None, :]
    tl.store(o_ptr + o_off, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=rm[:, None] & dm[None, :])
    tl.store(lse_ptr + i_bh.to(tl.int64) * T + rows, m_i + tl.log2(l_i), mask=rm)


@triton.jit
def _swa_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, T, H, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    """delta[b, h, t] = sum_d o * do, fp32; o and do contiguous [B, T, H, D]."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows = i_m * BM + tl.arange(0, BM)
    d = tl.arange(0, BD)
    m = (rows < T)[:, None] & (d < D)[None, :]
    off = ((i_b.to(tl.int64) * T + rows) * H + i_h)[:, None] * D + d[None, :]
    o = tl.load(o_ptr + off, mask=m, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + off, mask=m, other=0.0).to(tl.float32)
    tl.store(delta_ptr + i_bh.to(tl.int64) * T + rows, tl.sum(o * do, 1), mask=rows < T)


@triton.jit
def _swa_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    T, H, WINDOW, qk_scale, sm_scale,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    cols = i_n * BN + tl.arange(0, BN)  # this program's keys
    c64 = cols.to(tl.int64)
    d = tl.arange(0, BD)
    dm = d < D
    km = (cols < T)[:, None] & dm[None, :]
    k = tl.load(k_ptr + i_b.to(tl.int64) * skb + i_h * skh + c64[:, None] * skt + d[None, :], mask=km,
                other=0.0).to(DT)
    v = tl.load(v_ptr + i_b.to(tl.int64) * svb + i_h * svh + c64[:, None] * svt + d[None, :], mask=km,
                other=0.0).to(DT)
    q_base = q_ptr + i_b.to(tl.int64) * sqb + i_h * sqh
    do_base = do_ptr + (i_b.to(tl.int64) * T * H + i_h) * D
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    lo = ((i_n * BN) // BM) * BM
    hi = tl.minimum((i_n + 1) * BN + WINDOW - 1, T)  # the last query that sees this block, exclusive
    for m0 in range(lo, hi, BM):
        rows = m0 + tl.arange(0, BM)
        r64 = rows.to(tl.int64)
        qm = (rows < T)[:, None] & dm[None, :]
        q = tl.load(q_base + r64[:, None] * sqt + d[None, :], mask=qm, other=0.0).to(DT)
        do = tl.load(do_base + r64[:, None] * (H * D) + d[None, :], mask=qm, other=0.0).to(DT)
        lse = tl.load(lse_ptr + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
        delta = tl.load(delta_ptr + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BN keys, BM queries]
        band = (cols[:, None] <= rows[None, :]) & (cols[:, None] > rows[None, :] - WINDOW) & (rows < T)[None, :]
        pt = tl.exp2(tl.where(band, st, float("-inf")) - lse[None, :])
        dv += tl.dot(pt.to(DT), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(DT), q, input_precision=PREC)
    out = ((i_b.to(tl.int64) * T + cols) * H + i_h)[:, None] * D + d[None, :]
    tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=km)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=km)


@triton.jit
def _swa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    T, H, WINDOW, qk_scale, sm_scale,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows = i_m * BM + tl.arange(0, BM)
    r64 = rows.to(tl.int64)
    d = tl.arange(0, BD)
    dm = d < D
    qm = (rows < T)[:, None] & dm[None, :]
    q = tl.load(q_ptr + i_b.to(tl.int64) * sqb + i_h * sqh + r64[:, None] * sqt + d[None, :], mask=qm,
                other=0.0).to(DT)
    out = ((i_b.to(tl.int64) * T + rows) * H + i_h)[:, None] * D + d[None, :]
    do = tl.load(do_ptr + out, mask=qm, other=0.0).to(DT)
    lse = tl.load(lse_ptr + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    delta = tl.load(delta_ptr + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    k_base = k_ptr + i_b.to(tl.int64) * skb + i_h * skh
    v_base = v_ptr + i_b.to(tl.int64) * svb + i_h * svh
    dq = tl.zeros([BM, BD], tl.float32)
    lo = (tl.maximum(i_m * BM - WINDOW + 1, 0) // BN) * BN
    hi = tl.minimum((i_m + 1) * BM, T)
    for n0 in range(lo, hi, BN):
        cols = n0 + tl.arange(0, BN)
        c64 = cols.to(tl.int64)
        km = (cols < T)[:, None] & dm[None, :]
        k = tl.load(k_base + c64[:, None] * skt + d[None, :], mask=km, other=0.0).to(DT)
        v = tl.load(v_base + c64[:, None] * svt + d[None, :], mask=km, other=0.0).to(DT)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        band = (cols[None, :] <= rows[:, None]) & (cols[None, :] > rows[:, None] - WINDOW) & (cols < T)[None, :]
        p = tl.exp2(tl.where(band, s, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        dq += tl.dot((p * (dp - delta[:, None])).to(DT), k, input_precision=PREC)
    tl.store(dq_ptr + out, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=qm)


# -- launchers ------------------------------------------------------------------------------------------------
def _dot_dtype(x: torch.Tensor) -> tuple:
    """(operand dtype of tl.dot, input precision): 16-bit tensor cores for fp16/bf16, exact fp32 for fp32.
    Under the interpreter (CPU) everything is fp32: numpy has no bf16 and fp16 matmuls accumulate in fp16."""
    if x.device.type != "cuda" or x.dtype == torch.float32:
        return tl.float32, "ieee"
    return (tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16), "ieee"


def default_config(head_dim: int, dtype: torch.dtype, device: torch.device, phase: str) -> SwaConfig:
    """phase "fwd", "dkdv" or "dq". Under the interpreter (CPU) the cost is per program and op: 32 x 32 blocks,
    so test shapes still span a few blocks without many programs."""
    if device.type != "cuda":
        return SwaConfig(32, 32, 1)
    wide = head_dim > 64 or dtype == torch.float32
    if phase == "fwd":
        return SwaConfig(64, 64, 8 if wide else 4, 2)
    return SwaConfig(64, 32 if wide else 64, 8 if wide else 4, 1) if phase == "dq" else SwaConfig(
        32 if wide else 64, 64, 8 if wide else 4, 1)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def swa_fwd(q, k, v, window: int, scale: float, config: Optional[SwaConfig] = None):
    """(o [B, T, H, D] contiguous in q's dtype, lse [B, H, T] fp32 base 2)."""
    B, T, H, D = q.shape
    cfg = config or default_config(D, q.dtype, q.device, "fwd")
    o = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    dt, prec = _dot_dtype(q)
    _swa_fwd_kernel[(triton.cdiv(T, cfg.block_m), B * H)](
        q, k, v, o, lse, T, H, window, scale * LOG2E, *_strides(q), *_strides(k), *_strides(v),
        D=D, BD=max(16, triton.next_power_of_2(D)), BM=cfg.block_m, BN=cfg.block_n, DT=dt, PREC=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def swa_bwd(do, q, k, v, o, lse, window: int, scale: float,
            configs: Optional[tuple[SwaConfig, SwaConfig]] = None):
    """(dq, dk, dv), contiguous [B, T, H, D] in q's dtype. do: contiguous [B, T, H, D]."""
    B, T, H, D = q.shape
    dev = q.device
    BD = max(16, triton.next_power_of_2(D))
    dkdv_cfg, dq_cfg = configs or (default_config(D, q.dtype, dev, "dkdv"), default_config(D, q.dtype, dev, "dq"))
    delta = torch.empty(B, H, T, device=dev, dtype=torch.float32)
    bm_delta = 64 if dev.type == "cuda" else 32
    _swa_bwd_delta_kernel[(triton.cdiv(T, bm_delta), B * H)](o, do, delta, T, H, D=D, BD=BD, BM=bm_delta,
                                                            num_warps=4 if dev.type == "cuda" else 1)
    dq, dk, dv = (torch.empty(B, T, H, D, device=dev, dtype=q.dtype) for _ in range(3))
    dt, prec = _dot_dtype(q)
    common = (T, H, window, scale * LOG2E, scale, *_strides(q), *_strides(k), *_strides(v))
    _swa_bwd_dkdv_kernel[(triton.cdiv(T, dkdv_cfg.block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, *common, D=D, BD=BD, BM=dkdv_cfg.block_m, BN=dkdv_cfg.block_n,
        DT=dt, PREC=prec, num_warps=dkdv_cfg.num_warps, num_stages=dkdv_cfg.num_stages,
    )
    _swa_bwd_dq_kernel[(triton.cdiv(T, dq_cfg.block_m), B * H)](
        q, k, v, do, lse, delta, dq, *common, D=D, BD=BD, BM=dq_cfg.block_m, BN=dq_cfg.block_n,
        DT=dt, PREC=prec, num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages,
    )
    return dq, dk, dv


class SwaAttnFunction(torch.autograd.Function):
    """(q, k, v) -> o for one window and scale."""

    @staticmethod
    def forward(ctx, q, k, v, window: int, scale: float, configs):
        fwd_cfg, bwd_cfgs = configs or (None, None)
        o, lse = swa_fwd(q, k, v, window, scale, fwd_cfg)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.window, ctx.scale, ctx.bwd_cfgs = window, scale, bwd_cfgs
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = swa_bwd(do.contiguous(), q, k, v, o, lse, ctx.window, ctx.scale, ctx.bwd_cfgs)
        return dq, dk, dv, None, None, None


# The default-config path as torch.library custom ops (opaque to torch.compile: no graph break); explicit
# `configs` (benchmarks) take the autograd Function above.
@torch.library.custom_op("seqmix_swa::swa_attn_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return swa_fwd(q, k, v, window, scale)


@_fwd_op.register_fake
def _(q, k, v, window, scale):
    B, T, H, D = q.shape
    return q.new_empty(B, T, H, D), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("seqmix_swa::swa_attn_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return swa_bwd(do.contiguous(), q, k, v, o, lse, window, scale)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, window, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup(ctx, inputs, output):
    q, k, v, window, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.window, ctx.scale = window, scale


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, ctx.window, ctx.scale)
    return dq, dk, dv, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def swa_attn(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    window: int,
    scale: Optional[float] = None,
    *,
    configs: Optional[tuple] = None,
) -> torch.Tensor:
    """Banded causal softmax attention on Triton: query t attends keys s with t - window < s <= t.

    q_BTHD, k_BTHD, v_BTHD: [batch, time, heads, head_dim], rotary already applied to q and k; one dtype among
    fp32/fp16/bf16; any strides over B, T, H with unit stride over head_dim (<= 128).
    window: keys per query, itself included (>= 1). scale: logit scale, default 1/sqrt(head_dim).
    configs: (forward SwaConfig, (dkdv SwaConfig, dq SwaConfig)) to override the launch parameters (benchmarks).
    Returns o_BTHD, contiguous, in q's dtype; fp32 softmax statistics and accumulators. Differentiable
    w.r.t. q, k, v. Needs a CUDA device (or Triton's interpreter on CPU, for tests).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    B, T, H, D = q_BTHD.shape
    if k_BTHD.shape != q_BTHD.shape or v_BTHD.shape != q_BTHD.shape:
        raise ValueError(f"q, k, v must all be [B, T, H, D]; got {list(q_BTHD.shape)}, {list(k_BTHD.shape)}, "
                         f"{list(v_BTHD.shape)}")
    if not q_BTHD.dtype == k_BTHD.dtype == v_BTHD.dtype or q_BTHD.dtype not in (torch.float32, torch.float16,
                                                                               torch.bfloat16):
        raise TypeError(f"swa_attn wants q, k, v of one dtype among fp32/fp16/bf16; got {q_BTHD.dtype}, "
                        f"{k_BTHD.dtype}, {v_BTHD.dtype}")
    if D > 128:
        raise ValueError(f"swa_attn supports head dims up to 128, got {D}; use impl='reference'")
    if B * H > 65535:
        raise ValueError(f"swa_attn launches batch*heads = {B * H} programs on one grid axis (max 65535); "
                         f"split the batch")
    check_device("swa_attn", q_BTHD, k_BTHD, v_BTHD)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_BTHD, k_BTHD, v_BTHD))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if configs is not None:
        return SwaAttnFunction.apply(q, k, v, int(window), scale, configs)
    return _fwd_op(q, k, v, int(window), scale)[0]
