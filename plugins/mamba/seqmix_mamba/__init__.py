"""seqmix-plugin-mamba: the Mamba selective state-space mixer for seqmix."""
