"""RMSNorm (and its fusion with the residual add): the reference (`naive`) and the Triton twin (`triton`, imported
only when asked for)."""
from typing import Callable

from seqmix_kernels.rmsnorm.naive import rms_norm_ref, rms_norm_residual_ref

__all__ = ["rms_norm_ref", "rms_norm_residual_fn", "rms_norm_residual_ref"]


def rms_norm_residual_fn(impl: str) -> Callable:
    """`rms_norm_residual` for a resolved impl ("reference" or "triton", see `backend.resolve_impl`)."""
    if impl == "reference":
        return rms_norm_residual_ref
    if impl == "triton":
        from seqmix_kernels.rmsnorm.triton import rms_norm_residual

        return rms_norm_residual
    raise ValueError(f"rms_norm_residual impl must be 'reference' or 'triton', got {impl!r}")
