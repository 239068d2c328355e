"""Rotary position embedding: the reference (`naive`) and its Triton twin (`triton`, imported only when asked for)."""
from typing import Callable

from seqmix_kernels.rotary.naive import check_rotary_dim, rotary_cos_sin, rotary_ref, rotated_channels

__all__ = ["check_rotary_dim", "rotary_cos_sin", "rotary_fn", "rotary_ref", "rotated_channels"]


def rotary_fn(impl: str) -> Callable:
    """`rotary` for a resolved impl ("reference" or "triton", see `backend.resolve_impl`)."""
    if impl == "reference":
        return rotary_ref
    if impl == "triton":
        from seqmix_kernels.rotary.triton import rotary

        return rotary
    raise ValueError(f"rotary impl must be 'reference' or 'triton', got {impl!r}")
