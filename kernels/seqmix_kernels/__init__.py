"""seqmix-kernels: ops shared by two or more mixers, each a reference twin beside its (optional) Triton kernel."""
from seqmix_kernels.rmsnorm import rms_norm_ref
from seqmix_kernels.rotary import rotary_ref
from seqmix_kernels.short_conv import short_conv_ref, short_conv_step_ref

__all__ = ["rms_norm_ref", "rotary_ref", "short_conv_ref", "short_conv_step_ref"]
