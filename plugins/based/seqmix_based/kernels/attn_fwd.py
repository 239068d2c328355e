"""Based linear attention forward in Triton, chunked, with the Taylor feature map fused (kernels + launcher).

Two passes over chunks of C tokens:
  * states (sequential in time, one program per (batch*head, V block)): walks the chunks, writes the state
    before each chunk (S0, S1, S2 in the dot dtype, z in fp32; layout in common.py) to a chunk-state buffer,
    then adds the chunk's keys and values with vec(k k^T) built in registers; carries the initial state in and
    the final state out.
  * outputs (parallel, one program per (batch*head, run of chunks_per_program chunks, V block)): the quadratic
    form 1 + s + s^2/2 inside the chunk plus the chunk's state applied to vec(q q^T), built in registers.
The 1 + F + F^2 features never reach HBM; the chunk states do, once each way (the price of the parallel
second pass, which is where the FLOPs are).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from seqmix_based.kernels.common import (
    KernelConfig, block_f, default_config, dot_dtype, load_chunk_state, load_cols, load_rows, load_state,
    outer_cols, outer_rows, scales, store_chunk_state, store_state,
)


@triton.jit(do_not_specialize=["T", "NC"])
def _based_chunk_states_kernel(
    k_ptr, v_ptr, h_ptr, hz_ptr, kv0_ptr, z0_ptr, kvT_ptr, zT_ptr, T, NC, FEAT1, FEAT2,
    H: tl.constexpr, F: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, SYM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    HB: tl.constexpr = BF // 2
    R: tl.constexpr = BF * BF + BF + 1
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    first = i_v == 0
    k_base = k_ptr + i_b.to(tl.int64) * T * H * F + i_h * F
    v_base = v_ptr + i_b.to(tl.int64) * T * H * V + i_h * V
    offs_v = i_v * BV + tl.arange(0, BV)

    if HAS_INIT:
        s0, s1, s2a, s2b, z0, z1, z2 = load_state(kv0_ptr, z0_ptr, i_bh, offs_v, FEAT1, FEAT2, first, F, V, BF, HB, SYM)
    else:
        s0 = tl.zeros([BV], tl.float32)
        s1 = tl.zeros([BF, BV], tl.float32)
        s2a = tl.zeros([HB * BF, BV], tl.float32)
        s2b = tl.zeros([HB * BF, BV], tl.float32)
        z0 = tl.sum(tl.zeros([BF], tl.float32), 0)
        z1 = tl.zeros([BF], tl.float32)
        z2 = tl.zeros([BF, BF], tl.float32)

    for i_c in range(NC):
        slot = i_bh.to(tl.int64) * NC + i_c
        store_chunk_state(h_ptr + slot * R * V, hz_ptr + slot * R, offs_v, s0, s1, s2a, s2b, z0, z1, z2, first,
                          V, BF, HB)
        t0 = i_c * C
        kt = load_cols(k_base, t0, T, H * F, 0, F, C, BF, DT)
        v = load_rows(v_base, t0, T, H * V, i_v * BV, V, C, BV, DT)
        kta = load_cols(k_base, t0, T, H * F, 0, F, C, HB, DT)
        s2a = tl.dot(outer_cols(kta, kt, HB, BF, C), v, s2a, input_precision=PREC)
        ktb = load_cols(k_base, t0, T, H * F, HB, F, C, HB, DT)
        s2b = tl.dot(outer_cols(ktb, kt, HB, BF, C), v, s2b, input_precision=PREC)
        s1 = tl.dot(kt, v, s1, input_precision=PREC)
        s0 += tl.sum(v.to(tl.float32), 0)
        z0 += tl.minimum(T - t0, C).to(tl.float32)
        z1 += tl.sum(kt.to(tl.float32), 1)
        z2 = tl.dot(kt, tl.trans(kt), z2, input_precision=PREC)

    if STORE_FINAL:
        store_state(kvT_ptr, zT_ptr, i_bh, offs_v, s0, s1, s2a, s2b, z0, z1, z2, FEAT1, FEAT2, first, F, V, BF, HB)


@triton.jit(do_not_specialize=["T", "NC"])
def _based_chunk_out_kernel(
    q_ptr, k_ptr, v_ptr, h_ptr, hz_ptr, o_ptr, r_ptr, T, NC, eps, SCALE1, SCALE2,
    H: tl.constexpr, F: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr,
    CPP: tl.constexpr, STORE_R: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, ZPREC: tl.constexpr,
):
    HB: tl.constexpr = BF // 2
    R: tl.constexpr = BF * BF + BF + 1
    i_bh, i_p, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    q_base = q_ptr + i_b.to(tl.int64) * T * H * F + i_h * F
    k_base = k_ptr + i_b.to(tl.int64) * T * H * F + i_h * F
    v_off = i_b.to(tl.int64) * T * H * V + i_h * V
    offs_c = tl.arange(0, C)
    offs_v = i_v * BV + tl.arange(0, BV)

    for i_c in range(i_p * CPP, tl.minimum(NC, i_p * CPP + CPP)):
        t0 = i_c * C
        q = load_rows(q_base, t0, T, H * F, 0, F, C, BF, DT)
        kt = load_cols(k_base, t0, T, H * F, 0, F, C, BF, DT)
        v = load_rows(v_ptr + v_off, t0, T, H * V, i_v * BV, V, C, BV, DT)
        # intra-chunk: the quadratic form, diagonal included
        s = tl.dot(q, kt, input_precision=PREC) * SCALE1
        a = tl.where(offs_c[:, None] >= offs_c[None, :], 1.0 + s + 0.5 * s * s, 0.0)
        num = tl.dot(a.to(DT), v, input_precision=PREC)
        den = tl.sum(a, 1)
        # inter-chunk: the state before this chunk applied to phi(q); vec(q q^T) built in registers, by halves
        slot = i_bh.to(tl.int64) * NC + i_c
        s0, s1, s2a, s2b, z0, z1, z2 = load_chunk_state(h_ptr + slot * R * V, hz_ptr + slot * R, offs_v, V, BF, HB, DT)
        num += s0[None, :] + tl.dot(q, s1, input_precision=PREC) * SCALE1
        qa = load_rows(q_base, t0, T, H * F, 0, F, C, HB, DT)
        num += tl.dot(outer_rows(qa, q, C, HB, BF), s2a, input_precision=PREC) * SCALE2
        qb = load_rows(q_base, t0, T, H * F, HB, F, C, HB, DT)
        num += tl.dot(outer_rows(qb, q, C, HB, BF), s2b, input_precision=PREC) * SCALE2
        qf = q.to(tl.float32)
        qz = tl.dot(qf, z2, input_precision=ZPREC)  # q^T z2 [C, BF]
        den += z0 + tl.sum(qf * (z1[None, :] * SCALE1 + qz * SCALE2), 1)
        rr = 1.0 / (den + eps)
        rows = t0 + offs_c
        o = (num * rr[:, None]).to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + v_off + rows[:, None] * (H * V) + offs_v[None, :], o,
                 mask=(rows < T)[:, None] & (offs_v < V)[None, :])
        if STORE_R:
            tl.store(r_ptr + i_bh.to(tl.int64) * T + rows, rr, mask=rows < T * (i_v == 0).to(tl.int32))  # V block 0


def chunk_states(
    k_BTHF: torch.Tensor,
    v_BTHV: torch.Tensor,
    initial_state: Optional[tuple[torch.Tensor, torch.Tensor]],
    *,
    output_final_state: bool,
    symmetrize: bool,
    config: KernelConfig,
) -> tuple[torch.Tensor, torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """The state before every chunk: (h [B*H, NC, R, V] in the dot dtype, hz [B*H, NC, R] fp32, final state).

    symmetrize: average the initial state's F x F blocks with their transposes (for the backward; see load_state).
    """
    B, T, H, F = k_BTHF.shape
    V = v_BTHV.shape[-1]
    E, BF = 1 + F + F * F, block_f(F)
    R, NC = BF * BF + BF + 1, triton.cdiv(T, config.chunk)
    dev = k_BTHF.device
    dt, prec, _ = dot_dtype(k_BTHF)
    h = torch.empty(B * H, NC, R, V, device=dev, dtype=torch.bfloat16 if dt == tl.bfloat16 else torch.float32)
    hz = torch.empty(B * H, NC, R, device=dev, dtype=torch.float32)
    final = None
    if output_final_state:
        final = (torch.empty(B, H, V, E, device=dev, dtype=torch.float32),
                 torch.empty(B, H, E, device=dev, dtype=torch.float32))
    kv0, z0 = initial_state if initial_state is not None else (hz, hz)  # dummies, never read
    kvT, zT = final if final is not None else (hz, hz)
    sc = scales(F)
    _based_chunk_states_kernel[(B * H, triton.cdiv(V, config.block_v))](
        k_BTHF, v_BTHV, h, hz, kv0, z0, kvT, zT, T, NC, sc["FEAT1"], sc["FEAT2"],
        H=H, F=F, V=V, C=config.chunk, BF=BF, BV=config.block_v, HAS_INIT=initial_state is not None,
        STORE_FINAL=output_final_state, SYM=symmetrize, DT=dt, PREC=prec,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return h, hz, final


def based_fwd(
    q_BTHF: torch.Tensor,
    k_BTHF: torch.Tensor,
    v_BTHV: torch.Tensor,
    initial_state: Optional[tuple[torch.Tensor, torch.Tensor]],
    *,
    output_final_state: bool,
    store_r: bool,
    eps: float,
    configs: Optional[dict[str, KernelConfig]] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Launch the forward on contiguous [B, T, H, F] / [B, T, H, V] inputs.

    Returns (o_BTHV in v's dtype, r_BHT = 1 / (den + eps) in fp32 if store_r else None, final state or None).
    configs: {"state": ..., "out": ...} overrides (the chunk comes from "state").
    """
    B, T, H, F = q_BTHF.shape
    V = v_BTHV.shape[-1]
    cfg = {p: (configs or {}).get(p) or default_config(F, V, v_BTHV.dtype, p) for p in ("state", "out")}
    h, hz, final = chunk_states(k_BTHF, v_BTHV, initial_state, output_final_state=output_final_state,
                                symmetrize=False, config=cfg["state"])
    o_BTHV = torch.empty_like(v_BTHV)
    r_BHT = torch.empty(B, H, T, device=q_BTHF.device, dtype=torch.float32) if store_r else hz
    dt, prec, zprec = dot_dtype(q_BTHF)
    C, out = cfg["state"].chunk, cfg["out"]
    NC, cpp = h.shape[1], out.chunks_per_program
    _based_chunk_out_kernel[(B * H, triton.cdiv(NC, cpp), triton.cdiv(V, out.block_v))](
        q_BTHF, k_BTHF, v_BTHV, h, hz, o_BTHV, r_BHT, T, NC, eps, scales(F)["SCALE1"], scales(F)["SCALE2"],
        H=H, F=F, V=V, C=C, BF=block_f(F), BV=out.block_v, CPP=cpp, STORE_R=store_r, DT=dt, PREC=prec, ZPREC=zprec,
        num_warps=out.num_warps, num_stages=out.num_stages,
    )
    return o_BTHV, (r_BHT if store_r else None), final
