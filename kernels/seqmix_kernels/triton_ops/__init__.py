"""The Triton paths of the shared ops; importing any module here imports triton (use `seqmix_kernels.backend`)."""
