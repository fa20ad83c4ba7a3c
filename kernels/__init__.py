"""Fused kernels (Triton, CUDA) and the single dispatch point the model calls."""
