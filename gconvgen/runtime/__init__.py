"""Runtime: the disk cache, compiled kernels and their launch, and the torch custom op."""
