"""Triton kernels with guarded wrappers and PyTorch fallbacks.

`attention(q, k, v, scale=None)` matches F.scaled_dot_product_attention (no mask, non-causal) and is
also registered as the custom op `torch.ops.vidrd.attention`. Importing this package does not import
triton; the kernels load on first use.
"""
from .ops import attention

__all__ = ["attention"]
