"""seqmix-plugin-swa: sliding-window softmax attention for seqmix."""
