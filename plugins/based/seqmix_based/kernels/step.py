"""Based decode step in Triton: one token for a whole batch, state updated in place (kernel + launcher + public).

Memory-bound: each (batch, head) program streams its fp32 state kv [V, E] once (read, add v (x) phi(k), write
back, dot with phi(q)) in [V, BE] tiles, and its k [E] likewise. phi(q) and phi(k) are computed per tile from
the F-vectors, never stored. No autograd (decode only), no host sync, no allocation besides the output: the
call can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from seqmix_kernels.backend import check_device


@triton.jit
def _phi(x, e, F: tl.constexpr, BF: tl.constexpr, INV_FEAT1, INV_FEAT2):
    """phi(x)[e] for a tile of expanded indices e: 1, x_a / F^(1/4), x_a x_b / sqrt(2F) (e = 1 + F + a F + b).
    x [BF] is in registers; x_a and x_b are picked by one-hot sums (no gathered loads)."""
    f = tl.arange(0, BF)
    lin = (e >= 1) & (e <= F)
    quad = (e > F) & (e < 1 + F + F * F)
    eq = tl.where(quad, e - 1 - F, 0)
    ia = tl.where(lin, e - 1, tl.where(quad, eq // F, -1))
    ib = tl.where(quad, eq % F, -1)
    xa = tl.sum(tl.where(ia[:, None] == f[None, :], x[None, :], 0.0), 1)
    xb = tl.sum(tl.where(ib[:, None] == f[None, :], x[None, :], 0.0), 1)
    return tl.where(e == 0, 1.0, tl.where(lin, xa * INV_FEAT1, xa * xb * INV_FEAT2))


@triton.jit
def _based_step_kernel(q_ptr, k_ptr, v_ptr, kv_ptr, z_ptr, o_ptr, eps, INV_FEAT1, INV_FEAT2,
                       F: tl.constexpr, V: tl.constexpr, BF: tl.constexpr, BVP: tl.constexpr, BE: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    E: tl.constexpr = 1 + F + F * F
    offs_v = tl.arange(0, BVP)
    m_v = offs_v < V
    v = tl.load(v_ptr + i_bh * V + offs_v, mask=m_v, other=0.0).to(tl.float32)
    f = tl.arange(0, BF)
    q = tl.load(q_ptr + i_bh * F + f, mask=f < F, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + i_bh * F + f, mask=f < F, other=0.0).to(tl.float32)
    num = tl.zeros([BVP], tl.float32)
    den = tl.zeros([BE], tl.float32)
    for e0 in tl.static_range(0, E, BE):
        e = e0 + tl.arange(0, BE)
        m_e = e < E
        phi_q = _phi(q, e, F, BF, INV_FEAT1, INV_FEAT2)
        phi_k = _phi(k, e, F, BF, INV_FEAT1, INV_FEAT2)
        z = tl.load(z_ptr + i_bh * E + e, mask=m_e, other=0.0) + phi_k
        tl.store(z_ptr + i_bh * E + e, z, mask=m_e)
        den += z * phi_q
        p_kv = kv_ptr + i_bh * (V * E) + offs_v[:, None] * E + e[None, :]
        m_kv = m_v[:, None] & m_e[None, :]
        kv = tl.load(p_kv, mask=m_kv, other=0.0) + v[:, None] * phi_k[None, :]
        tl.store(p_kv, kv, mask=m_kv)
        num += tl.sum(kv * phi_q[None, :], 1)
    o = num / (tl.sum(den, 0) + eps)
    tl.store(o_ptr + i_bh * V + offs_v, o.to(o_ptr.dtype.element_ty), mask=m_v)


def based_step(
    q_BHF: torch.Tensor,
    k_BHF: torch.Tensor,
    v_BHV: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    *,
    eps: float = 1e-12,
) -> torch.Tensor:
    """One decode token (the twin of `naive.based_step_ref`): updates state IN PLACE, returns o_BHV.

    q_BHF, k_BHF: [B, H, F]; v_BHV: [B, H, V]; state = (kv [B, H, V, E], k [B, H, E]), both fp32 and
    contiguous, E = 1 + F + F^2. The new token is added before it is read (the diagonal is included):
        kv += v (x) phi(k);  k += phi(k);  o = kv phi(q) / (k . phi(q) + eps)
    Returns o_BHV in v's dtype. Any F, any V <= 256; no host sync, so it is CUDA-graph safe.
    """
    kv_BHVE, k_BHE = state
    check_device("based_step", q_BHF, k_BHF, v_BHV, kv_BHVE, k_BHE)
    B, H, F = q_BHF.shape
    V = v_BHV.shape[-1]
    E = 1 + F + F * F
    if (k_BHF.shape != q_BHF.shape or v_BHV.shape[:2] != (B, H) or kv_BHVE.shape != (B, H, V, E)
            or k_BHE.shape != (B, H, E)):
        raise ValueError(f"based_step wants q, k [B, H, F], v [B, H, V], state (kv [B, H, V, E], k [B, H, E]) with "
                         f"E = 1 + F + F^2; got q {list(q_BHF.shape)}, k {list(k_BHF.shape)}, v {list(v_BHV.shape)}, "
                         f"kv {list(kv_BHVE.shape)}, k-state {list(k_BHE.shape)}")
    if kv_BHVE.dtype != torch.float32 or k_BHE.dtype != torch.float32:
        raise TypeError(f"the Based state must be fp32, got {kv_BHVE.dtype} and {k_BHE.dtype}")
    if not (kv_BHVE.is_contiguous() and k_BHE.is_contiguous()):
        raise ValueError("based_step updates the state in place and needs it contiguous (allocate it with "
                         "init_state, or .contiguous() it once before decoding)")
    o_BHV = torch.empty_like(v_BHV)
    bvp = max(16, triton.next_power_of_2(V))
    _based_step_kernel[(B * H,)](
        q_BHF.contiguous(), k_BHF.contiguous(), v_BHV.contiguous(), kv_BHVE, k_BHE, o_BHV, eps,
        F**-0.25, (2.0 * F) ** -0.5, F=F, V=V, BF=triton.next_power_of_2(F), BVP=bvp, BE=max(16, 4096 // bvp),
        num_warps=4,
    )
    return o_BHV
