"""--fast-ops: faster kernels for the torch UNet and VAE decoder that are not bit-exact, only within float rounding
of the default (tests/tolerances.py), so opt-in and on under --quality balanced|fast (BENCHMARKS.md).

- temporal convolutions (the official Conv3d with kernel (3,1,1)) as 2-D convolutions over (frames, h*w): the same
  sums, but oneDNN's kernels on every CPU, where a float32 Conv3d takes PyTorch's slow im2col path;
- bf16 attention over long sequences on the CPU in chunks with float32 scores (vidrd.ref.attention.chunked), where
  the attention backend is the default SDPA and nothing is compiled (faster than the CPU flash kernel on some CPUs,
  slower on others: BENCHMARKS.md, fast ops);
- on the CPU, the official per-frame VAE decode one frame per decoder call (TorchVAE): a clip's activations stay
  under glibc's mmap threshold, so they come from the heap instead of freshly faulted pages (frames are independent
  there, so only the convolutions' blocking can differ).
The model's own modules stay as they are: the backends get copies that share every weight.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from vidrd.ref.attention import Attention
from vidrd.ref.unet_blocks import TemporalConv


class FrameConv(nn.Module):
    """A temporal Conv3d (kernel (3,1,1), padding (1,0,0)) run as a Conv2d over (F, h*w) with its own weight and
    bias (shared, not copied). (B,C,F,h,w) -> (B,C',F,h,w)."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        assert conv.kernel_size == (3, 1, 1) and conv.padding == (1, 0, 0), (conv.kernel_size, conv.padding)
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        weight = self.conv.weight.squeeze(-1)  # (C',C,3,1)
        y = F.conv2d(x.reshape(b, c, f, h * w), weight, self.conv.bias, padding=(1, 0))  # (B,C',F,(h w))
        return y.view(b, -1, f, h, w)


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers are the original's tensors (only the module objects new)."""
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}  # deepcopy's memo: not copied
    return copy.deepcopy(module, shared)


def apply(module: nn.Module, *, chunked_attention: bool) -> nn.Module:
    """A shared copy of `module` (a UNet3D or TemporalVAE) with its temporal Conv3d layers as FrameConv and, when
    `chunked_attention`, its SDPA attention layers routed through `chunked`."""
    clone = shared_copy(module)
    for m in clone.modules():
        if isinstance(m, TemporalConv):
            m.convs = nn.ModuleList([FrameConv(c) if isinstance(c, nn.Conv3d) else c for c in m.convs])
        if chunked_attention and isinstance(m, Attention) and m.backend == "sdpa":
            m.backend = "chunked"
    return clone
