"""Registers the `swa` mixer with seqmix (entry point `swa = "seqmix_swa.plugin"`)."""
from seqmix.hookspecs import hookimpl


@hookimpl
def seqmix_register_mixers(register):
    from seqmix_swa.mixer import SlidingWindowAttention

    register(SlidingWindowAttention)
