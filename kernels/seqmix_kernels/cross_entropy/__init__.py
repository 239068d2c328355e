"""Cross-entropy over the LM head: the reference (`naive`, full logits), the chunked PyTorch twin (`chunked`, never
more than one chunk of logits) and the Triton twin (`triton`, imported only when asked for: one chunk of logits
in h's dtype, overwritten in place by its gradient)."""
from typing import Callable

from seqmix_kernels.cross_entropy.chunked import linear_cross_entropy
from seqmix_kernels.cross_entropy.naive import linear_cross_entropy_ref

__all__ = ["cross_entropy_fn", "linear_cross_entropy", "linear_cross_entropy_ref"]


def cross_entropy_fn(impl: str) -> Callable:
    """`linear_cross_entropy` for a resolved impl: "reference" (full logits), "chunked" or "triton"."""
    if impl == "reference":
        return linear_cross_entropy_ref
    if impl == "chunked":
        return linear_cross_entropy
    if impl == "triton":
        from seqmix_kernels.cross_entropy.triton import linear_cross_entropy as triton_ce

        return triton_ce
    raise ValueError(f"cross-entropy impl must be 'reference', 'chunked' or 'triton', got {impl!r}")
