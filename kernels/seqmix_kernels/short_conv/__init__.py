"""Causal depthwise short convolution: the reference forward and step (`naive`) and their Triton twins (`triton`,
imported only when asked for)."""
from typing import Callable

from seqmix_kernels.short_conv.naive import short_conv_ref, short_conv_step_ref

__all__ = ["short_conv_fns", "short_conv_ref", "short_conv_step_ref"]


def short_conv_fns(impl: str) -> tuple[Callable, Callable]:
    """(forward, decode step) for a resolved impl ("reference" or "triton", see `backend.resolve_impl`)."""
    if impl == "reference":
        return short_conv_ref, short_conv_step_ref
    if impl == "triton":
        from seqmix_kernels.short_conv.triton import short_conv, short_conv_step

        return short_conv, short_conv_step
    raise ValueError(f"short conv impl must be 'reference' or 'triton', got {impl!r}")
