"""seqmix-kernels: ops shared by two or more mixers, each a reference twin beside its (optional) Triton kernel.

One folder per op (short_conv, rotary, rmsnorm, cross_entropy): `naive.py` holds the reference, `triton.py` the
Triton twin with the same signature (importing it imports triton and registers its launches as torch.library
custom ops, `seqmix_kernels::*`, which torch.compile keeps as opaque nodes; cross_entropy also has `chunked.py`,
plain PyTorch), and the folder's `__init__` picks one with its `*_fn(impl)` helper (impl as a mixer's
`seqmix.mixer.Impl` table chose it). Importing this package never imports triton.
"""
from seqmix_kernels.cross_entropy import cross_entropy_fn, linear_cross_entropy, linear_cross_entropy_ref
from seqmix_kernels.rmsnorm import rms_norm_ref, rms_norm_residual_fn, rms_norm_residual_ref
from seqmix_kernels.rotary import rotary_fn, rotary_ref
from seqmix_kernels.short_conv import short_conv_fns, short_conv_ref, short_conv_step_ref

__all__ = [
    "cross_entropy_fn", "linear_cross_entropy", "linear_cross_entropy_ref", "rms_norm_ref", "rms_norm_residual_fn",
    "rms_norm_residual_ref", "rotary_fn", "rotary_ref", "short_conv_fns", "short_conv_ref", "short_conv_step_ref",
]
