"""The one attention switch of the reference model: `sdpa` (default), `math`, `chunked`, or `triton` (vidrd.kernels)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("sdpa", "math", "chunked", "triton")
# `chunked` computes one (Lq,Lk) score matrix at a time where both sequences are at least this long (the spatial
# self-attention of the largest levels); shorter ones go to SDPA, which is as fast there.
CHUNKED_MIN_LEN = 256
# CUDA SDPA kernels put the batch in a grid dimension limited to 65,535 blocks; temporal attention has batch
# (2B h w): eight 512 px prompts under guidance reach 2*8*64*64 = 65,536. Larger batches run in slices.
SDPA_MAX_BATCH = 65535


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
         max_batch: int | None = None) -> torch.Tensor:
    """F.scaled_dot_product_attention in batch slices of at most max_batch (default SDPA_MAX_BATCH).
    q (N,H,Lq,Dh), k/v (N,H,Lk,Dh) -> (N,H,Lq,Dh)."""
    n, max_batch = q.shape[0], max_batch or SDPA_MAX_BATCH
    if n <= max_batch:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    out = torch.empty_like(q)  # (N,H,Lq,Dh)
    for i in range(0, n, max_batch):
        out[i:i + max_batch] = F.scaled_dot_product_attention(q[i:i + max_batch], k[i:i + max_batch],
                                                              v[i:i + max_batch], scale=scale)
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str) -> torch.Tensor:
    """Non-causal attention without mask. q (N,H,Lq,Dh), k/v (N,H,Lk,Dh) -> (N,H,Lq,Dh)."""
    if backend == "sdpa":
        return sdpa(q, k, v, scale)
    if backend == "math":
        w = torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1).to(q.dtype)  # (N,H,Lq,Lk)
        return w @ v
    if backend == "chunked":
        return chunked(q, k, v, scale)
    if backend == "triton":
        from vidrd.kernels import attention
        return attention(q, k, v, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """bf16 attention on the CPU over long sequences, one (batch, head) at a time: the scores as float32 products of
    the bf16 values (exact: a product of two bf16 numbers fits float32's mantissa; float32 sums) in one float32
    (Lq,Lk) buffer (4 MiB at 1024 tokens: no fresh pages, stays in cache), softmax in float32, bf16 weights times v.
    Nothing process-wide changes (oneDNN's bf16 fpmath mode would be faster on bf16 units, but it applies to every
    thread's float32 products). Float32 inputs, short sequences and CUDA tensors go to SDPA (no faster this way).
    q (N,H,Lq,Dh), k/v (N,H,Lk,Dh)."""
    n, heads, lq, _ = q.shape
    lk = k.shape[2]
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or min(lq, lk) < CHUNKED_MIN_LEN:
        return sdpa(q, k, v, scale)
    out = torch.empty_like(q)  # (N,H,Lq,Dh)
    scores = torch.empty(lq, lk, dtype=torch.float32)  # (Lq,Lk), reused by every (batch, head)
    weights = torch.empty(lq, lk, dtype=q.dtype)  # (Lq,Lk)
    qf, kf = q.float(), k.float()  # (N,H,L,Dh): the bf16 values exactly
    for i in range(n):
        for j in range(heads):
            torch.addmm(scores, qf[i, j], kf[i, j].T, beta=0, alpha=scale, out=scores)  # (Lq,Lk)
            weights.copy_(torch.softmax(scores, -1))  # (Lq,Lk)
            torch.mm(weights, v[i, j], out=out[i, j])  # (Lq,Dh)
    return out


class Attention(nn.Module):
    """diffusers-0.14 `CrossAttention`: q/k/v without bias, to_out.0 with bias. x (N,L,C), ctx (N,Lk,Dc)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.backend = "sdpa"
        self.cross = context_dim is not None  # attends to the text context (constant over a request)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def kv(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ctx (N,Lk,Dc) -> (N,H,Lk,Dh) each."""
        n, lk = ctx.shape[:2]
        k = self.to_k(ctx).view(n, lk, self.heads, -1).transpose(1, 2)  # (N,H,Lk,Dh)
        v = self.to_v(ctx).view(n, lk, self.heads, -1).transpose(1, 2)  # (N,H,Lk,Dh)
        return k, v

    def forward(self, x: torch.Tensor, context: "torch.Tensor | CrossKV | None" = None) -> torch.Tensor:
        n, l, c = x.shape
        q = self.to_q(x).view(n, l, self.heads, -1).transpose(1, 2)  # (N,H,L,Dh)
        k, v = context.kv[self] if isinstance(context, CrossKV) else self.kv(x if context is None else context)
        o = attend(q, k, v, self.scale, self.backend)
        return self.to_out[0](o.transpose(1, 2).reshape(n, l, c))  # (N,L,C)


class CrossKV:
    """Keys and values of every cross-attention of `model` for one text context (B,L,Dc): the context is constant
    over a request, so they are computed once instead of at every step. Pass it where the context goes."""

    def __init__(self, model: nn.Module, context: torch.Tensor):
        self.kv = {m: m.kv(context.to(m.to_k.weight.dtype)) for m in model.modules()
                   if isinstance(m, Attention) and m.cross}


def set_attention(model: nn.Module, backend: str) -> nn.Module:
    """Route every Attention module of `model` through `backend`; returns the model."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = backend
    return model
