"""The built-in checkpoint importers, registered through `seqmix_register_importers` like a plugin's: the Based
repository's checkpoints (Based hybrids, attention baselines, Mamba stacks) and transformers' Llama and Mamba."""
from seqmix.hookspecs import hookimpl


@hookimpl
def seqmix_register_importers(register):
    from seqmix.io.importers import based_repo, hf

    register(based_repo.SOURCE, based_repo.import_based_repo, detect=based_repo.is_based_repo_config)
    register("llama", hf.import_llama)
    register("mamba", hf.import_mamba)
