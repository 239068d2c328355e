"""Triton kernels for Based linear attention: `based_attn` (training, prefill with states) and `based_step` (decode).

Importing this package needs no triton; `based_attn` and `based_step` import the kernels on first access.
`is_available(device)` says whether they can run there (None) or why not (a string).
"""
from __future__ import annotations

from typing import Any

from seqmix_based.kernels.support import is_available, unsupported_sizes

__all__ = ["based_attn", "based_step", "is_available", "unsupported_sizes"]


def __getattr__(name: str) -> Any:
    if name == "based_attn":
        from seqmix_based.kernels.attn import based_attn

        return based_attn
    if name == "based_step":
        from seqmix_based.kernels.step import based_step

        return based_step
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
