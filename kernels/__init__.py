"""Triton kernels with guarded wrappers and PyTorch fallbacks."""
