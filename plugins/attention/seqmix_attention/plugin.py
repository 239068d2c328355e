"""Registers the `attn` mixer with seqmix (entry point `attn = "seqmix_attention.plugin"`)."""
from seqmix.hookspecs import hookimpl


@hookimpl
def seqmix_register_mixers(register):
    from seqmix_attention.mixer import CausalAttention

    register(CausalAttention)
