"""Decode-state size of a model, two ways: seqmix's own accounting and the zoology paper's formulas (for its axis).

seqmix: the sum of `Mixer.state_bytes` over the blocks, what decode allocates per sequence at a given length.
zoology: the closed formulas its figures use, 4 bytes (fp32) per element, for the mixers they name
(BaseConv d*k, Based kv_heads*head_dim*E + kv_heads*E with E = F(F+1)/2 + F + 1, attention 2*d*L,
sliding window 2*w*d, Mamba 2*d*N). This table compares against a published axis; it is keyed by the mixer
names whose formulas the paper gives, and any other mixer makes the zoology figure None (unknown), never a guess.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

FP32 = 4


def _based(m, L: int) -> int:
    F = m.feature_dim
    E = F * (F + 1) // 2 + F + 1
    return m.n_heads * m.head_dim * E + m.n_heads * E


_ZOOLOGY: dict[str, Callable[..., int]] = {
    "conv": lambda m, L: m.ctx.d_model * m.kernel_size,
    "based": _based,
    "attn": lambda m, L: 2 * m.ctx.d_model * L,
    "swa": lambda m, L: 2 * m.window * m.ctx.d_model,
    "mamba": lambda m, L: 2 * m.ctx.d_model * m.d_state,
    "mlp": lambda m, L: 0,
}


def seqmix_state_bytes(model, seqlen: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of decode state per sequence at `seqlen` tokens, from the mixers' own `state_bytes`."""
    return model.state_bytes(1, seqlen, dtype)


def zoology_state_bytes(model, seqlen: int) -> Optional[int]:
    """The zoology formula's bytes (fp32) summed over the blocks; None if a block's mixer has no formula there."""
    total = 0
    for block in model.blocks:
        formula = _ZOOLOGY.get(block.mixer.name)
        if formula is None:
            return None
        total += formula(block.mixer, seqlen)
    return total * FP32
