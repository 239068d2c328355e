"""Pure-PyTorch selective scan of Mamba-1: the sequential definition, a chunked form, and a one-token step.

Notation (B batch, T time, E channels = expand * d_model, N = d_state), per channel e and state index n:

    h_t[e, n] = exp(dt_t[e] * A[e, n]) * h_{t-1}[e, n] + dt_t[e] * B_t[n] * u_t[e]
    y_t[e]    = sum_n C_t[n] * h_t[e, n] + D[e] * u_t[e]

`dt` is the step size AFTER softplus (and after adding the dt bias); A = -exp(A_log) is negative, so every
decay exp(dt * A) lies in (0, 1]. All math runs in fp32 whatever the input dtype (fp64 inputs stay fp64,
for tests); y comes back in u's dtype, the state in the compute dtype.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _scan_inputs(u_BTE, dt_BTE, A_EN, B_BTN, C_BTN, D_E, initial_state_BEN):
    """Checks shapes and returns the operands in the compute dtype (fp32, or fp64 if u is fp64)."""
    Bsz, T, E = u_BTE.shape
    N = A_EN.shape[-1]
    expected = {"dt_BTE": (Bsz, T, E), "A_EN": (E, N), "B_BTN": (Bsz, T, N), "C_BTN": (Bsz, T, N), "D_E": (E,)}
    for name, t in zip(expected, (dt_BTE, A_EN, B_BTN, C_BTN, D_E)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {expected[name]} for u_BTE "
                             f"{tuple(u_BTE.shape)} and A_EN with d_state {N}")
    dtype = torch.promote_types(u_BTE.dtype, torch.float32)
    if initial_state_BEN is None:
        h_BEN = u_BTE.new_zeros(Bsz, E, N, dtype=dtype)
    elif tuple(initial_state_BEN.shape) != (Bsz, E, N):
        raise ValueError(f"initial_state_BEN has shape {tuple(initial_state_BEN.shape)}; expected {(Bsz, E, N)}")
    else:
        h_BEN = initial_state_BEN.to(dtype)
    f = [t.to(dtype) for t in (u_BTE, dt_BTE, A_EN, B_BTN, C_BTN, D_E)]
    return (*f, h_BEN)


def selective_scan_ref(
    u_BTE: torch.Tensor,
    dt_BTE: torch.Tensor,
    A_EN: torch.Tensor,
    B_BTN: torch.Tensor,
    C_BTN: torch.Tensor,
    D_E: torch.Tensor,
    *,
    initial_state_BEN: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The readable definition: one time step at a time.

    u_BTE: input [B, T, E]; dt_BTE: positive step sizes [B, T, E]; A_EN: negative decay rates [E, N];
    B_BTN, C_BTN: input/output projections of the state [B, T, N]; D_E: skip [E];
    initial_state_BEN: carried state [B, E, N] or None for zeros (not modified).
    Returns (y_BTE in u's dtype, final_BEN in fp32 (fp64 for fp64 inputs)).
    """
    u, dt, A, Bm, Cm, D, h_BEN = _scan_inputs(u_BTE, dt_BTE, A_EN, B_BTN, C_BTN, D_E, initial_state_BEN)
    ys = []
    for t in range(u.shape[1]):
        decay_BEN = torch.exp(dt[:, t, :, None] * A)
        h_BEN = decay_BEN * h_BEN + (dt[:, t] * u[:, t])[:, :, None] * Bm[:, t, None, :]
        ys.append((h_BEN * Cm[:, t, None, :]).sum(-1))  # [B, E]
    y_BTE = torch.stack(ys, 1) if ys else u.new_zeros(u.shape)
    return (y_BTE + D * u).to(u_BTE.dtype), h_BEN


def _segsum(x_XL: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L] with out[..., t, s] = x_{s+1} + ... + x_t for s < t, and 0 for s >= t.

    Each entry is summed directly (a cumulative sum over a strictly-lower-triangular copy) rather than
    taken as cumsum_t - cumsum_s, which cancels catastrophically once the sums reach hundreds (1e-5 relative
    error in fp32 instead of 1e-7). The upper triangle is 0, not -inf, so that scaling by a negative A
    keeps every exponent <= 0; the caller zeroes it after exp (the backward then sees exp(0) * 0, never inf).
    """
    L = x_XL.shape[-1]
    x_XLL = torch.tril(x_XL[..., :, None].expand(*x_XL.shape, L), diagonal=-1)  # [.., t, s] = x_t if t > s
    return torch.cumsum(x_XLL, dim=-2)


def selective_scan_chunked(
    u_BTE: torch.Tensor,
    dt_BTE: torch.Tensor,
    A_EN: torch.Tensor,
    B_BTN: torch.Tensor,
    C_BTN: torch.Tensor,
    D_E: torch.Tensor,
    *,
    initial_state_BEN: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `selective_scan_ref`, computed chunk by chunk in a masked matrix form.

    Within a chunk of L steps the log-decay from step s to step t is A * (dt_{s+1} + ... + dt_t) <= 0, so
        h_t = exp(A * (dt_1 + ... + dt_t)) * h_0 + sum_{s <= t} exp(A * (dt_{s+1} + ... + dt_t)) * dt_s * B_s * u_s:
    every state of the chunk comes from one masked [L, L] decay matrix per (batch, channel, state index),
    and the last one is carried into the next chunk. Every exponent is <= 0 (the masked entries are 0
    before exp and zeroed after), so it is stable for any dt * A. The segment sums of dt are shared by
    all N state indices, as A is constant in time.
    Memory: O(B * E * N * L^2) per chunk (the decay matrix), vs O(B * E * N) for the sequential form. When a
    gradient is needed each chunk is recomputed in the backward (activation checkpointing), so autograd keeps
    only the chunk inputs and the carried [B, E, N] states, not the decay matrices of every chunk.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    u, dt, A, Bm, Cm, D, h_BEN = _scan_inputs(u_BTE, dt_BTE, A_EN, B_BTN, C_BTN, D_E, initial_state_BEN)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, dt, A, Bm, Cm, h_BEN))
    ys = []
    for c0 in range(0, u.shape[1], chunk_size):
        args = (u[:, c0:c0 + chunk_size], dt[:, c0:c0 + chunk_size], A, Bm[:, c0:c0 + chunk_size],
                Cm[:, c0:c0 + chunk_size], h_BEN)
        y_BLE, h_BEN = checkpoint(_scan_chunk, *args, use_reentrant=False) if grad else _scan_chunk(*args)
        ys.append(y_BLE)
    y_BTE = torch.cat(ys, 1) if ys else u.new_zeros(u.shape)
    return (y_BTE + D * u).to(u_BTE.dtype), h_BEN.contiguous()


def _scan_chunk(u_BLE, dt_BLE, A_EN, B_BLN, C_BLN, h_BEN):
    """One chunk of selective_scan_chunked: (y_BLE without the D skip, the state after its last step)."""
    dt_BEL = dt_BLE.transpose(1, 2)
    # [b, e, n, t, s]: decay from step s to step t; exp(0) = 1 above the diagonal, zeroed by tril
    decay_BENLL = torch.tril(torch.exp(A_EN[None, :, :, None, None] * _segsum(dt_BEL)[:, :, None]))
    decay_from_start_BENL = torch.exp(A_EN[None, :, :, None] * torch.cumsum(dt_BEL, -1)[:, :, None])
    xin_BENL = torch.einsum("ble,bln->benl", dt_BLE * u_BLE, B_BLN)  # dt_s * B_s * u_s
    h_BENL = torch.einsum("bents,bens->bent", decay_BENLL, xin_BENL) + decay_from_start_BENL * h_BEN[..., None]
    return torch.einsum("bent,btn->bte", h_BENL, C_BLN), h_BENL[..., -1]


def selective_state_step_ref(
    state_BEN: torch.Tensor,
    u_BE: torch.Tensor,
    dt_BE: torch.Tensor,
    A_EN: torch.Tensor,
    B_BN: torch.Tensor,
    C_BN: torch.Tensor,
    D_E: torch.Tensor,
) -> torch.Tensor:
    """One token: advances state_BEN [B, E, N] IN PLACE and returns y_BE in u's dtype.

    u_BE, dt_BE: [B, E] (dt after softplus); A_EN [E, N]; B_BN, C_BN [B, N]; D_E [E]. The math runs in the
    state's dtype (fp32 in the mixer).
    """
    f = state_BEN.dtype
    u, dt = u_BE.to(f), dt_BE.to(f)
    decay_BEN = torch.exp(dt[:, :, None] * A_EN.to(f))
    state_BEN.copy_(decay_BEN * state_BEN + (dt * u)[:, :, None] * B_BN.to(f)[:, None, :])
    y_BE = (state_BEN * C_BN.to(f)[:, None, :]).sum(-1) + D_E.to(f) * u
    return y_BE.to(u_BE.dtype)


def selective_scan_fused_ref(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin of `seqmix_mamba.kernel.selective_scan` (same signature), on `selective_scan_ref`:
    dt = softplus(delta + delta_bias) in fp32, y = scan(u, dt, A, B, C, D) * silu(z).
    Returns (y_BTE in u's dtype, final state [B, E, N] in the compute dtype)."""
    f = torch.promote_types(u_BTE.dtype, torch.float32)
    dt_BTE = delta_BTE.to(f) + (0 if delta_bias_E is None else delta_bias_E.to(f))
    if delta_softplus:
        dt_BTE = F.softplus(dt_BTE)
    D_E = torch.zeros(u_BTE.shape[-1], dtype=f, device=u_BTE.device) if D_E is None else D_E
    y_BTE, h_BEN = selective_scan_ref(u_BTE.to(f), dt_BTE, A_EN, B_BTN, C_BTN, D_E,
                                      initial_state_BEN=initial_state_BEN)
    if z_BTE is not None:
        y_BTE = y_BTE * F.silu(z_BTE.to(f))
    return y_BTE.to(u_BTE.dtype), h_BEN


def selective_state_update_ref(
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
    """The twin of `seqmix_mamba.kernel.selective_state_update`: one token, state_BEN advanced IN PLACE."""
    f = state_BEN.dtype
    dt_BE = delta_BE.to(f) + (0 if delta_bias_E is None else delta_bias_E.to(f))
    if delta_softplus:
        dt_BE = F.softplus(dt_BE)
    D_E = torch.zeros(u_BE.shape[-1], dtype=f, device=u_BE.device) if D_E is None else D_E
    y_BE = selective_state_step_ref(state_BEN, u_BE.to(f), dt_BE, A_EN, B_BN, C_BN, D_E)
    if z_BE is not None:
        y_BE = y_BE * F.silu(z_BE.to(f))
    return y_BE.to(u_BE.dtype)
