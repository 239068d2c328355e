"""Based linear attention, reference twins: Taylor feature map, quadratic view, chunked O(T) view, recurrence.

Shapes: q_BTHF, k_BTHF [B, T, H, F] (feature dim F, 16 in the published models); v_BTHV [B, T, H, V];
expanded features E = 1 + F + F^2 (273 for F = 16). Recurrent state: kv_BHVE = sum_t v_t (x) phi(k_t) and
k_BHE = sum_t phi(k_t), both fp32. All math in fp32; outputs in v's dtype.

    phi(x) = [1, x / F^(1/4), vec(x x^T) / (sqrt(2) sqrt(F))]   so   phi(q).phi(k) = 1 + s + s^2/2, s = q.k/sqrt(F)
    o_i = sum_{j<=i} (phi(q_i).phi(k_j)) v_j / (sum_{j<=i} phi(q_i).phi(k_j) + eps)
"""
from typing import Optional

import torch

BasedState = tuple[torch.Tensor, torch.Tensor]  # (kv_BHVE fp32, k_BHE fp32)


def expanded_dim(feature_dim: int) -> int:
    return 1 + feature_dim + feature_dim * feature_dim


def taylor_feature_map(x_BTHF: torch.Tensor) -> torch.Tensor:
    """phi(x) [..., F] -> [..., 1 + F + F^2] in fp32 (second-order Taylor expansion of exp(q.k / sqrt(F)))."""
    x = x_BTHF.float()
    F = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) / (2**0.5 * F**0.5)
    return torch.cat([torch.ones_like(x[..., :1]), x / F**0.25, x2], dim=-1)


def based_quadratic_ref(
    q_BTHF: torch.Tensor, k_BTHF: torch.Tensor, v_BTHV: torch.Tensor, *, eps: float = 1e-12
) -> torch.Tensor:
    """O(T^2) view: scores 1 + s + s^2/2 with s = q.k/sqrt(F), causal, row-normalised. Returns o_BTHV."""
    F = q_BTHF.shape[-1]
    T = q_BTHF.shape[1]
    s_BHTT = torch.einsum("bihf,bjhf->bhij", q_BTHF.float(), k_BTHF.float()) / F**0.5
    a_BHTT = 1 + s_BHTT + 0.5 * s_BHTT * s_BHTT
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=q_BTHF.device).tril()
    a_BHTT = a_BHTT.masked_fill(~causal_TT, 0.0)
    num_BTHV = torch.einsum("bhij,bjhv->bihv", a_BHTT, v_BTHV.float())
    den_BTH = a_BHTT.sum(-1).transpose(1, 2)
    return (num_BTHV / (den_BTH[..., None] + eps)).to(v_BTHV.dtype)


def based_recurrent_ref(
    q_BTHF: torch.Tensor,
    k_BTHF: torch.Tensor,
    v_BTHV: torch.Tensor,
    *,
    initial_state: Optional[BasedState] = None,
    output_final_state: bool = False,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, Optional[BasedState]]:
    """Token-by-token recurrence (the definition of the decode step). Returns (o_BTHV, final state or None)."""
    B, T, H, F = q_BTHF.shape
    V = v_BTHV.shape[-1]
    state = _init_or_copy(initial_state, B, H, V, F, q_BTHF.device)
    outs = []
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_BTHF, k_BTHF, v_BTHV, *state))
    for t in range(T):
        if needs_grad:  # the step updates in place; a fresh copy per token keeps autograd's saved tensors intact
            state = (state[0].clone(), state[1].clone())
        outs.append(based_step_ref(q_BTHF[:, t], k_BTHF[:, t], v_BTHV[:, t], state, eps=eps))
    o_BTHV = torch.stack(outs, 1) if outs else v_BTHV.new_zeros(B, 0, H, V)
    return o_BTHV, (state if output_final_state else None)


def based_step_ref(
    q_BHF: torch.Tensor, k_BHF: torch.Tensor, v_BHV: torch.Tensor, state: BasedState, *, eps: float = 1e-12
) -> torch.Tensor:
    """One token: updates state = (kv_BHVE, k_BHE) IN PLACE (diagonal included), returns o_BHV."""
    kv_BHVE, ksum_BHE = state
    fq_BHE, fk_BHE = taylor_feature_map(q_BHF), taylor_feature_map(k_BHF)
    kv_BHVE.add_(v_BHV.float()[..., :, None] * fk_BHE[..., None, :])
    ksum_BHE.add_(fk_BHE)
    num_BHV = torch.einsum("bhve,bhe->bhv", kv_BHVE, fq_BHE)
    den_BH = (ksum_BHE * fq_BHE).sum(-1)
    return (num_BHV / (den_BH[..., None] + eps)).to(v_BHV.dtype)


def based_linear_ref(
    q_BTHF: torch.Tensor,
    k_BTHF: torch.Tensor,
    v_BTHV: torch.Tensor,
    *,
    initial_state: Optional[BasedState] = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    eps: float = 1e-12,
) -> tuple[torch.Tensor, Optional[BasedState]]:
    """Chunked O(T) view: inside a chunk the quadratic form, across chunks the carried (kv, k) state.

    Returns (o_BTHV, final state or None). The initial state is not modified.
    """
    B, T, H, F = q_BTHF.shape
    V = v_BTHV.shape[-1]
    kv_BHVE, ksum_BHE = _init_or_copy(initial_state, B, H, V, F, q_BTHF.device)
    outs = []
    for t0 in range(0, T, chunk_size):
        fq_BCHE = taylor_feature_map(q_BTHF[:, t0 : t0 + chunk_size])
        fk_BCHE = taylor_feature_map(k_BTHF[:, t0 : t0 + chunk_size])
        v_BCHV = v_BTHV[:, t0 : t0 + chunk_size].float()
        a_BHCC = torch.einsum("bihe,bjhe->bhij", fq_BCHE, fk_BCHE).tril()
        num_BCHV = torch.einsum("bhij,bjhv->bihv", a_BHCC, v_BCHV)
        num_BCHV = num_BCHV + torch.einsum("bhve,bihe->bihv", kv_BHVE, fq_BCHE)
        den_BCH = a_BHCC.sum(-1).transpose(1, 2) + torch.einsum("bhe,bihe->bih", ksum_BHE, fq_BCHE)
        outs.append(num_BCHV / (den_BCH[..., None] + eps))
        kv_BHVE = kv_BHVE + torch.einsum("bjhv,bjhe->bhve", v_BCHV, fk_BCHE)
        ksum_BHE = ksum_BHE + fk_BCHE.sum(1)
    o_BTHV = torch.cat(outs, 1).to(v_BTHV.dtype) if outs else v_BTHV.new_zeros(B, 0, H, V)
    return o_BTHV, ((kv_BHVE, ksum_BHE) if output_final_state else None)


def _init_or_copy(state: Optional[BasedState], B: int, H: int, V: int, F: int, device) -> BasedState:
    E = expanded_dim(F)
    if state is None:
        return (torch.zeros(B, H, V, E, device=device), torch.zeros(B, H, E, device=device))
    kv_BHVE, ksum_BHE = state
    if kv_BHVE.shape != (B, H, V, E) or ksum_BHE.shape != (B, H, E):
        raise ValueError(
            f"Based state must be kv [B, H, V, E]={[B, H, V, E]} and k [B, H, E]={[B, H, E]}, "
            f"got {list(kv_BHVE.shape)} and {list(ksum_BHE.shape)}"
        )
    return kv_BHVE.float().clone(), ksum_BHE.float().clone()
