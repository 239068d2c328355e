"""Mamba-1 selective scan on Triton: forward, backward and the one-token decode step.

    dt_t = softplus(delta_t + bias)      h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t      y_t = (C_t h_t + D u_t) silu(z_t)

Forward: one program per (channel block [BE], batch, time segment) keeps its fp32 state tile [N, BE] in registers
and walks time (each thread owns whole channels, so the sum over N needs no shuffles); the inputs of the next step
are loaded while the current one computes. The state goes to HBM only at chunk starts (checkpoints for the
backward, [B, chunks, N, E]) and at the end. With few programs (long T, small batch) time is cut into segments:
pass 1 scans each from zero (state only), the segment states are combined (h_in[s] = exp(A sum dt) h_in[s-1] +
h_zero[s-1]), pass 2 re-runs every segment from its true start.
Backward: per program, chunks in reverse: recompute the chunk's states from its checkpoint into a per-program
scratch (mostly L2-resident at 16-step chunks), then walk the chunk backwards (time indexed downwards, no reverse
associative scan) with the adjoint g = dL/dh. dB, dC are partial per channel block and summed after; dA, D,
bias partial per program.
Long T / small batch splits the backward into segments too: a g-only reverse pass from zero, a combine, then the
full backward per segment. Twins: `seqmix_mamba.naive.selective_scan_fused_ref` / `selective_state_update_ref`.
The default-config scan and the step are torch.library custom ops, so torch.compile sees them as single nodes.
H200 timings beside mamba-ssm's: kernels/bench/results/mamba_2026-12-02_h200.md (kernels/bench/bench_mamba.py).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from seqmix_kernels.backend import check_device

LOG2E = 1.4426950408889634


class ScanConfig(NamedTuple):
    """Launch parameters: channels per program, warps, checkpoint interval (time steps), time segments (None:
    chosen from the device's SM count), a register cap per thread (None: the compiler's choice)."""

    block_e: int
    num_warps: int
    chunk: int = 64
    segments: Optional[int] = None
    maxnreg: Optional[int] = None


def _launch_opts(cfg: ScanConfig) -> dict:
    return {"num_warps": cfg.num_warps, **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg})}


@triton.jit
def _dt(x, SOFTPLUS: tl.constexpr):
    if SOFTPLUS:
        x = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))
    return x


@triton.jit
def _load_step(u_base, x_base, b_base, t, sut, sxt, sbt, em, nm, bias, SOFTPLUS: tl.constexpr):
    """u, dt [BE] (fp32, softplus applied) and B [NP] of step t."""
    u = tl.load(u_base + t * sut, mask=em, other=0.0).to(tl.float32)
    x = tl.load(x_base + t * sxt, mask=em, other=0.0).to(tl.float32) + bias
    b = tl.load(b_base + t * sbt, mask=nm, other=0.0).to(tl.float32)
    return u, _dt(x, SOFTPLUS), b


@triton.jit(do_not_specialize=["PAD"])
def _scan_fwd_kernel(
    u_ptr, x_ptr, z_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, h0_ptr, y_ptr, hT_ptr, ck_ptr, dts_ptr,
    T, E, N, SEG, S, n_chunks, PAD, sub, sut, sxb, sxt, szb, szt, sbb, sbt, scb, sct,
    NP: tl.constexpr, BE: tl.constexpr, CHUNK: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, STORE_Y: tl.constexpr,
    STORE_CK: tl.constexpr, STORE_DTS: tl.constexpr,
):
    i_e, i_bs = tl.program_id(0), tl.program_id(1)
    i_b, i_s = i_bs // S, i_bs % S
    e = i_e * BE + tl.arange(0, BE)
    n = tl.arange(0, NP)
    em, nm = e < E, n < N
    m2 = nm[:, None] & em[None, :]
    # [N, BE] tiles of [N, E] buffers. PAD is a runtime 0 the compiler cannot see through: it keeps the 2-D loads
    # and stores unvectorised, so their layout is the loop's (a thread per channel, all N states in its registers)
    # and the step loop needs no layout conversions.
    st_off = n[:, None] * E + e[None, :] + PAD
    A2 = tl.load(a_ptr + st_off, mask=m2, other=0.0).to(tl.float32) * 1.4426950408889634
    bias = tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros([BE], tl.float32)
    Dv = tl.load(d_ptr + e, mask=em, other=0.0).to(tl.float32) if HAS_D else tl.zeros([BE], tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + i_bs.to(tl.int64) * E * N + st_off, mask=m2, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([NP, BE], tl.float32)
    t0 = i_s * SEG
    t1 = tl.minimum(t0 + SEG, T)
    b64 = i_b.to(tl.int64)
    u_base, x_base = u_ptr + b64 * sub + e, x_ptr + b64 * sxb + e
    z_base, b_base, c_base = z_ptr + b64 * szb + e, b_ptr + b64 * sbb + n, c_ptr + b64 * scb + n
    ck_base = ck_ptr + b64 * n_chunks * N * E + st_off  # [B, chunks, N, E]
    dts = tl.zeros([BE], tl.float32)
    t_pre = tl.minimum(t0, T - 1)
    u_n = tl.load(u_base + t_pre * sut, mask=em, other=0.0)
    x_n = tl.load(x_base + t_pre * sxt, mask=em, other=0.0)
    b_n = tl.load(b_base + t_pre * sbt, mask=nm, other=0.0)
    c_n = tl.load(c_base + t_pre * sct, mask=nm & STORE_Y, other=0.0)
    z_n = tl.load(z_base + t_pre * szt, mask=em & (HAS_Z and STORE_Y), other=0.0)
    for t in range(t0, t1):
        u, xr, bv, cv, zv = u_n.to(tl.float32), x_n.to(tl.float32), b_n.to(tl.float32), c_n.to(tl.float32), z_n
        # the next step's inputs, loaded while this one computes (the last step reloads itself)
        t_pre = tl.minimum(t + 1, t1 - 1)
        u_n = tl.load(u_base + t_pre * sut, mask=em, other=0.0)
        x_n = tl.load(x_base + t_pre * sxt, mask=em, other=0.0)
        b_n = tl.load(b_base + t_pre * sbt, mask=nm, other=0.0)
        c_n = tl.load(c_base + t_pre * sct, mask=nm & STORE_Y, other=0.0)
        z_n = tl.load(z_base + t_pre * szt, mask=em & (HAS_Z and STORE_Y), other=0.0)
        if STORE_CK:
            if t % CHUNK == 0:
                tl.store(ck_base + (t // CHUNK) * N * E, h, mask=m2)
        dt = _dt(xr + bias, SOFTPLUS)
        h = tl.exp2(dt[None, :] * A2) * h + (dt * u)[None, :] * bv[:, None]
        if STORE_DTS:
            dts += dt
        if STORE_Y:
            y = tl.sum(h * cv[:, None], 0) + Dv * u
            if HAS_Z:
                zf = zv.to(tl.float32)
                y = y * zf / (1.0 + tl.exp(-zf))
            tl.store(y_ptr + (b64 * T + t) * E + e, y.to(y_ptr.dtype.element_ty), mask=em)
    tl.store(hT_ptr + i_bs.to(tl.int64) * E * N + st_off, h, mask=m2)
    if STORE_DTS:
        tl.store(dts_ptr + i_bs.to(tl.int64) * E + e, dts, mask=em)


@triton.jit(do_not_specialize=["PAD"])
def _scan_bwd_adjoint_kernel(
    x_ptr, z_ptr, c_ptr, a_ptr, bias_ptr, dy_ptr, gz_ptr, dts_ptr,
    T, E, N, SEG, S, PAD, sxb, sxt, szb, szt, scb, sct,
    NP: tl.constexpr, BE: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Segmented backward, pass 1: g = dL/dh_{t0-1} of each segment with zero gradient entering at its end
    (g needs no states), and the segment's sum of dt."""
    i_e, i_bs = tl.program_id(0), tl.program_id(1)
    i_b, i_s = i_bs // S, i_bs % S
    e = i_e * BE + tl.arange(0, BE)
    n = tl.arange(0, NP)
    em, nm = e < E, n < N
    m2 = nm[:, None] & em[None, :]
    st_off = n[:, None] * E + e[None, :] + PAD
    A2 = tl.load(a_ptr + st_off, mask=m2, other=0.0).to(tl.float32) * 1.4426950408889634
    bias = tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros([BE], tl.float32)
    t0 = i_s * SEG
    t1 = tl.minimum(t0 + SEG, T)
    b64 = i_b.to(tl.int64)
    g = tl.zeros([NP, BE], tl.float32)
    dts = tl.zeros([BE], tl.float32)
    for tt in range(0, t1 - t0):
        t = t1 - 1 - tt
        dt = _dt(tl.load(x_ptr + b64 * sxb + t * sxt + e, mask=em, other=0.0).to(tl.float32) + bias, SOFTPLUS)
        dy = tl.load(dy_ptr + (b64 * T + t) * E + e, mask=em, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + b64 * szb + t * szt + e, mask=em, other=0.0).to(tl.float32)
            dy = dy * zv / (1.0 + tl.exp(-zv))
        cv = tl.load(c_ptr + b64 * scb + t * sct + n, mask=nm, other=0.0).to(tl.float32)
        g = (g + cv[:, None] * dy[None, :]) * tl.exp2(dt[None, :] * A2)
        dts += dt
    tl.store(gz_ptr + i_bs.to(tl.int64) * E * N + st_off, g, mask=m2)
    tl.store(dts_ptr + i_bs.to(tl.int64) * E + e, dts, mask=em)


@triton.jit(do_not_specialize=["PAD"])
def _scan_bwd_kernel(
    u_ptr, x_ptr, z_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, ck_ptr, dy_ptr, g0_ptr,
    du_ptr, dx_ptr, dz_ptr, dbp_ptr, dcp_ptr, dap_ptr, ddp_ptr, dbiasp_ptr, dh0_ptr, scr_ptr,
    T, E, N, SEG, S, n_chunks, n_eblk, PAD, sub, sut, sxb, sxt, szb, szt, sbb, sbt, scb, sct,
    NP: tl.constexpr, BE: tl.constexpr, CHUNK: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_G0: tl.constexpr,
):
    i_e, i_bs = tl.program_id(0), tl.program_id(1)
    i_b, i_s = i_bs // S, i_bs % S
    e = i_e * BE + tl.arange(0, BE)
    n = tl.arange(0, NP)
    em, nm = e < E, n < N
    m2 = nm[:, None] & em[None, :]
    st_off = n[:, None] * E + e[None, :] + PAD
    A = tl.load(a_ptr + st_off, mask=m2, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    bias = tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32) if HAS_BIAS else tl.zeros([BE], tl.float32)
    Dv = tl.load(d_ptr + e, mask=em, other=0.0).to(tl.float32) if HAS_D else tl.zeros([BE], tl.float32)
    if HAS_G0:
        g = tl.load(g0_ptr + i_bs.to(tl.int64) * E * N + st_off, mask=m2, other=0.0)
    else:
        g = tl.zeros([NP, BE], tl.float32)
    t0 = i_s * SEG
    t1 = tl.minimum(t0 + SEG, T)
    b64 = i_b.to(tl.int64)
    u_base, x_base = u_ptr + b64 * sub + e, x_ptr + b64 * sxb + e
    z_base, b_base, c_base = z_ptr + b64 * szb + e, b_ptr + b64 * sbb + n, c_ptr + b64 * scb + n
    ck_base = ck_ptr + b64 * n_chunks * N * E + st_off
    pid = i_bs.to(tl.int64) * n_eblk + i_e
    scr = scr_ptr + pid * CHUNK * NP * BE + n[:, None] * BE + tl.arange(0, BE)[None, :] + PAD  # [CHUNK, NP, BE]
    da_acc = tl.zeros([NP, BE], tl.float32)
    dd_acc = tl.zeros([BE], tl.float32)
    dbias_acc = tl.zeros([BE], tl.float32)
    c_lo = t0 // CHUNK
    c_hi = tl.cdiv(t1, CHUNK)
    for cc in range(0, c_hi - c_lo):
        c = c_hi - 1 - cc
        ts = c * CHUNK
        te = tl.minimum(ts + CHUNK, t1)
        h = tl.load(ck_base + c * N * E, mask=m2, other=0.0)
        tl.debug_barrier()  # the previous chunk's reverse walk has read its scratch
        for t in range(ts, te):  # recompute the chunk's states
            u, dt, bv = _load_step(u_base, x_base, b_base, t, sut, sxt, sbt, em, nm, bias, SOFTPLUS)
            h = tl.exp2(dt[None, :] * A2) * h + (dt * u)[None, :] * bv[:, None]
            tl.store(scr + (t - ts) * NP * BE, h)
        tl.debug_barrier()
        for tt in range(0, te - ts):  # walk it backwards
            t = te - 1 - tt
            u = tl.load(u_base + t * sut, mask=em, other=0.0).to(tl.float32)
            xr = tl.load(x_base + t * sxt, mask=em, other=0.0).to(tl.float32) + bias
            dt = _dt(xr, SOFTPLUS)
            bv = tl.load(b_base + t * sbt, mask=nm, other=0.0).to(tl.float32)
            cv = tl.load(c_base + t * sct, mask=nm, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + (b64 * T + t) * E + e, mask=em, other=0.0).to(tl.float32)
            h = tl.load(scr + (t - ts) * NP * BE)
            if HAS_Z:
                zv = tl.load(z_base + t * szt, mask=em, other=0.0).to(tl.float32)
                sz = 1.0 / (1.0 + tl.exp(-zv))
                y = tl.sum(h * cv[:, None], 0) + Dv * u
                tl.store(dz_ptr + (b64 * T + t) * E + e, (dy * y * sz * (1.0 + zv * (1.0 - sz))).to(
                    dz_ptr.dtype.element_ty), mask=em)
                dy = dy * zv * sz
            g = g + cv[:, None] * dy[None, :]
            dtu = dt * u
            hd = h - dtu[None, :] * bv[:, None]  # exp(dt A) h_{t-1}, without dividing by the decay
            gb = tl.sum(g * bv[:, None], 0)
            ddt = tl.sum(g * A * hd, 0) + u * gb
            da_acc += g * hd * dt[None, :]
            dd_acc += dy * u
            tl.store(du_ptr + (b64 * T + t) * E + e, (dt * gb + Dv * dy).to(du_ptr.dtype.element_ty), mask=em)
            if SOFTPLUS:
                ddt = ddt / (1.0 + tl.exp(-xr))
            dbias_acc += tl.where(em, ddt, 0.0)
            tl.store(dx_ptr + (b64 * T + t) * E + e, ddt.to(dx_ptr.dtype.element_ty), mask=em)
            p_off = ((b64 * T + t) * n_eblk + i_e) * N + n
            tl.store(dbp_ptr + p_off, tl.sum(g * dtu[None, :], 1), mask=nm)
            tl.store(dcp_ptr + p_off, tl.sum(h * dy[None, :], 1), mask=nm)
            g = g * tl.exp2(dt[None, :] * A2)
    tl.store(dh0_ptr + i_bs.to(tl.int64) * E * N + st_off, g, mask=m2)
    tl.store(dap_ptr + i_bs.to(tl.int64) * E * N + st_off, da_acc, mask=m2)
    tl.store(ddp_ptr + i_bs.to(tl.int64) * E + e, dd_acc, mask=em)
    tl.store(dbiasp_ptr + i_bs.to(tl.int64) * E + e, dbias_acc, mask=em)


@triton.jit
def _state_update_kernel(
    s_ptr, u_ptr, x_ptr, z_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, y_ptr,
    E, N, ssb, sub, sxb, szb, sbb, scb,
    NP: tl.constexpr, BE: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, HAS_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """One token for a [BE] channel block of one sequence; the state [B, E, N] is updated in place."""
    i_e, i_b = tl.program_id(0), tl.program_id(1)
    b64 = i_b.to(tl.int64)
    e = i_e * BE + tl.arange(0, BE)
    n = tl.arange(0, NP)
    em, nm = e < E, n < N
    m2 = em[:, None] & nm[None, :]
    off = e[:, None] * N + n[None, :]  # [BE, N], n contiguous as stored
    s_p = s_ptr + b64 * ssb + off
    h = tl.load(s_p, mask=m2, other=0.0)
    A = tl.load(a_ptr + off, mask=m2, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + b64 * sub + e, mask=em, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b64 * sxb + e, mask=em, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + e, mask=em, other=0.0).to(tl.float32)
    dt = _dt(x, SOFTPLUS)
    bv = tl.load(b_ptr + b64 * sbb + n, mask=nm, other=0.0).to(tl.float32)
    cv = tl.load(c_ptr + b64 * scb + n, mask=nm, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * bv[None, :]
    tl.store(s_p, h.to(s_ptr.dtype.element_ty), mask=m2)
    y = tl.sum(h * cv[None, :], 1)
    if HAS_D:
        y += tl.load(d_ptr + e, mask=em, other=0.0).to(tl.float32) * u
    if HAS_Z:
        zv = tl.load(z_ptr + b64 * szb + e, mask=em, other=0.0).to(tl.float32)
        y = y * zv / (1.0 + tl.exp(-zv))
    tl.store(y_ptr + b64 * E + e, y.to(y_ptr.dtype.element_ty), mask=em)


# -- launchers ------------------------------------------------------------------------------------------------
def default_configs(device: torch.device, batch: int = 1, channels: int = 2048) -> tuple[ScanConfig, ScanConfig]:
    """(forward, backward) for a [batch, T, channels] scan. A thread per channel (block_e = 32 * warps keeps the
    step loop free of layout conversions), two per thread in the forward when the batch is too small to fill
    the GPU without a time split (more independent work per step hides latency there). The backward's
    scratch of recomputed states holds chunk * N * 4 bytes per channel in flight; 16 steps keep it in L2. On the
    H200 (kernels/bench/results/mamba_*.md) these beat the other blocks, warps and chunks tried.
    Under the interpreter (CPU) short chunks, so test shapes span several."""
    if device.type != "cuda":
        return ScanConfig(32, 1, 8), ScanConfig(32, 1, 8)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wide = batch * triton.cdiv(channels, 64) < _FWD_FULL * sms
    return ScanConfig(128 if wide else 64, 2, 16), ScanConfig(32, 1, 16)


# Programs per SM from which a pass runs at full speed without a time split, and the programs per SM a split
# aims at (measured on the H200: a split re-runs the scan, about 1.6x the work, so it pays only below these).
_FWD_FULL, _FWD_SPLIT, _BWD_FULL, _BWD_SPLIT = 3, 8, 6, 16


def _split(T: int, programs: int, cfg: ScanConfig, chunk: int, device: torch.device, full: int, aim: int):
    """(segments S, segment length SEG, a multiple of the chunk) for `programs` programs per segment."""
    n_chunks = triton.cdiv(max(T, 1), chunk)
    if cfg.segments is not None:
        S = cfg.segments
    elif device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        S = 1 if programs >= full * sms else aim * sms // programs
    else:
        S = 1
    S = max(1, min(S, n_chunks))
    seg = triton.cdiv(n_chunks, S) * chunk
    return triton.cdiv(max(T, 1), seg), seg


def _strides(t: Optional[torch.Tensor]) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def scan_fwd(u, x, A, Bm, Cm, D, z, bias, h0, softplus: bool, cfg: ScanConfig):
    """(y [B, T, E] in u's dtype, final state [B, E, N] fp32, checkpoints [B, chunks, N, E] fp32).
    The kernels see A, states and checkpoints as [.., N, E] (channels contiguous)."""
    Bsz, T, E = u.shape
    N = A.shape[1]
    A = A.t().contiguous()  # [N, E]
    h0 = None if h0 is None else h0.transpose(1, 2).contiguous()
    BE, chunk = cfg.block_e, cfg.chunk
    n_eblk = triton.cdiv(E, BE)
    S, seg = _split(T, Bsz * n_eblk, cfg, chunk, u.device, _FWD_FULL, _FWD_SPLIT)
    n_chunks = triton.cdiv(T, chunk)
    y = torch.empty(Bsz, T, E, device=u.device, dtype=u.dtype)
    ck = torch.empty(Bsz, n_chunks, N, E, device=u.device, dtype=torch.float32)
    hT = torch.empty(Bsz * S, N, E, device=u.device, dtype=torch.float32)
    strides = (*_strides(u), *_strides(x), *_strides(z), *_strides(Bm), *_strides(Cm))

    def launch(h_in, h_out, dts, store_y):
        _scan_fwd_kernel[(n_eblk, Bsz * S)](
            u, x, z if z is not None else u, Bm, Cm, A, D if D is not None else A, bias if bias is not None else A,
            h_in if h_in is not None else A, y, h_out, ck, dts if dts is not None else A,
            T, E, N, seg, S, n_chunks, 0, *strides,
            NP=triton.next_power_of_2(N), BE=BE, CHUNK=chunk, SOFTPLUS=softplus, HAS_Z=z is not None,
            HAS_D=D is not None, HAS_BIAS=bias is not None, HAS_H0=h_in is not None, STORE_Y=store_y,
            STORE_CK=store_y, STORE_DTS=dts is not None, **_launch_opts(cfg),
        )

    if S == 1:
        launch(h0, hT, None, True)
        return y, hT.transpose(1, 2).contiguous(), ck
    hz = torch.empty(Bsz * S, N, E, device=u.device, dtype=torch.float32)
    dts = torch.empty(Bsz * S, E, device=u.device, dtype=torch.float32)
    launch(None, hz, dts, False)  # pass 1: every segment from zero
    hz, dts = hz.view(Bsz, S, N, E), dts.view(Bsz, S, E)
    h_in = torch.empty(Bsz, S, N, E, device=u.device, dtype=torch.float32)
    cur = torch.zeros(Bsz, N, E, device=u.device, dtype=torch.float32) if h0 is None else h0.float()
    for s in range(S):
        h_in[:, s] = cur
        if s < S - 1:
            cur = torch.exp(A * dts[:, s, None, :]) * cur + hz[:, s]
    launch(h_in.view(Bsz * S, N, E), hT, None, True)  # pass 2: from the true segment starts
    return y, hT.view(Bsz, S, N, E)[:, -1].transpose(1, 2).contiguous(), ck


def scan_bwd(dy, dhT, u, x, A, Bm, Cm, D, z, bias, ck, softplus: bool, cfg: ScanConfig, chunk: int):
    """(du, dx, dA, dB, dC, dD, dz, dbias, dh0); dy contiguous [B, T, E]; chunk = the forward's."""
    Bsz, T, E = u.shape
    N = A.shape[1]
    NP, BE = triton.next_power_of_2(N), cfg.block_e
    n_eblk = triton.cdiv(E, BE)
    S, seg = _split(T, Bsz * n_eblk, cfg, chunk, u.device, _BWD_FULL, _BWD_SPLIT)
    dev, f32 = u.device, torch.float32
    A_dtype, A = A.dtype, A.t().contiguous()  # [N, E], as the states
    g0 = None if dhT is None else dhT.float().transpose(1, 2).contiguous()
    if S > 1:
        gz = torch.empty(Bsz * S, N, E, device=dev, dtype=f32)
        dts = torch.empty(Bsz * S, E, device=dev, dtype=f32)
        _scan_bwd_adjoint_kernel[(n_eblk, Bsz * S)](
            x, z if z is not None else x, Cm, A, bias if bias is not None else A, dy, gz, dts,
            T, E, N, seg, S, 0, *_strides(x), *_strides(z), *_strides(Cm),
            NP=NP, BE=BE, SOFTPLUS=softplus, HAS_Z=z is not None, HAS_BIAS=bias is not None, **_launch_opts(cfg),
        )
        gz, dts = gz.view(Bsz, S, N, E), dts.view(Bsz, S, E)
        g_in = torch.empty(Bsz, S, N, E, device=dev, dtype=f32)
        cur = torch.zeros(Bsz, N, E, device=dev, dtype=f32) if g0 is None else g0
        for s in range(S - 1, -1, -1):
            g_in[:, s] = cur
            if s > 0:
                cur = torch.exp(A * dts[:, s, None, :]) * cur + gz[:, s]
        g0 = g_in.view(Bsz * S, N, E)
    du = torch.empty(Bsz, T, E, device=dev, dtype=u.dtype)
    dx = torch.empty(Bsz, T, E, device=dev, dtype=x.dtype)
    dz = torch.empty(Bsz, T, E, device=dev, dtype=z.dtype) if z is not None else None
    dbp, dcp = (torch.empty(Bsz, T, n_eblk, N, device=dev, dtype=f32) for _ in range(2))
    dap, dh0 = (torch.empty(Bsz * S, N, E, device=dev, dtype=f32) for _ in range(2))
    ddp, dbiasp = (torch.empty(Bsz * S, E, device=dev, dtype=f32) for _ in range(2))
    scratch = torch.empty(Bsz * S * n_eblk, chunk, NP, BE, device=dev, dtype=f32)
    _scan_bwd_kernel[(n_eblk, Bsz * S)](
        u, x, z if z is not None else u, Bm, Cm, A, D if D is not None else A, bias if bias is not None else A,
        ck, dy, g0 if g0 is not None else A, du, dx, dz if dz is not None else du, dbp, dcp, dap, ddp, dbiasp,
        dh0, scratch, T, E, N, seg, S, ck.shape[1], n_eblk, 0,
        *_strides(u), *_strides(x), *_strides(z), *_strides(Bm), *_strides(Cm),
        NP=NP, BE=BE, CHUNK=chunk, SOFTPLUS=softplus, HAS_Z=z is not None, HAS_D=D is not None,
        HAS_BIAS=bias is not None, HAS_G0=g0 is not None, **_launch_opts(cfg),
    )
    dB, dC = dbp.sum(2).to(Bm.dtype), dcp.sum(2).to(Cm.dtype)
    dD = ddp.sum(0).to(D.dtype) if D is not None else None
    dbias = dbiasp.sum(0).to(bias.dtype) if bias is not None else None
    dA = dap.sum(0).t().to(A_dtype)
    return du, dx, dA, dB, dC, dD, dz, dbias, dh0.view(Bsz, S, N, E)[:, 0].transpose(1, 2)


class SelectiveScanFunction(torch.autograd.Function):
    """(u, delta, A, B, C, D, z, delta_bias, h0) -> (y, final state)."""

    @staticmethod
    def forward(ctx, u, x, A, Bm, Cm, D, z, bias, h0, softplus, configs):
        fcfg, bcfg = configs
        y, hT, ck = scan_fwd(u, x, A, Bm, Cm, D, z, bias, h0, softplus, fcfg)
        ctx.save_for_backward(u, x, A, Bm, Cm, D, z, bias, ck)
        ctx.softplus, ctx.bcfg, ctx.chunk, ctx.h0_dtype = softplus, bcfg, fcfg.chunk, None if h0 is None else h0.dtype
        return y, hT

    @staticmethod
    def backward(ctx, dy, dhT):
        u, x, A, Bm, Cm, D, z, bias, ck = ctx.saved_tensors
        du, dx, dA, dB, dC, dD, dz, dbias, dh0 = scan_bwd(dy.contiguous(), dhT, u, x, A, Bm, Cm, D, z, bias, ck,
                                                          ctx.softplus, ctx.bcfg, ctx.chunk)
        dh0 = None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype)
        return du, dx, dA, dB, dC, dD, dz, dbias, dh0, None, None


# The default-config path as torch.library custom ops (opaque to torch.compile: a compiled block has no graph break);
# explicit `configs` (benchmarks) take the autograd Function above. A custom op returns tensors only: absent
# optional gradients come back as fresh empty [0] tensors.
@torch.library.custom_op("seqmix_mamba::selective_scan_fwd", mutates_args=())
def _fwd_op(u: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
            D: Optional[torch.Tensor], z: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            h0: Optional[torch.Tensor], softplus: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fcfg, _ = default_configs(u.device, u.shape[0], u.shape[2])
    return scan_fwd(u, x, A, Bm, Cm, D, z, bias, h0, softplus, fcfg)


@_fwd_op.register_fake
def _(u, x, A, Bm, Cm, D, z, bias, h0, softplus):
    Bsz, T, E = u.shape
    N = A.shape[1]
    chunk = default_configs(u.device, Bsz, E)[0].chunk
    return (u.new_empty(Bsz, T, E), u.new_empty(Bsz, E, N, dtype=torch.float32),
            u.new_empty(Bsz, (T + chunk - 1) // chunk, N, E, dtype=torch.float32))


@torch.library.custom_op("seqmix_mamba::selective_scan_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, dhT: Optional[torch.Tensor], u: torch.Tensor, x: torch.Tensor, A: torch.Tensor,
            Bm: torch.Tensor, Cm: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
            bias: Optional[torch.Tensor], ck: torch.Tensor, softplus: bool) -> list[torch.Tensor]:
    fcfg, bcfg = default_configs(u.device, u.shape[0], u.shape[2])
    grads = scan_bwd(dy.contiguous(), dhT, u, x, A, Bm, Cm, D, z, bias, ck, softplus, bcfg, fcfg.chunk)
    return [g.contiguous() if g is not None else u.new_empty(0) for g in grads]


@_bwd_op.register_fake
def _(dy, dhT, u, x, A, Bm, Cm, D, z, bias, ck, softplus):
    f32, opt = torch.float32, lambda t: u.new_empty(0) if t is None else t.new_empty(t.shape)  # noqa: E731
    return [u.new_empty(u.shape), x.new_empty(x.shape), A.new_empty(A.shape), Bm.new_empty(Bm.shape),
            Cm.new_empty(Cm.shape), opt(D), opt(z), opt(bias), u.new_empty(u.shape[0], A.shape[0], A.shape[1],
                                                                           dtype=f32)]


def _setup(ctx, inputs, output):
    u, x, A, Bm, Cm, D, z, bias, h0, softplus = inputs
    ctx.save_for_backward(u, x, A, Bm, Cm, D, z, bias, output[2])
    ctx.softplus, ctx.h0_dtype = softplus, None if h0 is None else h0.dtype


def _backward(ctx, dy, dhT, _dck):
    u, x, A, Bm, Cm, D, z, bias, ck = ctx.saved_tensors
    dy = torch.zeros_like(u) if dy is None else dy  # only the final state was used
    du, dx, dA, dB, dC, dD, dz, dbias, dh0 = _bwd_op(dy, dhT, u, x, A, Bm, Cm, D, z, bias, ck, ctx.softplus)
    keep = lambda g, t: None if t is None else g  # noqa: E731
    return (du, dx, dA, dB, dC, keep(dD, D), keep(dz, z), keep(dbias, bias),
            None if ctx.h0_dtype is None else dh0.to(ctx.h0_dtype), None)


_fwd_op.register_autograd(_backward, setup_context=_setup)


def _last_unit(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _check(what, u, delta, A, Bm, Cm, D, z, bias, state, lead: tuple) -> None:
    E, N = A.shape if A.dim() == 2 else (None, None)
    want = {"delta": (*lead, E), "A_EN": (E, N), "B": (*lead, N), "C": (*lead, N), "D_E": (E,), "z": (*lead, E),
            "delta_bias_E": (E,), "state": (lead[0], E, N)}
    for name, t in zip(want, (delta, A, Bm, Cm, D, z, bias, state)):
        if t is not None and tuple(t.shape) != want[name]:
            raise ValueError(f"{what}: {name} has shape {tuple(t.shape)}; expected {want[name]} for u "
                             f"{tuple(u.shape)} and A_EN [E, N]")
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{what}: u must be fp32, fp16 or bf16, got {u.dtype}")
    if N > 64:
        raise ValueError(f"{what}: the kernel keeps N = d_state fp32 values per channel in registers; N <= 64, "
                         f"got {N} (use impl='chunked')")
    check_device(what, u, delta, A, Bm, Cm, D, z, bias, state)


def selective_scan(
    u_BTE: torch.Tensor,
    delta_BTE: torch.Tensor,
    A_EN: torch.Tensor,
    B_BTN: torch.Tensor,
    C_BTN: torch.Tensor,
    D_E: Optional[torch.Tensor] = None,
    z_BTE: Optional[torch.Tensor] = None,
    delta_bias_E: Optional[torch.Tensor] = None,
    *,
    delta_softplus: bool = True,
    initial_state_BEN: Optional[torch.Tensor] = None,
    configs: Optional[tuple[ScanConfig, ScanConfig]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated selective scan of Mamba-1 on Triton.

    u_BTE: scan input [batch, time, E]; delta_BTE: step sizes before the softplus (and before delta_bias_E [E],
    added in fp32); A_EN: decay rates [E, N] (negative, fp32); B_BTN, C_BTN: [batch, time, N]; D_E: skip [E];
    z_BTE: gate, y *= silu(z); initial_state_BEN: [batch, E, N] carried state (read, not modified).
    Any strides over batch and time (unit stride over the last dim); one of fp32/fp16/bf16 for u.
    configs: (forward ScanConfig, backward ScanConfig) to override launch parameters (benchmarks); the backward
    uses the forward's checkpoint chunk.
    Returns (y_BTE contiguous in u's dtype, final state [batch, E, N] fp32); all math in fp32. Differentiable
    w.r.t. every tensor input (incl. the initial state), through both outputs. Needs a CUDA device (or Triton's
    interpreter on CPU, for tests).
    """
    if u_BTE.dim() != 3:
        raise ValueError(f"selective_scan wants u [B, T, E], got {tuple(u_BTE.shape)}")
    _check("selective_scan", u_BTE, delta_BTE, A_EN, B_BTN, C_BTN, D_E, z_BTE, delta_bias_E, initial_state_BEN,
           tuple(u_BTE.shape[:2]))
    Bsz, T, E = u_BTE.shape
    if T == 0:
        h = (initial_state_BEN.float() if initial_state_BEN is not None else
             u_BTE.new_zeros(Bsz, E, A_EN.shape[1], dtype=torch.float32))
        return u_BTE.new_zeros(u_BTE.shape), h
    args = [_last_unit(t) for t in (u_BTE, delta_BTE, A_EN, B_BTN, C_BTN, D_E, z_BTE, delta_bias_E)]
    h0 = None if initial_state_BEN is None else initial_state_BEN.contiguous()
    if configs is None:
        y, hT, _ = _fwd_op(*args, h0, bool(delta_softplus))
        return y, hT
    return SelectiveScanFunction.apply(*args, h0, bool(delta_softplus), configs)


def selective_state_update(
    state_BEN: torch.Tensor,
    u_BE: torch.Tensor,
    delta_BE: torch.Tensor,
    A_EN: torch.Tensor,
    B_BN: torch.Tensor,
    C_BN: torch.Tensor,
    D_E: Optional[torch.Tensor] = None,
    z_BE: Optional[torch.Tensor] = None,
    delta_bias_E: Optional[torch.Tensor] = None,
    *,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """One token of the gated scan: advances state_BEN [batch, E, N] IN PLACE (one launch, no allocation but the
    output, so it can be captured in a CUDA graph) and returns y_BE in u's dtype. Inputs as `selective_scan` with
    the time axis removed; the state must have unit strides over (E, N) (any batch stride)."""
    if u_BE.dim() != 2:
        raise ValueError(f"selective_state_update wants u [B, E], got {tuple(u_BE.shape)}")
    _check("selective_state_update", u_BE, delta_BE, A_EN, B_BN, C_BN, D_E, z_BE, delta_bias_E, state_BEN,
           (u_BE.shape[0],))
    Bsz, E = u_BE.shape
    N = A_EN.shape[1]
    if state_BEN.stride(2) != 1 or state_BEN.stride(1) != N:
        raise ValueError("selective_state_update: state_BEN needs unit strides over (E, N) to be updated in place")
    args = [_last_unit(t) for t in (u_BE, delta_BE, A_EN, B_BN, C_BN, D_E, z_BE, delta_bias_E)]
    return _step_op(state_BEN, *args, bool(delta_softplus))


@torch.library.custom_op("seqmix_mamba::selective_state_update", mutates_args=("state_BEN",))
def _step_op(state_BEN: torch.Tensor, u: torch.Tensor, x: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor,
             Cm: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             softplus: bool) -> torch.Tensor:
    Bsz, E = u.shape
    N = A.shape[1]
    y = torch.empty(Bsz, E, device=u.device, dtype=u.dtype)
    BE = 64 if u.device.type == "cuda" else 32
    _state_update_kernel[(triton.cdiv(E, BE), Bsz)](
        state_BEN, u, x, z if z is not None else u, Bm, Cm, A, D if D is not None else A,
        bias if bias is not None else A, y, E, N, state_BEN.stride(0), u.stride(0), x.stride(0),
        z.stride(0) if z is not None else 0, Bm.stride(0), Cm.stride(0),
        NP=triton.next_power_of_2(N), BE=BE, SOFTPLUS=softplus, HAS_Z=z is not None,
        HAS_D=D is not None, HAS_BIAS=bias is not None, num_warps=2 if u.device.type == "cuda" else 1,
    )
    return y


@_step_op.register_fake
def _(state_BEN, u, x, A, Bm, Cm, D, z, bias, softplus):
    return u.new_empty(u.shape)
