"""Cross-entropy over a (tied) LM head without the full logits: chunked over tokens, gradient computed on the fly.

The definition is `naive.linear_cross_entropy_ref` (the whole [N, V] logits, upcast to fp32, as eager training
does). `linear_cross_entropy` walks the N tokens in chunks: per chunk it forms the logits, their fp32 log-softmax at
the targets and, when a gradient is needed, g = d loss / d logits = (softmax - onehot) / n_valid, folded
straight into dh = g @ W and dW += g^T @ h. Peak extra memory is one chunk of logits (about 6 bytes x chunk x V)
plus an fp32 dW, instead of several [N, V] fp32 tensors; the matmul FLOPs are those of eager forward +
backward, and each chunk of logits is read about three times (log-softmax, softmax, the two matmuls).
Plain PyTorch (runs on any device); the backward only scales the saved gradients by d loss.
"""
from __future__ import annotations

from typing import Optional

import torch


class LinearCrossEntropyFunction(torch.autograd.Function):
    """(h [N, D], weight [V, D], targets [N]) -> fp32 scalar loss; gradients formed during the forward."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, ignore_index: int, reduction: str, chunk: int):
        N = h_ND.shape[0]
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid_N = t_N != ignore_index
        n_valid = valid_N.sum()
        denom = n_valid.clamp_min(1).float() if reduction == "mean" else torch.ones((), device=h_ND.device)
        loss = torch.zeros((), device=h_ND.device, dtype=torch.float32)
        dh_ND = torch.empty_like(h_ND) if need_dh else None
        dw_VD = torch.zeros(w_VD.shape, device=w_VD.device, dtype=torch.float32) if need_dw else None
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            h_cD, valid_c = h_ND[s:e], valid_N[s:e]
            tgt_c = torch.where(valid_c, t_N[s:e], 0)
            z_cV = h_cD @ w_VD.t()  # logits in h's dtype, as F.linear gives them
            logp_t_c = torch.log_softmax(z_cV, -1, dtype=torch.float32).gather(1, tgt_c[:, None])[:, 0]
            loss -= (logp_t_c * valid_c).sum()
            if not (need_dh or need_dw):
                continue
            # d loss / d z = (softmax - onehot) * valid / denom: the softmax rounded once to h's dtype, the target
            # entry p_t - 1 from the fp32 log-prob; the row scale is applied to [c, D] tensors, not to [c, V].
            g_cV = torch.softmax(z_cV, -1)
            del z_cV
            g_cV[torch.arange(e - s, device=g_cV.device), tgt_c] = (logp_t_c.exp() - 1.0).to(g_cV.dtype)
            if need_dh:
                dh_ND[s:e] = ((g_cV @ w_VD).float() * (valid_c / denom)[:, None]).to(h_ND.dtype)
            if need_dw:
                dw_VD += (g_cV.t() @ (h_cD * valid_c[:, None].to(h_cD.dtype))).float()
            del g_cV
        if need_dw:
            dw_VD /= denom
        if reduction == "mean":
            loss = loss / n_valid.float()  # nan when every target is ignored, like F.cross_entropy
        ctx.save_for_backward(dh_ND, dw_VD)
        ctx.w_dtype = w_VD.dtype
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dh_ND, dw_VD = ctx.saved_tensors
        dh = None if dh_ND is None else dh_ND * dloss.to(dh_ND.dtype)
        dw = None if dw_VD is None else (dw_VD * dloss).to(ctx.w_dtype)
        return dh, dw, None, None, None, None


def linear_cross_entropy(
    h_BTD: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    *,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int = 8192,
) -> torch.Tensor:
    """Cross-entropy of logits = h @ weight[:vocab_size]^T vs targets, never holding more than chunk_size rows of
    logits. Same signature and result as `linear_cross_entropy_ref` (fp32 scalar).

    h_BTD: [B, T, D] (any leading dims), fp32/fp16/bf16; the matmuls run in h's dtype with fp32 softmax.
    weight_VD: [V_padded, D] in h's dtype; targets_BT: [B, T] int64. Differentiable w.r.t. h and weight; one
    backward per forward (the gradients are computed eagerly and scaled by d loss).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if h_BTD.shape[:-1] != targets_BT.shape or weight_VD.shape[-1] != h_BTD.shape[-1]:
        raise ValueError(f"linear_cross_entropy wants h [..., D], weight [V, D] and targets h.shape[:-1]; got "
                         f"h {list(h_BTD.shape)}, weight {list(weight_VD.shape)}, targets {list(targets_BT.shape)}")
    if weight_VD.dtype != h_BTD.dtype:
        raise TypeError(f"h and weight must share a dtype, got {h_BTD.dtype} and {weight_VD.dtype}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    V = weight_VD.shape[0] if vocab_size is None else vocab_size
    D = h_BTD.shape[-1]
    return LinearCrossEntropyFunction.apply(h_BTD.reshape(-1, D), weight_VD[:V], targets_BT.reshape(-1),
                                            ignore_index, reduction, chunk_size)
