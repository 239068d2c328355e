"""seqmix-plugin-attention: causal softmax attention (`attn`) with grouped KV heads for seqmix."""
