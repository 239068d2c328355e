"""Based linear attention in its quadratic (parallel) form in Triton, for short sequences (kernels + launchers).

With no carried state, o_i = sum_{j<=i} A_ij v_j / (sum_{j<=i} A_ij + eps), A = 1 + s + s^2/2, s = q k^T / sqrt(F),
computed like flash attention: one program per block of queries walks the blocks of keys up to the diagonal,
with A in place of exp and no running max (A > 0, and each row's sum only grows). It costs O(T^2 (F + V)) but
every FLOP is a dense tensor-core product fed by a software pipeline, with no state through HBM: at T of a few
thousand that is cheaper than the chunked form (attn_fwd/attn_bwd), which `based_attn` uses beyond that and
whenever a state comes in or goes out. The backward is the same two loops, over keys for dq and over queries
for dk, dv (see attn_bwd for the formulas of g, c and dA).
Config: KernelConfig(chunk = rows per program, block_v = rows per inner step, num_warps, num_stages).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqmix_based.kernels.common import KernelConfig, block_f, dot_dtype, load_cols, load_rows, scales


@triton.jit(do_not_specialize=["T"])
def _based_parallel_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, r_ptr, T, eps, SCALE1,
    H: tl.constexpr, F: tl.constexpr, V: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    BF: tl.constexpr, BV: tl.constexpr, STORE_R: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    i_bh, i_q = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    qk_off = i_b.to(tl.int64) * T * H * F + i_h * F
    v_off = i_b.to(tl.int64) * T * H * V + i_h * V
    q0 = i_q * BQ
    rows = q0 + tl.arange(0, BQ)
    q = load_rows(q_ptr + qk_off, q0, T, H * F, 0, F, BQ, BF, DT)
    num = tl.zeros([BQ, BV], tl.float32)
    den = tl.zeros([BQ], tl.float32)
    for j0 in range(0, q0, BK):  # key blocks left of the diagonal block: no mask
        kt = load_cols(k_ptr + qk_off, j0, T, H * F, 0, F, BK, BF, DT)
        v = load_rows(v_ptr + v_off, j0, T, H * V, 0, V, BK, BV, DT)
        s = tl.dot(q, kt, input_precision=PREC) * SCALE1
        a = 1.0 + s + 0.5 * s * s
        num = tl.dot(a.to(DT), v, num, input_precision=PREC)
        den += tl.sum(a, 1)
    for j0 in range(q0, tl.minimum(q0 + BQ, T), BK):  # the diagonal block(s)
        kt = load_cols(k_ptr + qk_off, j0, T, H * F, 0, F, BK, BF, DT)
        v = load_rows(v_ptr + v_off, j0, T, H * V, 0, V, BK, BV, DT)
        s = tl.dot(q, kt, input_precision=PREC) * SCALE1
        a = tl.where(rows[:, None] >= (j0 + tl.arange(0, BK))[None, :], 1.0 + s + 0.5 * s * s, 0.0)
        num = tl.dot(a.to(DT), v, num, input_precision=PREC)
        den += tl.sum(a, 1)
    rr = 1.0 / (den + eps)
    offs_v = tl.arange(0, BV)
    tl.store(o_ptr + v_off + rows[:, None] * (H * V) + offs_v[None, :], (num * rr[:, None]).to(o_ptr.dtype.element_ty),
             mask=(rows < T)[:, None] & (offs_v < V)[None, :])
    if STORE_R:
        tl.store(r_ptr + i_bh.to(tl.int64) * T + rows, rr, mask=rows < T)


@triton.jit(do_not_specialize=["T"])
def _based_parallel_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, r_ptr, c_ptr, dq_ptr, T, SCALE1,
    H: tl.constexpr, F: tl.constexpr, V: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    BF: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    i_bh, i_q = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    qk_off = i_b.to(tl.int64) * T * H * F + i_h * F
    v_off = i_b.to(tl.int64) * T * H * V + i_h * V
    q0 = i_q * BQ
    rows = q0 + tl.arange(0, BQ)
    q = load_rows(q_ptr + qk_off, q0, T, H * F, 0, F, BQ, BF, DT)
    rr = tl.load(r_ptr + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    cc = tl.load(c_ptr + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    g = (load_rows(do_ptr + v_off, q0, T, H * V, 0, V, BQ, BV, tl.float32) * rr[:, None]).to(DT)
    dq = tl.zeros([BQ, BF], tl.float32)
    for j0 in range(0, tl.minimum(q0 + BQ, T), BK):
        kt = load_cols(k_ptr + qk_off, j0, T, H * F, 0, F, BK, BF, DT)
        vt = load_cols(v_ptr + v_off, j0, T, H * V, 0, V, BK, BV, DT)
        s = tl.dot(q, kt, input_precision=PREC) * SCALE1
        da = tl.dot(g, vt, input_precision=PREC) + cc[:, None]
        ds = tl.where(rows[:, None] >= (j0 + tl.arange(0, BK))[None, :], da * (1.0 + s), 0.0)
        dq = tl.dot(ds.to(DT), tl.trans(kt), dq, input_precision=PREC)
    offs_f = tl.arange(0, BF)
    tl.store(dq_ptr + qk_off + rows[:, None] * (H * F) + offs_f[None, :], (dq * SCALE1).to(dq_ptr.dtype.element_ty),
             mask=(rows < T)[:, None] & (offs_f < F)[None, :])


@triton.jit(do_not_specialize=["T"])
def _based_parallel_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, r_ptr, c_ptr, dk_ptr, dv_ptr, T, SCALE1,
    H: tl.constexpr, F: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr,
    BF: tl.constexpr, BV: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    i_bh, i_k = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    qk_off = i_b.to(tl.int64) * T * H * F + i_h * F
    v_off = i_b.to(tl.int64) * T * H * V + i_h * V
    k0 = i_k * BK
    rows = k0 + tl.arange(0, BK)  # keys j
    k = load_rows(k_ptr + qk_off, k0, T, H * F, 0, F, BK, BF, DT)
    v = load_rows(v_ptr + v_off, k0, T, H * V, 0, V, BK, BV, DT)
    dk = tl.zeros([BK, BF], tl.float32)
    dv = tl.zeros([BK, BV], tl.float32)
    for i0 in range(k0 // BQ * BQ, T, BQ):  # query blocks from the diagonal on
        cols = i0 + tl.arange(0, BQ)  # queries i
        qt = load_cols(q_ptr + qk_off, i0, T, H * F, 0, F, BQ, BF, DT)
        rr = tl.load(r_ptr + i_bh.to(tl.int64) * T + cols, mask=cols < T, other=0.0)
        cc = tl.load(c_ptr + i_bh.to(tl.int64) * T + cols, mask=cols < T, other=0.0)
        g = (load_rows(do_ptr + v_off, i0, T, H * V, 0, V, BQ, BV, tl.float32) * rr[:, None]).to(DT)
        st = tl.dot(k, qt, input_precision=PREC) * SCALE1  # [key j, query i]
        causal = rows[:, None] <= cols[None, :]
        at = tl.where(causal, 1.0 + st + 0.5 * st * st, 0.0)
        dat = tl.dot(v, tl.trans(g), input_precision=PREC) + cc[None, :]
        dst = tl.where(causal, dat * (1.0 + st), 0.0)
        dk = tl.dot(dst.to(DT), tl.trans(qt), dk, input_precision=PREC)
        dv = tl.dot(at.to(DT), g, dv, input_precision=PREC)
    offs_f = tl.arange(0, BF)
    offs_v = tl.arange(0, BV)
    tl.store(dk_ptr + qk_off + rows[:, None] * (H * F) + offs_f[None, :], (dk * SCALE1).to(dk_ptr.dtype.element_ty),
             mask=(rows < T)[:, None] & (offs_f < F)[None, :])
    tl.store(dv_ptr + v_off + rows[:, None] * (H * V) + offs_v[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=(rows < T)[:, None] & (offs_v < V)[None, :])


def parallel_fwd(q_BTHF, k_BTHF, v_BTHV, *, store_r: bool, eps: float, config: KernelConfig):
    """(o_BTHV, r_BHT = 1 / (den + eps) or None) for contiguous inputs and no carried state."""
    B, T, H, F = q_BTHF.shape
    V = v_BTHV.shape[-1]
    dt, prec, _ = dot_dtype(q_BTHF)
    if config.chunk % config.block_v:
        raise ValueError(f"the parallel forward needs block_v | chunk, got {config}")
    o_BTHV = torch.empty_like(v_BTHV)
    r_BHT = torch.empty(B, H, T, device=q_BTHF.device, dtype=torch.float32) if store_r else o_BTHV
    _based_parallel_fwd_kernel[(B * H, triton.cdiv(T, config.chunk))](
        q_BTHF, k_BTHF, v_BTHV, o_BTHV, r_BHT, T, eps, scales(F)["SCALE1"], H=H, F=F, V=V, BQ=config.chunk,
        BK=config.block_v, BF=block_f(F), BV=max(16, triton.next_power_of_2(V)), STORE_R=store_r, DT=dt, PREC=prec,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return o_BTHV, (r_BHT if store_r else None)


def parallel_bwd(do_BTHV, q_BTHF, k_BTHF, v_BTHV, r_BHT, c_BHT, *, dq_config: KernelConfig,
                 dkv_config: KernelConfig):
    """(dq, dk, dv) given g's scale r and c = -(do . o) r from the forward (attn_bwd's prep kernel)."""
    B, T, H, F = q_BTHF.shape
    V = v_BTHV.shape[-1]
    dt, prec, _ = dot_dtype(q_BTHF)
    consts = dict(H=H, F=F, V=V, BF=block_f(F), BV=max(16, triton.next_power_of_2(V)), DT=dt, PREC=prec)
    dq, dk, dv = torch.empty_like(q_BTHF), torch.empty_like(k_BTHF), torch.empty_like(v_BTHV)
    cfg = dq_config
    _based_parallel_dq_kernel[(B * H, triton.cdiv(T, cfg.chunk))](
        q_BTHF, k_BTHF, v_BTHV, do_BTHV, r_BHT, c_BHT, dq, T, scales(F)["SCALE1"], BQ=cfg.chunk, BK=cfg.block_v,
        **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    cfg = dkv_config
    _based_parallel_dkv_kernel[(B * H, triton.cdiv(T, cfg.chunk))](
        q_BTHF, k_BTHF, v_BTHV, do_BTHV, r_BHT, c_BHT, dk, dv, T, scales(F)["SCALE1"], BK=cfg.chunk,
        BQ=cfg.block_v, **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, dk, dv
