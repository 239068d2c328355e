"""seqmix-plugin-based: Based linear attention (Taylor feature map) for seqmix."""
