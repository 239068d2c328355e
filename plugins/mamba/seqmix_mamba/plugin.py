"""seqmix plugin hook: registers the `mamba` mixer (entry point `mamba = "seqmix_mamba.plugin"`)."""
from seqmix.hookspecs import hookimpl


@hookimpl
def seqmix_register_mixers(register):
    from seqmix_mamba.mixer import Mamba

    register(Mamba)
