"""Cross-entropy over an LM head, reference: the whole [N, V] logits, upcast to fp32, as eager training does."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def linear_cross_entropy_ref(
    h_BTD: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    *,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int = 8192,
) -> torch.Tensor:
    """CE of logits = h @ weight[:vocab_size]^T (computed in h's dtype, then fp32) against integer targets.

    h_BTD: [..., D] final hidden states; weight_VD: [V_padded, D] the head (the tied embedding);
    targets_BT: [...] int64, `ignore_index` entries are skipped. vocab_size: logits kept (default all rows).
    reduction: "mean" over non-ignored tokens or "sum". chunk_size: unused (same signature as the twin).
    """
    V = weight_VD.shape[0] if vocab_size is None else vocab_size
    logits = F.linear(h_BTD, weight_VD[:V]).float()
    return F.cross_entropy(logits.flatten(0, -2), targets_BT.flatten(), ignore_index=ignore_index,
                           reduction=reduction)
