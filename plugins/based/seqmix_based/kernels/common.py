"""Shared pieces of the Based Triton kernels: launch configs, dot dtypes and the state <-> register helpers.

Inside the kernels the state is kept "raw", without the feature map's constants, split by feature order:
    S0 [BV]        = sum_t v_t                    z0          = number of tokens
    S1 [BF, BV]    = sum_t k_t (x) v_t            z1 [BF]     = sum_t k_t
    S2 [BF*BF, BV] = sum_t vec(k_t k_t^T) (x) v_t z2 [BF, BF] = sum_t k_t k_t^T
so phi(q).phi(k) = 1 + q.k / sqrt(F) + (q.k)^2 / (2F) becomes  num = S0 + q.S1 / sqrt(F) + vec(q q^T).S2 / (2F).
The public state (the reference's layout, E = 1 + F + F^2) is kv [B, H, V, E] and k [B, H, E] with the
constants folded in: kv[..., 1 + a] = S1[a] / F^(1/4), kv[..., 1 + F + a F + b] = S2[a BF + b] / sqrt(2F).
BF pads F to a power of two >= 16 (tl.dot needs K >= 16); BV is a block of V. Padding lanes are masked to 0.
S2 is held as two halves by its first feature index (a < BF/2, a >= BF/2): a [C, BF*BF] feature tile as a dot
operand spills registers at C = 64, two [C, BF*BF/2] ones do not. The chunk-state buffers (one slot per chunk)
hold the same raw state as rows [S2 (BF*BF), S1 (BF), S0 (1)] x V, and z as [z2, z1, z0].
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class KernelConfig(NamedTuple):
    """Launch parameters of one kernel: chunk length, V block, warps, software-pipeline stages, and for the
    chunk-parallel kernels how many consecutive chunks one program walks (so the next chunk's loads, its
    state among them, overlap this chunk's math)."""

    chunk: int
    block_v: int
    num_warps: int
    num_stages: int = 1
    chunks_per_program: int = 1


def block_f(F: int) -> int:
    """F padded to a power of two, at least 16 (the smallest K of tl.dot)."""
    return max(16, triton.next_power_of_2(F))


PARALLEL_MAX_T = 2048
"""Without states in or out, `based_attn` takes the quadratic form up to this length (measured crossover)."""


def default_config(F: int, V: int, dtype: torch.dtype, phase: str) -> KernelConfig:
    """Launch config of one kernel. Chunked form: "state" (the forward's state scan; its chunk is everyone's),
    "out" (forward outputs), "dstate" (the backward's reverse scan), "dq", "dkv". Quadratic form: "pfwd", "pdq",
    "pdkv" (chunk = rows per program, block_v = rows per inner step).

    bf16 with F <= 16 is the fast path: at V = 64 the configs kernels/bench/bench_based.py --autotune picked
    on an H200 (kernels/bench/results/); at other V, ones sized by the compiler's resource report (no spills on
    sm_90). fp16 and fp32 run their dots on fp32 operands (twice the registers) and F = 24 pads to 32 features
    (1024 quadratic ones), so those take smaller tiles.
    """
    bv_full = max(16, triton.next_power_of_2(V))
    fast = block_f(F) == 16 and dtype == torch.bfloat16
    if phase.startswith("p"):
        if not fast:
            return KernelConfig(64, 32, 4, 2)
        return KernelConfig(64, 64, 4, 3) if phase == "pdkv" and V == 64 else KernelConfig(128, 64, 8, 3)
    if fast and V == 64:
        return {"state": KernelConfig(128, min(bv_full, 32), 8, 2), "out": KernelConfig(128, bv_full, 8, 2, 2),
                "dstate": KernelConfig(128, 16, 8, 2)}.get(phase, KernelConfig(128, bv_full, 8, 2, 2))
    chunk = 64 if fast else (32 if block_f(F) == 16 or dtype == torch.bfloat16 else 16)
    if phase == "state":
        return KernelConfig(chunk, min(bv_full, 32 if fast else 16), 4)
    if phase == "dstate":
        return KernelConfig(chunk, 16, 4)
    if phase == "out":
        return KernelConfig(chunk, min(bv_full, 64 if fast else 32), 4)
    if fast:  # dq, dkv: all of V in one block; 8 warps at V = 128, where 4 spill
        return KernelConfig(chunk, bv_full, 4 if bv_full <= 64 else 8)
    return KernelConfig(chunk, min(bv_full, 32 if block_f(F) == 16 else 16), 4)


def dot_dtype(x: torch.Tensor) -> tuple[tl.dtype, str, str]:
    """(operand dtype of tl.dot, its input precision, the precision of the small fp32 dots against z).

    bf16 runs on bf16 tensor cores. fp16 runs its dots on fp32 operands in tf32: the state grows with T and
    would overflow fp16's 65504. fp32 uses tf32x3 (three tf32 products, about fp32's accuracy) on tensor cores.
    The dots against the key sums z use tf32 in the half-precision paths (2^-11 relative, below bf16's 2^-8).
    Under the Triton interpreter (CPU tensors) everything is exact fp32: numpy has no bf16 matmul.
    """
    if x.device.type != "cuda":
        return tl.float32, "ieee", "ieee"
    if x.dtype == torch.float32:
        return tl.float32, "tf32x3", "tf32x3"
    return (tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float32), "tf32", "tf32"


def scales(F: int) -> dict:
    """The feature map's constants: score scale, quadratic scale, and raw <-> public state factors."""
    return dict(SCALE1=F**-0.5, SCALE2=0.5 / F, FEAT1=F**0.25, FEAT2=(2.0 * F) ** 0.5)


@triton.jit
def outer_rows(xh, x, C: tl.constexpr, HB: tl.constexpr, BF: tl.constexpr):
    """xh [C, HB] (half of the features), x [C, BF] -> [C, HB*BF]: row i = vec(xh_i x_i^T)."""
    return tl.reshape(xh[:, :, None] * x[:, None, :], (C, HB * BF))


@triton.jit
def outer_cols(xht, xt, HB: tl.constexpr, BF: tl.constexpr, C: tl.constexpr):
    """xht [HB, C], xt [BF, C] -> [HB*BF, C]: column j = vec(xh_j x_j^T)."""
    return tl.reshape(xht[:, None, :] * xt[None, :, :], (HB * BF, C))


@triton.jit
def contract(w, x, C: tl.constexpr, HB: tl.constexpr, BF: tl.constexpr):
    """w [C, HB*BF] (row i = a half of a symmetric BF x BF matrix W_i), x [C, BF] -> [C, HB]: W_i x_i."""
    return tl.sum(tl.reshape(w, (C, HB, BF)) * x[:, None, :], 2)


@triton.jit
def cat_halves(a, b, C: tl.constexpr, HB: tl.constexpr):
    """[C, HB], [C, HB] -> [C, 2*HB], a first."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (C, 2 * HB))


@triton.jit
def load_rows(base, t0, T, stride, col0, ncols, C: tl.constexpr, W: tl.constexpr, DT: tl.constexpr):
    """Tile [C, W] of rows t0.. and columns col0.. of a [T, stride] view, zero outside T and ncols."""
    r = t0 + tl.arange(0, C)
    c = col0 + tl.arange(0, W)
    x = tl.load(base + r[:, None] * stride + c[None, :], mask=(r < T)[:, None] & (c < ncols)[None, :], other=0.0)
    return x.to(DT)


@triton.jit
def load_cols(base, t0, T, stride, col0, ncols, C: tl.constexpr, W: tl.constexpr, DT: tl.constexpr):
    """The transpose of load_rows: tile [W, C]."""
    r = t0 + tl.arange(0, C)
    c = col0 + tl.arange(0, W)
    x = tl.load(base + c[:, None] + r[None, :] * stride, mask=(c < ncols)[:, None] & (r < T)[None, :], other=0.0)
    return x.to(DT)


@triton.jit
def _s2_half_offsets(a0, F: tl.constexpr, HB: tl.constexpr, BF: tl.constexpr, TRANSPOSE: tl.constexpr):
    e = tl.arange(0, HB * BF)
    a, b = a0 + e // BF, e % BF
    if TRANSPOSE:
        return 1 + F + b * F + a, (a < F) & (b < F)
    return 1 + F + a * F + b, (a < F) & (b < F)


@triton.jit
def _load_s2_half(kv, m_v, a0, F: tl.constexpr, HB: tl.constexpr, BF: tl.constexpr, SYM: tl.constexpr):
    e, m = _s2_half_offsets(a0, F, HB, BF, False)
    x = tl.load(kv[None, :] + e[:, None], mask=m[:, None] & m_v[None, :], other=0.0)
    if SYM:
        e, m = _s2_half_offsets(a0, F, HB, BF, True)
        x = 0.5 * (x + tl.load(kv[None, :] + e[:, None], mask=m[:, None] & m_v[None, :], other=0.0))
    return x


@triton.jit
def load_state(kv_ptr, z_ptr, i_bh, offs_v, FEAT1, FEAT2, load_z,
               F: tl.constexpr, V: tl.constexpr, BF: tl.constexpr, HB: tl.constexpr, SYM: tl.constexpr):
    """Public (kv_BHVE, k_BHE) of head i_bh, V block offs_v -> raw (S0, S1, S2 rows a < HB, S2 rows a >= HB,
    z0, z1, z2) in fp32. Where load_z is false the z parts are zeros (the backward gives z to one V block).
    SYM averages the quadratic parts with their transposes (F x F): the values phi(q).state are unchanged and
    the backward may then use d(q^T W q)/dq = 2 W q, which needs W symmetric."""
    E: tl.constexpr = 1 + F + F * F
    f = tl.arange(0, BF)
    m_f = f < F
    m_v = offs_v < V
    kv = kv_ptr + i_bh.to(tl.int64) * (V * E) + offs_v * E
    s0 = tl.load(kv, mask=m_v, other=0.0)
    s1 = tl.load(kv[None, :] + 1 + f[:, None], mask=m_f[:, None] & m_v[None, :], other=0.0) * FEAT1
    s2a = _load_s2_half(kv, m_v, 0, F, HB, BF, SYM) * FEAT2
    s2b = _load_s2_half(kv, m_v, HB, F, HB, BF, SYM) * FEAT2
    z = z_ptr + i_bh.to(tl.int64) * E
    zs = load_z.to(tl.float32)
    z0 = tl.load(z) * zs
    z1 = tl.load(z + 1 + f, mask=m_f, other=0.0) * (FEAT1 * zs)
    m_ff = m_f[:, None] & m_f[None, :]
    z2 = tl.load(z + 1 + F + f[:, None] * F + f[None, :], mask=m_ff, other=0.0)
    if SYM:
        z2 = 0.5 * (z2 + tl.load(z + 1 + F + f[:, None] + f[None, :] * F, mask=m_ff, other=0.0))
    return s0, s1, s2a, s2b, z0, z1, z2 * (FEAT2 * zs)


@triton.jit
def store_state(kv_ptr, z_ptr, i_bh, offs_v, s0, s1, s2a, s2b, z0, z1, z2, FEAT1, FEAT2, store_z,
                F: tl.constexpr, V: tl.constexpr, BF: tl.constexpr, HB: tl.constexpr):
    """Raw state -> public (kv_BHVE, k_BHE); the inverse of load_state. z is written where store_z."""
    E: tl.constexpr = 1 + F + F * F
    f = tl.arange(0, BF)
    m_f = f < F
    m_v = offs_v < V
    kv = kv_ptr + i_bh.to(tl.int64) * (V * E) + offs_v * E
    tl.store(kv, s0, mask=m_v)
    tl.store(kv[None, :] + 1 + f[:, None], s1 / FEAT1, mask=m_f[:, None] & m_v[None, :])
    e, m = _s2_half_offsets(0, F, HB, BF, False)
    tl.store(kv[None, :] + e[:, None], s2a / FEAT2, mask=m[:, None] & m_v[None, :])
    e, m = _s2_half_offsets(HB, F, HB, BF, False)
    tl.store(kv[None, :] + e[:, None], s2b / FEAT2, mask=m[:, None] & m_v[None, :])
    if store_z:
        z = z_ptr + i_bh.to(tl.int64) * E
        tl.store(z, z0)
        tl.store(z + 1 + f, z1 / FEAT1, mask=m_f)
        tl.store(z + 1 + F + f[:, None] * F + f[None, :], z2 / FEAT2, mask=m_f[:, None] & m_f[None, :])


@triton.jit
def store_chunk_state(h, zc, offs_v, s0, s1, s2a, s2b, z0, z1, z2, store_z,
                      V: tl.constexpr, BF: tl.constexpr, HB: tl.constexpr):
    """Raw state -> one chunk's slot of the state buffers: h [R, V] rows (S2 by halves, S1, S0), zc [R] (z2, z1, z0),
    R = BF*BF + BF + 1. h takes the dot operand dtype; zc is fp32 and written where store_z."""
    e = tl.arange(0, HB * BF)
    f = tl.arange(0, BF)
    m = (offs_v < V)[None, :]
    dt = h.dtype.element_ty
    tl.store(h + e[:, None] * V + offs_v[None, :], s2a.to(dt), mask=m)
    tl.store(h + (HB * BF + e)[:, None] * V + offs_v[None, :], s2b.to(dt), mask=m)
    tl.store(h + (BF * BF + f)[:, None] * V + offs_v[None, :], s1.to(dt), mask=m)
    tl.store(h + (BF * BF + BF) * V + offs_v, s0.to(dt), mask=offs_v < V)
    if store_z:
        tl.store(zc + f[:, None] * BF + f[None, :], z2)
        tl.store(zc + BF * BF + f, z1)
        tl.store(zc + BF * BF + BF, z0)


@triton.jit
def load_chunk_state(h, zc, offs_v, V: tl.constexpr, BF: tl.constexpr, HB: tl.constexpr, DT: tl.constexpr):
    """The inverse of store_chunk_state: (S0, S1, S2 halves) in DT, (z0, z1, z2) in fp32."""
    e = tl.arange(0, HB * BF)
    f = tl.arange(0, BF)
    m = (offs_v < V)[None, :]
    s2a = tl.load(h + e[:, None] * V + offs_v[None, :], mask=m, other=0.0).to(DT)
    s2b = tl.load(h + (HB * BF + e)[:, None] * V + offs_v[None, :], mask=m, other=0.0).to(DT)
    s1 = tl.load(h + (BF * BF + f)[:, None] * V + offs_v[None, :], mask=m, other=0.0).to(DT)
    s0 = tl.load(h + (BF * BF + BF) * V + offs_v, mask=offs_v < V, other=0.0).to(tl.float32)
    z2 = tl.load(zc + f[:, None] * BF + f[None, :])
    z1 = tl.load(zc + BF * BF + f)
    z0 = tl.load(zc + BF * BF + BF)
    return s0, s1, s2a, s2b, z0, z1, z2
