"""Decode attention (one query per sequence over a KV cache): the reference (`naive`) and its split-K Triton twin
(`triton`, imported only when asked for)."""
from seqmix_kernels.decode_attention.naive import decode_attention_ref

__all__ = ["decode_attention_fn", "decode_attention_ref"]


def decode_attention_fn(impl: str):
    """`decode_attention` for a resolved impl ("reference" or "triton", chosen by a `seqmix.mixer.Impl` table)."""
    if impl == "reference":
        return decode_attention_ref
    if impl == "triton":
        from seqmix_kernels.decode_attention.triton import decode_attention

        return decode_attention
    raise ValueError(f"decode_attention impl must be 'reference' or 'triton', got {impl!r}")
