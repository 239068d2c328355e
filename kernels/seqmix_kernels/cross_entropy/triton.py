"""Cross-entropy over a (tied) LM head on Triton: logits one chunk at a time, their gradient written in place.

Per chunk of c rows: z = h_c @ W^T over the whole padded head (a GEMM with aligned rows), then one Triton program
per row reads its logits twice (the log-sum-exp over the real vocabulary, then the gradient) and overwrites them
with g = (softmax - onehot) * valid / n_valid (0 on the padded columns), followed by dh_c = g @ W and
dW += g^T @ h_c. So the logits live only as one chunk in h's dtype (never fp32), are read twice and written
once by the kernel, and the three GEMMs are eager training's. The gradients are formed in the forward (a
torch.library custom op, opaque to torch.compile) and scaled by d loss in the backward.
Twin: `seqmix_kernels.cross_entropy.naive.linear_cross_entropy_ref`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from seqmix_kernels.backend import check_device

LOGITS_BYTES = 2 << 30  # a chunk of logits at most this big (rows = this / (bytes per row)); all rows if they fit


@triton.jit
def _ce_row_kernel(z_ptr, t_ptr, loss_ptr, inv_n_ptr, stride_z, V, VP, ignore_index,
                   WRITE_GRAD: tl.constexpr, BV: tl.constexpr):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    t = tl.load(t_ptr + row)
    valid = t != ignore_index
    t = tl.where(valid, t, 0)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for off in range(0, V, BV):
        cols = off + tl.arange(0, BV)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    z_t = tl.load(z_row + t).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_t, 0.0))
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(inv_n_ptr), 0.0)
        for off in range(0, VP, BV):
            cols = off + tl.arange(0, BV)
            z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            g = tl.exp(z - lse) * scale
            g = tl.where(cols == t, g - scale, g)
            tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=cols < VP)


def _chunk_rows(N: int, VP: int, elem: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, min(N, chunk_size))
    return max(1, min(N, LOGITS_BYTES // max(1, VP * elem)))


def ce_forward(h_ND, w_VD, t_N, vocab_size: int, ignore_index: int, reduction: str, chunk_size: Optional[int],
               need_grad: bool):
    """(loss fp32 scalar, dh [N, D] in h's dtype, dW [VP, D] in W's dtype); the gradients are empty without
    need_grad. W is the whole padded head [VP, D]; only its first vocab_size rows are classes."""
    N, D = h_ND.shape
    VP = w_VD.shape[0]
    dev = h_ND.device
    valid_N = t_N != ignore_index
    n_valid = valid_N.sum()
    inv_n = (1.0 / n_valid.clamp_min(1).float() if reduction == "mean" else torch.ones((), device=dev)).reshape(1)
    loss_N = torch.empty(N, device=dev, dtype=torch.float32)
    dh = torch.empty(N, D, device=dev, dtype=h_ND.dtype) if need_grad else h_ND.new_empty(0)
    c = _chunk_rows(N, VP, h_ND.element_size(), chunk_size)
    dw32 = torch.zeros(VP, D, device=dev, dtype=torch.float32) if need_grad and c < N else None
    dw = None
    BV = 4096 if dev.type == "cuda" else 64
    for s in range(0, N, c):
        e = min(N, s + c)
        h_c = h_ND[s:e]
        z = h_c @ w_VD.t()  # [c, VP] in h's dtype
        _ce_row_kernel[(e - s,)](z, t_N[s:e], loss_N[s:e], inv_n, z.stride(0), vocab_size, VP, ignore_index,
                                 WRITE_GRAD=need_grad, BV=BV, num_warps=8 if dev.type == "cuda" else 1)
        if need_grad:
            torch.mm(z, w_VD, out=dh[s:e])
            if dw32 is None:
                dw = z.t() @ h_c
            else:
                dw32 += (z.t() @ h_c).float()
        del z
    if need_grad:
        dw = dw32.to(w_VD.dtype) if dw32 is not None else dw
    else:
        dw = w_VD.new_empty(0)
    total = loss_N.sum()
    loss = total / n_valid.float() if reduction == "mean" else total  # nan when all are ignored, like F.cross_entropy
    return loss, dh, dw


@torch.library.custom_op("seqmix_kernels::linear_cross_entropy_fwd", mutates_args=())
def _ce_op(h_ND: torch.Tensor, w_VD: torch.Tensor, t_N: torch.Tensor, vocab_size: int, ignore_index: int,
           reduction: str, chunk_size: Optional[int], need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ce_forward(h_ND, w_VD, t_N, vocab_size, ignore_index, reduction, chunk_size, need_grad)


@_ce_op.register_fake
def _(h_ND, w_VD, t_N, vocab_size, ignore_index, reduction, chunk_size, need_grad):
    loss = h_ND.new_empty((), dtype=torch.float32)
    if not need_grad:
        return loss, h_ND.new_empty(0), w_VD.new_empty(0)
    return loss, h_ND.new_empty(h_ND.shape), w_VD.new_empty(w_VD.shape)


def _setup(ctx, inputs, output):
    _loss, dh, dw = output
    ctx.save_for_backward(dh, dw)


def _backward(ctx, dloss, _ddh, _ddw):
    dh, dw = ctx.saved_tensors
    if dh.numel() == 0 and dw.numel() == 0:
        raise RuntimeError("linear_cross_entropy was called without gradients (under no_grad or on inputs that "
                           "need none) and cannot be differentiated")
    return dh * dloss.to(dh.dtype), (dw * dloss).to(dw.dtype), None, None, None, None, None, None


_ce_op.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy(
    h_BTD: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    *,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Cross-entropy of logits = h @ weight[:vocab_size]^T vs targets without the full logits; the same
    signature and result as `linear_cross_entropy_ref` (fp32 scalar).

    h_BTD: [..., D] fp32/fp16/bf16; weight_VD: [V_padded, D] in h's dtype (rows past vocab_size are padding:
    the GEMMs use them for alignment, the softmax ignores them, their gradient is 0); targets_BT: h.shape[:-1]
    int64. chunk_size: rows of logits per chunk (default: all rows that fit in 2 GiB). Differentiable w.r.t. h
    and weight (gradients formed in the forward when either needs one).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if h_BTD.shape[:-1] != targets_BT.shape or weight_VD.dim() != 2 or weight_VD.shape[-1] != h_BTD.shape[-1]:
        raise ValueError(f"linear_cross_entropy wants h [..., D], weight [V, D] and targets h.shape[:-1]; got "
                         f"h {list(h_BTD.shape)}, weight {list(weight_VD.shape)}, targets {list(targets_BT.shape)}")
    if weight_VD.dtype != h_BTD.dtype:
        raise TypeError(f"h and weight must share a dtype, got {h_BTD.dtype} and {weight_VD.dtype}")
    V = weight_VD.shape[0] if vocab_size is None else int(vocab_size)
    if not 1 <= V <= weight_VD.shape[0]:
        raise ValueError(f"vocab_size must be in [1, {weight_VD.shape[0]}] (the head's rows), got {V}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    check_device("linear_cross_entropy", h_BTD, weight_VD)
    D = h_BTD.shape[-1]
    need_grad = torch.is_grad_enabled() and (h_BTD.requires_grad or weight_VD.requires_grad)
    loss, _, _ = _ce_op(h_BTD.reshape(-1, D).contiguous(), weight_VD.contiguous(), targets_BT.reshape(-1).contiguous(),
                        V, int(ignore_index), reduction, chunk_size, need_grad)
    return loss
