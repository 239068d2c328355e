"""pluggy entry point of seqmix-plugin-based: registers the `based` mixer."""
from seqmix.hookspecs import hookimpl


@hookimpl
def seqmix_register_mixers(register):
    from seqmix_based.mixer import BasedLinearAttention

    register(BasedLinearAttention)
