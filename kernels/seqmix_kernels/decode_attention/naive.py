"""Reference decode attention: one new query per sequence against the first len[b] rows of a KV cache, in fp32."""
from __future__ import annotations

import math
from typing import Optional

import torch


def decode_attention_ref(q_BHD: torch.Tensor, k_BSKD: torch.Tensor, v_BSKD: torch.Tensor, len_B: torch.Tensor,
                         scale: Optional[float] = None) -> torch.Tensor:
    """Softmax attention of q [B, H, D] over rows [0, len_B[b]) of k, v [B, S, K, Dc]; query head h reads kv head
    h // (H / K) (grouped heads); Dc >= D, columns past D are padding. Returns o [B, H, D] in q's dtype. Every
    len_B[b] must be in [1, S].

    Reads the whole cache (masked) and computes in fp32: the twin of `seqmix_kernels.decode_attention.triton`.
    """
    B, H, D = q_BHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    k_BSKD, v_BSKD = k_BSKD[..., :D], v_BSKD[..., :D]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q_BKGD = q_BHD.float().reshape(B, K, H // K, D)
    s_BKGS = torch.einsum("bkgd,bskd->bkgs", q_BKGD, k_BSKD.float()) * scale
    valid_BS = torch.arange(S, device=q_BHD.device) < len_B[:, None]
    p_BKGS = s_BKGS.masked_fill(~valid_BS[:, None, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bkgs,bskd->bkgd", p_BKGS, v_BSKD.float()).reshape(B, H, D).to(q_BHD.dtype)
