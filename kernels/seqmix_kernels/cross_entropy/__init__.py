"""Cross-entropy over the LM head: the reference (`naive`, full logits) and the chunked twin (`chunked`, plain
PyTorch, never more than one chunk of logits; there is no Triton kernel for this op)."""
from seqmix_kernels.cross_entropy.chunked import linear_cross_entropy
from seqmix_kernels.cross_entropy.naive import linear_cross_entropy_ref

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref"]
