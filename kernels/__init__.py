"""Triton kernels with guarded wrappers and PyTorch fallbacks.

`attention(q, k, v, scale=None)` matches F.scaled_dot_product_attention (no mask, non-causal) and is
also registered as the custom op `torch.ops.vidrd.attention`. `group_norm_silu(x, weight, bias, groups, eps,
temb=None)` and `geglu(x, bias=None)` fuse a ResNet block's [+ temb] GroupNorm SiLU and the feed-forward's GEGLU
(custom ops `torch.ops.vidrd.group_norm_silu` / `.geglu`). Importing this package does not import triton; the
kernels load on first use.
"""
from .fused import geglu, group_norm_silu
from .ops import attention

__all__ = ["attention", "geglu", "group_norm_silu"]
