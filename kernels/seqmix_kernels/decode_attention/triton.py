"""Decode attention on Triton (flash-decoding): one query per sequence, the KV cache read once up to its own length.

    o[b, h] = softmax(q[b, h] . k[b, :L_b, h // G]^T * scale) v[b, :L_b, h // G]      (G = H / K query heads per kv head)

  split    one program per (sequence, kv head, split): the G query heads of a kv head share each K/V tile (grouped
           heads are read once, never expanded); sequence b's L_b rows are cut into NS equal splits at run time
           (L_b is read on the device, so the launch is the same for every step and can sit in a CUDA graph, and
           rows past L_b are never read); online softmax in base 2; partial (acc, max, sum) per split.
  reduce   one program per (sequence, head) rescales and sums the NS partials (skipped when NS = 1: the split
           kernel then normalises and writes o itself).
NS is chosen from the static shapes (batch x kv heads against the SM count), so short batches still fill the GPU.
Head dims up to 256 (padded to a power of two >= 16: 64, 70, 112 and 128 are the sizes that matter).
Twin: `seqmix_kernels.decode_attention.naive.decode_attention_ref` (same signature).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from seqmix_kernels.backend import check_device

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, o_ptr, acc_ptr, m_ptr, l_ptr,
    H, G, qk_scale,
    sqb, sqh, skb, sks, skh, svb, svs, svh, sob, soh,
    D: tl.constexpr, DK: tl.constexpr, VEC8: tl.constexpr,
    NS: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
    DOT: tl.constexpr,
):
    i_b, i_k, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    L = tl.load(len_ptr + i_b).to(tl.int32)
    split = tl.cdiv(tl.cdiv(L, NS), BN) * BN  # rows per split, whole key blocks
    start = i_s * split
    end = tl.minimum(start + split, L)
    g, d = tl.arange(0, BG), tl.arange(0, BD)
    h = i_k * G + g
    gm, dm = g < G, d < D
    km = d < DK  # cache rows may be padded past D (to a multiple of 8): the pad is read, q's pad is zero
    if VEC8:  # every stride is a multiple of 8 (the launcher checked): written so the compiler sees it too, so
        # rows start on 16-byte boundaries and the loads use 16-byte vectors
        skb, sks, skh = (skb // 8) * 8, (sks // 8) * 8, (skh // 8) * 8
        svb, svs, svh = (svb // 8) * 8, (svs // 8) * 8, (svh // 8) * 8
    q = tl.load(q_ptr + i_b.to(tl.int64) * sqb + h[:, None] * sqh + d[None, :], mask=gm[:, None] & dm[None, :],
                other=0.0)
    q = q.to(tl.float32) * qk_scale  # scale and log2(e) folded into q
    if DOT:  # tensor-core dots with the group's rows padded to BG >= 16
        q = q.to(k_ptr.dtype.element_ty)
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, BD], tl.float32)
    k_row = k_ptr + i_b.to(tl.int64) * skb + i_k * skh
    v_row = v_ptr + i_b.to(tl.int64) * svb + i_k * svh
    for n0 in range(start, end, BN):
        n = n0 + tl.arange(0, BN)
        nm = n < end
        kv_m = nm[:, None] & km[None, :]
        k = tl.load(k_row + n[:, None].to(tl.int64) * sks + d[None, :], mask=kv_m, other=0.0)
        if not DOT:  # fp32 products and sums in registers (BG = the group size, no padding to 16)
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], 2)
        elif IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(nm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_row + n[:, None].to(tl.int64) * svs + d[None, :], mask=kv_m, other=0.0)
        if not DOT:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
        elif IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out_m = gm[:, None] & dm[None, :]
    if NS == 1:
        o = acc / l_i[:, None]
        tl.store(o_ptr + i_b.to(tl.int64) * sob + h[:, None] * soh + d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=out_m)
    else:
        part = (i_b.to(tl.int64) * H + h) * NS + i_s  # [BG] rows of the [B, H, NS] partials
        tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=out_m)
        tl.store(m_ptr + part, m_i, mask=gm)
        tl.store(l_ptr + part, l_i, mask=gm)


@triton.jit
def _decode_reduce_kernel(acc_ptr, m_ptr, l_ptr, o_ptr, H, sob, soh,
                          D: tl.constexpr, NS: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    s, d = tl.arange(0, BS), tl.arange(0, BD)
    sm, dm = s < NS, d < D
    part = (i_b.to(tl.int64) * H + i_h) * NS + s
    m = tl.load(m_ptr + part, mask=sm, other=float("-inf"))
    l = tl.load(l_ptr + part, mask=sm, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)  # empty splits (start >= L) weigh nothing
    acc = tl.load(acc_ptr + part[:, None] * D + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(o_ptr + i_b.to(tl.int64) * sob + i_h * soh + d, o.to(o_ptr.dtype.element_ty), mask=dm)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(B: int, K: int, S: int, device: torch.device, block_n: int) -> int:
    """Splits per (sequence, kv head): enough programs for two waves over the SMs, at most one per key block."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, B * K), triton.cdiv(S, block_n), 64))


def _aligned8(t: torch.Tensor) -> bool:
    """Every row of t's last dim starts on a 16-byte boundary and holds a whole number of 8-element vectors."""
    return (t.element_size() == 2 and t.shape[-1] % 8 == 0 and t.data_ptr() % 16 == 0
            and all(st % 8 == 0 for st in t.stride()[:-1]))


def decode_attention_fwd(q_BHD, k_BSKD, v_BSKD, len_B, scale: float, dot: bool = True) -> torch.Tensor:
    """Launch: o [B, H, D] in q's dtype (fresh, contiguous). dot=False computes q.k and p.v with fp32 products and
    sums instead of tensor-core dots over a group padded to 16 rows (a variant for the bench; the default is the
    measured one)."""
    B, H, D = q_BHD.shape
    S, K, DK = k_BSKD.shape[1], k_BSKD.shape[2], k_BSKD.shape[3]
    G = H // K
    BD = max(16, triton.next_power_of_2(DK))
    BG = max(16, triton.next_power_of_2(G)) if dot else triton.next_power_of_2(G)
    BN = (64 if BD <= 128 else 32) if dot else 32
    NS = num_splits(B, K, S, q_BHD.device, BN)
    o = torch.empty(B, H, D, device=q_BHD.device, dtype=q_BHD.dtype)
    if NS > 1:
        acc = torch.empty(B, H, NS, D, device=q_BHD.device, dtype=torch.float32)
        m = torch.empty(B, H, NS, device=q_BHD.device, dtype=torch.float32)
        l = torch.empty(B, H, NS, device=q_BHD.device, dtype=torch.float32)
    else:
        acc = m = l = o  # unused
    on_gpu = q_BHD.device.type == "cuda"
    _decode_split_kernel[(B, K, NS)](
        q_BHD, k_BSKD, v_BSKD, len_B, o, acc, m, l, H, G, scale * LOG2E,
        q_BHD.stride(0), q_BHD.stride(1), k_BSKD.stride(0), k_BSKD.stride(1), k_BSKD.stride(2),
        v_BSKD.stride(0), v_BSKD.stride(1), v_BSKD.stride(2), o.stride(0), o.stride(1),
        D=D, DK=DK, VEC8=_aligned8(k_BSKD) and _aligned8(v_BSKD), NS=NS, BG=BG, BD=BD, BN=BN,
        IEEE=k_BSKD.dtype == torch.float32, DOT=dot,
        num_warps=4 if on_gpu else 1, num_stages=2 if on_gpu else 1,
    )
    if NS > 1:
        _decode_reduce_kernel[(B, H)](acc, m, l, o, H, o.stride(0), o.stride(1),
                                      D=D, NS=NS, BS=max(2, triton.next_power_of_2(NS)), BD=BD,
                                      num_warps=4 if on_gpu else 1)
    return o


# The launch as a torch.library custom op (opaque to torch.compile: a compiled decode step keeps it as one node).
@torch.library.custom_op("seqmix_kernels::decode_attention", mutates_args=())
def _decode_op(q_BHD: torch.Tensor, k_BSKD: torch.Tensor, v_BSKD: torch.Tensor, len_B: torch.Tensor,
               scale: float) -> torch.Tensor:
    return decode_attention_fwd(q_BHD, k_BSKD, v_BSKD, len_B, scale)


@_decode_op.register_fake
def _(q_BHD, k_BSKD, v_BSKD, len_B, scale):
    return q_BHD.new_empty(q_BHD.shape)


def decode_attention(q_BHD: torch.Tensor, k_BSKD: torch.Tensor, v_BSKD: torch.Tensor, len_B: torch.Tensor,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Softmax attention of one query per sequence over the first len_B[b] rows of its KV cache (no grad).

    q_BHD [B, H, D]: the new token's queries (RoPE applied); k_BSKD, v_BSKD [B, S, K, Dc]: the cache (keys after
    RoPE), K dividing H (query head h reads kv head h // (H / K)), Dc >= D: columns past D are padding (they must
    be finite; a head dim of 70 stored in rows of 72 lets 16-bit loads use 16-byte vectors); any strides over
    B, S, K (and B, H of q), unit stride over the last dim. len_B [B] (int32/int64, on the device): valid rows per sequence, each in [1, S] (not
    checked: the step runs inside CUDA graphs). scale: default 1/sqrt(D). Returns o [B, H, D] in q's dtype.
    The cache may be fp32 (q is cast to it) or fp16/bf16 (fp32 accumulation either way).
    """
    B, H, D = q_BHD.shape
    if k_BSKD.shape != v_BSKD.shape or k_BSKD.shape[0] != B or k_BSKD.shape[3] < D or H % k_BSKD.shape[2]:
        raise ValueError(f"decode_attention: q {tuple(q_BHD.shape)} [B, H, D] and k/v {tuple(k_BSKD.shape)} / "
                         f"{tuple(v_BSKD.shape)} [B, S, K, Dc] do not match (same B, Dc >= D, K dividing H)")
    if k_BSKD.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"decode_attention supports head dims up to {MAX_HEAD_DIM}, got {k_BSKD.shape[3]}")
    check_device("decode_attention", q_BHD, k_BSKD, v_BSKD, len_B)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_BHD, k_BSKD, v_BSKD))
    return _decode_op(q, k, v, len_B, 1.0 / math.sqrt(D) if scale is None else float(scale))
