"""Sliding-window causal softmax attention as plain einsums: the functional twin kernels are tested against."""
from __future__ import annotations

import math
from typing import Optional

import torch


def swa_ref(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    window: int,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Banded causal softmax attention: query t attends keys s with t - window < s <= t.

    q_BTHD, k_BTHD, v_BTHD: [batch, time, heads, head_dim], rotary already applied to q and k.
    window: keys per query, itself included (>= 1); window >= T is plain causal attention.
    scale: logit scale, default 1/sqrt(head_dim).
    Returns o_BTHD [batch, time, heads, head_dim] in q's dtype; computed in fp32 (fp64 for fp64 inputs).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    B, T, H, D = q_BTHD.shape
    if k_BTHD.shape != (B, T, H, D) or v_BTHD.shape != (B, T, H, D):
        raise ValueError(
            f"q, k, v must all be [B, T, H, D]; got {tuple(q_BTHD.shape)}, "
            f"{tuple(k_BTHD.shape)}, {tuple(v_BTHD.shape)}"
        )
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = torch.promote_types(q_BTHD.dtype, torch.float32)
    s_BHTS = torch.einsum("bthd,bshd->bhts", q_BTHD.to(acc), k_BTHD.to(acc)) * scale
    t_T1 = torch.arange(T, device=q_BTHD.device)[:, None]
    s_1S = torch.arange(T, device=q_BTHD.device)[None, :]
    band_TS = (s_1S <= t_T1) & (s_1S > t_T1 - window)
    s_BHTS = s_BHTS.masked_fill(~band_TS, float("-inf"))
    p_BHTS = torch.softmax(s_BHTS, dim=-1)
    o_BTHD = torch.einsum("bhts,bshd->bthd", p_BHTS, v_BTHD.to(acc))
    return o_BTHD.to(q_BTHD.dtype)
