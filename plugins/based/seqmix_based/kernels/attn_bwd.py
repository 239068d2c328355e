"""Based linear attention backward in Triton, chunked, with the Taylor feature map fused (kernels + launcher).

With g_i = do_i / (den_i + eps) and c_i = -(do_i . o_i) / (den_i + eps), the gradient of the scores is
dA_ij = g_i . v_j + c_i (j <= i), and with dA/ds = 1 + s:
    dq_i = sum_j dA_ij (1 + s_ij) k_j / sqrt(F)       dk_j = sum_i dA_ij (1 + s_ij) q_i / sqrt(F)
    dv_j = sum_i A_ij g_i
Inside a chunk these are quadratic forms; across chunks they go through states:
  * dq uses the forward's state before its chunk (S, z; recomputed by the forward's state scan): the part of
    dq_i from S2 is W_i q_i / F with W_i = S2 g_i, a symmetric F x F matrix;
  * dk, dv use P = sum_{i in later chunks} g_i (x) phi(q_i) and Y = sum_{i in later chunks} c_i phi(q_i), built
    by a reverse scan (the same shapes as the state). What is left in them at t = 0 is the gradient of the
    initial state; a gradient of the final state is where they start.
Kernels: prep (c_i), the reverse scan (one program per (batch*head, V block)), then dq and dk/dv, one program
per (batch*head, run of chunks, V block). dq and dk sum over V: with several V blocks each writes an fp32 partial,
summed afterwards (the c_i terms go to V block 0); the fast path takes all of V in one block.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from seqmix_based.kernels.attn_fwd import chunk_states
from seqmix_based.kernels.common import (
    KernelConfig, block_f, cat_halves, contract, default_config, dot_dtype, load_chunk_state, load_cols, load_rows,
    load_state, outer_cols, outer_rows, scales, store_chunk_state, store_state,
)


@triton.jit(do_not_specialize=["T"])
def _based_bwd_prep_kernel(o_ptr, do_ptr, r_ptr, c_ptr, T, H: tl.constexpr, V: tl.constexpr,
                           BT: tl.constexpr, BVP: tl.constexpr):
    """c_BHT = -(do . o) * r, one [BT, V] tile of one head per program."""
    i_bh, i_t = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    off = i_b.to(tl.int64) * T * H * V + i_h * V
    o = load_rows(o_ptr + off, i_t * BT, T, H * V, 0, V, BT, BVP, tl.float32)
    do = load_rows(do_ptr + off, i_t * BT, T, H * V, 0, V, BT, BVP, tl.float32)
    rows = i_t * BT + tl.arange(0, BT)
    r = tl.load(r_ptr + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    tl.store(c_ptr + i_bh.to(tl.int64) * T + rows, -tl.sum(o * do, 1) * r, mask=rows < T)


@triton.jit(do_not_specialize=["T", "NC"])
def _based_chunk_dstates_kernel(
    q_ptr, do_ptr, r_ptr, c_ptr, p_ptr, pz_ptr, dkvT_ptr, dzT_ptr, dkv0_ptr, dz0_ptr, T, NC, FEAT1, FEAT2,
    H: tl.constexpr, F: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    HAS_DFINAL: tl.constexpr, STORE_DINIT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, ZPREC: tl.constexpr,
):
    HB: tl.constexpr = BF // 2
    R: tl.constexpr = BF * BF + BF + 1
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    first = i_v == 0
    q_base = q_ptr + i_b.to(tl.int64) * T * H * F + i_h * F
    do_base = do_ptr + i_b.to(tl.int64) * T * H * V + i_h * V
    offs_c = tl.arange(0, C)
    offs_v = i_v * BV + tl.arange(0, BV)

    if HAS_DFINAL:
        p0, p1, p2a, p2b, y0, y1, y2 = load_state(dkvT_ptr, dzT_ptr, i_bh, offs_v, FEAT1, FEAT2, first, F, V, BF, HB,
                                                  True)
    else:
        p0 = tl.zeros([BV], tl.float32)
        p1 = tl.zeros([BF, BV], tl.float32)
        p2a = tl.zeros([HB * BF, BV], tl.float32)
        p2b = tl.zeros([HB * BF, BV], tl.float32)
        y0 = tl.sum(tl.zeros([BF], tl.float32), 0)
        y1 = tl.zeros([BF], tl.float32)
        y2 = tl.zeros([BF, BF], tl.float32)

    for i in range(NC):
        i_c = NC - 1 - i
        slot = i_bh.to(tl.int64) * NC + i_c
        store_chunk_state(p_ptr + slot * R * V, pz_ptr + slot * R, offs_v, p0, p1, p2a, p2b, y0, y1, y2, first,
                          V, BF, HB)
        t0 = i_c * C
        rows = t0 + offs_c
        rr = tl.load(r_ptr + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
        cc = tl.load(c_ptr + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0) * first.to(tl.float32)
        g = (load_rows(do_base, t0, T, H * V, i_v * BV, V, C, BV, tl.float32) * rr[:, None]).to(DT)
        qt = load_cols(q_base, t0, T, H * F, 0, F, C, BF, DT)
        qta = load_cols(q_base, t0, T, H * F, 0, F, C, HB, DT)
        p2a = tl.dot(outer_cols(qta, qt, HB, BF, C), g, p2a, input_precision=PREC)
        qtb = load_cols(q_base, t0, T, H * F, HB, F, C, HB, DT)
        p2b = tl.dot(outer_cols(qtb, qt, HB, BF, C), g, p2b, input_precision=PREC)
        p1 = tl.dot(qt, g, p1, input_precision=PREC)
        p0 += tl.sum(g.to(tl.float32), 0)
        qtc = qt.to(tl.float32) * cc[None, :]
        y0 += tl.sum(cc, 0)
        y1 += tl.sum(qtc, 1)
        y2 = tl.dot(qtc, tl.trans(qt.to(tl.float32)), y2, input_precision=ZPREC)

    if STORE_DINIT:
        store_state(dkv0_ptr, dz0_ptr, i_bh, offs_v, p0, p1, p2a, p2b, y0, y1, y2, FEAT1, FEAT2, first, F, V, BF, HB)


@triton.jit(do_not_specialize=["T", "NC"])
def _based_chunk_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, r_ptr, c_ptr, h_ptr, hz_ptr, dq_ptr, T, NC, SCALE1, SCALE2,
    H: tl.constexpr, F: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    CPP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, ZPREC: tl.constexpr,
):
    HB: tl.constexpr = BF // 2
    R: tl.constexpr = BF * BF + BF + 1
    i_bh, i_p, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    qk_off = i_b.to(tl.int64) * T * H * F + i_h * F
    v_off = i_b.to(tl.int64) * T * H * V + i_h * V
    dq_off = i_v.to(tl.int64) * (tl.num_programs(0) // H) * T * H * F + qk_off  # V block i_v's partial
    offs_c = tl.arange(0, C)
    offs_f = tl.arange(0, BF)
    offs_v = i_v * BV + tl.arange(0, BV)
    for i_c in range(i_p * CPP, tl.minimum(NC, i_p * CPP + CPP)):
        t0 = i_c * C
        rows = t0 + offs_c
        q = load_rows(q_ptr + qk_off, t0, T, H * F, 0, F, C, BF, DT)
        k = load_rows(k_ptr + qk_off, t0, T, H * F, 0, F, C, BF, DT)
        kt = load_cols(k_ptr + qk_off, t0, T, H * F, 0, F, C, BF, DT)
        vt = load_cols(v_ptr + v_off, t0, T, H * V, i_v * BV, V, C, BV, DT)
        rr = tl.load(r_ptr + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
        cc = tl.load(c_ptr + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0) * (i_v == 0).to(tl.float32)
        g = (load_rows(do_ptr + v_off, t0, T, H * V, i_v * BV, V, C, BV, tl.float32) * rr[:, None]).to(DT)
        # intra-chunk
        s = tl.dot(q, kt, input_precision=PREC) * SCALE1
        da = tl.where(offs_c[:, None] >= offs_c[None, :], tl.dot(g, vt, input_precision=PREC) + cc[:, None], 0.0)
        dq = tl.dot((da * (1.0 + s)).to(DT), k, input_precision=PREC) * SCALE1
        # inter-chunk: the numerator through S, the denominator through z
        slot = i_bh.to(tl.int64) * NC + i_c
        s0, s1, s2a, s2b, z0, z1, z2 = load_chunk_state(h_ptr + slot * R * V, hz_ptr + slot * R, offs_v, V, BF, HB, DT)
        dq += tl.dot(g, tl.trans(s1), input_precision=PREC) * SCALE1
        qf = q.to(tl.float32)
        dqa = contract(tl.dot(g, tl.trans(s2a), input_precision=PREC), qf, C, HB, BF)
        dqb = contract(tl.dot(g, tl.trans(s2b), input_precision=PREC), qf, C, HB, BF)
        dq += cat_halves(dqa, dqb, C, HB) * (2.0 * SCALE2)
        dq += cc[:, None] * (z1[None, :] * SCALE1 + tl.dot(qf, z2, input_precision=ZPREC) * (2.0 * SCALE2))
        tl.store(dq_ptr + dq_off + rows[:, None] * (H * F) + offs_f[None, :], dq.to(dq_ptr.dtype.element_ty),
                 mask=(rows < T)[:, None] & (offs_f < F)[None, :])


@triton.jit(do_not_specialize=["T", "NC"])
def _based_chunk_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, r_ptr, c_ptr, p_ptr, pz_ptr, dk_ptr, dv_ptr, T, NC, SCALE1, SCALE2,
    H: tl.constexpr, F: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    CPP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, ZPREC: tl.constexpr,
):
    HB: tl.constexpr = BF // 2
    R: tl.constexpr = BF * BF + BF + 1
    i_bh, i_p, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    first = (i_v == 0).to(tl.float32)  # the c_i terms belong to V block 0
    qk_off = i_b.to(tl.int64) * T * H * F + i_h * F
    v_off = i_b.to(tl.int64) * T * H * V + i_h * V
    dk_off = i_v.to(tl.int64) * (tl.num_programs(0) // H) * T * H * F + qk_off  # V block i_v's partial
    offs_c = tl.arange(0, C)
    offs_f = tl.arange(0, BF)
    offs_v = i_v * BV + tl.arange(0, BV)
    causal_t = offs_c[:, None] <= offs_c[None, :]  # [key j, query i]: j <= i
    for i_c in range(i_p * CPP, tl.minimum(NC, i_p * CPP + CPP)):
        t0 = i_c * C
        rows = t0 + offs_c
        q = load_rows(q_ptr + qk_off, t0, T, H * F, 0, F, C, BF, DT)
        qt = load_cols(q_ptr + qk_off, t0, T, H * F, 0, F, C, BF, DT)
        k = load_rows(k_ptr + qk_off, t0, T, H * F, 0, F, C, BF, DT)
        v = load_rows(v_ptr + v_off, t0, T, H * V, i_v * BV, V, C, BV, DT)
        rr = tl.load(r_ptr + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
        cc = tl.load(c_ptr + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0) * first
        g = (load_rows(do_ptr + v_off, t0, T, H * V, i_v * BV, V, C, BV, tl.float32) * rr[:, None]).to(DT)
        # intra-chunk, transposed: rows are keys j, columns queries i
        st = tl.dot(k, qt, input_precision=PREC) * SCALE1
        at = tl.where(causal_t, 1.0 + st + 0.5 * st * st, 0.0)
        dat = tl.where(causal_t, tl.dot(v, tl.trans(g), input_precision=PREC) + cc[None, :], 0.0)
        dk = tl.dot((dat * (1.0 + st)).to(DT), q, input_precision=PREC) * SCALE1
        dv = tl.dot(at.to(DT), g, input_precision=PREC)
        # inter-chunk: the queries of later chunks, through P (numerator) and Y (denominator)
        slot = i_bh.to(tl.int64) * NC + i_c
        p0, p1, p2a, p2b, y0, y1, y2 = load_chunk_state(p_ptr + slot * R * V, pz_ptr + slot * R, offs_v, V, BF, HB, DT)
        dv += p0[None, :] + tl.dot(k, p1, input_precision=PREC) * SCALE1
        ka = load_rows(k_ptr + qk_off, t0, T, H * F, 0, F, C, HB, DT)
        dv += tl.dot(outer_rows(ka, k, C, HB, BF), p2a, input_precision=PREC) * SCALE2
        kb = load_rows(k_ptr + qk_off, t0, T, H * F, HB, F, C, HB, DT)
        dv += tl.dot(outer_rows(kb, k, C, HB, BF), p2b, input_precision=PREC) * SCALE2
        kf = k.to(tl.float32)
        dk += tl.dot(v, tl.trans(p1), input_precision=PREC) * SCALE1
        dka = contract(tl.dot(v, tl.trans(p2a), input_precision=PREC), kf, C, HB, BF)
        dkb = contract(tl.dot(v, tl.trans(p2b), input_precision=PREC), kf, C, HB, BF)
        dk += cat_halves(dka, dkb, C, HB) * (2.0 * SCALE2)
        dk += (y1[None, :] * SCALE1 + tl.dot(kf, y2, input_precision=ZPREC) * (2.0 * SCALE2)) * first
        tl.store(dk_ptr + dk_off + rows[:, None] * (H * F) + offs_f[None, :], dk.to(dk_ptr.dtype.element_ty),
                 mask=(rows < T)[:, None] & (offs_f < F)[None, :])
        tl.store(dv_ptr + v_off + rows[:, None] * (H * V) + offs_v[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=(rows < T)[:, None] & (offs_v < V)[None, :])


def denominator_grad(do_BTHV: torch.Tensor, o_BTHV: torch.Tensor, r_BHT: torch.Tensor) -> torch.Tensor:
    """c_BHT = -(do . o) / (den + eps), the gradient of the loss w.r.t. each row's denominator (from o and r)."""
    B, T, H, V = o_BTHV.shape
    c_BHT = torch.empty(B, H, T, device=o_BTHV.device, dtype=torch.float32)
    bvp = max(16, triton.next_power_of_2(V))
    bt = max(16, min(64, 8192 // bvp))
    _based_bwd_prep_kernel[(B * H, triton.cdiv(T, bt))](o_BTHV, do_BTHV, r_BHT, c_BHT, T, H=H, V=V, BT=bt, BVP=bvp)
    return c_BHT


def based_bwd(
    do_BTHV: torch.Tensor,
    q_BTHF: torch.Tensor,
    k_BTHF: torch.Tensor,
    v_BTHV: torch.Tensor,
    o_BTHV: torch.Tensor,
    r_BHT: torch.Tensor,
    initial_state: Optional[tuple[torch.Tensor, torch.Tensor]],
    dfinal_state: Optional[tuple[torch.Tensor, torch.Tensor]],
    *,
    need_dinit: bool,
    configs: Optional[dict[str, KernelConfig]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Gradients (dq, dk, dv, d initial state or None) from the forward's o and r = 1 / (den + eps).

    All tensors contiguous; dfinal_state is the gradient of the returned final state, if any.
    """
    B, T, H, F = q_BTHF.shape
    V = v_BTHV.shape[-1]
    E, BF = 1 + F + F * F, block_f(F)
    dev = q_BTHF.device
    dt, prec, zprec = dot_dtype(q_BTHF)
    cfg = {p: (configs or {}).get(p) or default_config(F, V, q_BTHF.dtype, p)
           for p in ("state", "dstate", "dq", "dkv")}
    C = cfg["state"].chunk
    consts = dict(H=H, F=F, V=V, C=C, BF=BF, DT=dt, PREC=prec, ZPREC=zprec)
    sc = scales(F)

    c_BHT = denominator_grad(do_BTHV, o_BTHV, r_BHT)

    # the forward's states again (not kept from the forward: they are the largest tensor of the op)
    h, hz, _ = chunk_states(k_BTHF, v_BTHV, initial_state, output_final_state=False, symmetrize=True,
                            config=cfg["state"])
    NC = h.shape[1]
    p, pz = torch.empty_like(h), torch.empty_like(hz)
    dinit = None
    if need_dinit:
        dinit = (torch.empty(B, H, V, E, device=dev, dtype=torch.float32),
                 torch.empty(B, H, E, device=dev, dtype=torch.float32))
    dkvT, dzT = dfinal_state if dfinal_state is not None else (c_BHT, c_BHT)  # dummies when absent
    dkv0, dz0 = dinit if dinit is not None else (c_BHT, c_BHT)
    ds = cfg["dstate"]
    _based_chunk_dstates_kernel[(B * H, triton.cdiv(V, ds.block_v))](
        q_BTHF, do_BTHV, r_BHT, c_BHT, p, pz, dkvT, dzT, dkv0, dz0, T, NC, sc["FEAT1"], sc["FEAT2"], BV=ds.block_v,
        HAS_DFINAL=dfinal_state is not None, STORE_DINIT=need_dinit, **consts,
        num_warps=ds.num_warps, num_stages=ds.num_stages,
    )

    def partials(kc: KernelConfig) -> torch.Tensor:  # one slab per V block; fp32 when they get summed
        n = triton.cdiv(V, kc.block_v)
        return torch.empty((n,) + tuple(q_BTHF.shape), device=dev, dtype=q_BTHF.dtype if n == 1 else torch.float32)

    dq_part, dk_part, dv_BTHV = partials(cfg["dq"]), partials(cfg["dkv"]), torch.empty_like(v_BTHV)
    cpp = cfg["dq"].chunks_per_program
    _based_chunk_dq_kernel[(B * H, triton.cdiv(NC, cpp), dq_part.shape[0])](
        q_BTHF, k_BTHF, v_BTHV, do_BTHV, r_BHT, c_BHT, h, hz, dq_part, T, NC, sc["SCALE1"], sc["SCALE2"],
        BV=cfg["dq"].block_v, CPP=cpp, **consts, num_warps=cfg["dq"].num_warps, num_stages=cfg["dq"].num_stages,
    )
    cpp = cfg["dkv"].chunks_per_program
    _based_chunk_dkv_kernel[(B * H, triton.cdiv(NC, cpp), dk_part.shape[0])](
        q_BTHF, k_BTHF, v_BTHV, do_BTHV, r_BHT, c_BHT, p, pz, dk_part, dv_BTHV, T, NC, sc["SCALE1"], sc["SCALE2"],
        BV=cfg["dkv"].block_v, CPP=cpp, **consts, num_warps=cfg["dkv"].num_warps, num_stages=cfg["dkv"].num_stages,
    )
    dq_BTHF = dq_part[0] if dq_part.shape[0] == 1 else dq_part.sum(0).to(q_BTHF.dtype)
    dk_BTHF = dk_part[0] if dk_part.shape[0] == 1 else dk_part.sum(0).to(k_BTHF.dtype)
    if dinit is not None and dfinal_state is not None:
        # the scan used the symmetric part of the final-state gradient; pass its antisymmetric part through
        for d, src in zip(dinit, dfinal_state):
            quad = src[..., 1 + F:].unflatten(-1, (F, F))
            d[..., 1 + F:] += (0.5 * (quad - quad.transpose(-1, -2))).flatten(-2)
    return dq_BTHF, dk_BTHF, dv_BTHV, dinit
