"""The VidRD UNet3D (official UNet3DConditionModel with add_temp_embed and add_temp_conv, SPEC §1)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import CrossKV
from .config import UNetConfig
from .reuse import FeatureCache
from .unet_blocks import Block3D, MidBlock3D, conv2d_5d


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """diffusers Timesteps(dim, flip_sin_to_cos=True, shift=0): [cos | sin], float32. t (N,) -> (N,dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * freqs[None]  # (N,half)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class UNet3D(nn.Module):
    """sample (B,4,F,h,w), timestep () or (B,) or (B,F) (one per frame), context (B,L,Dc) or its CrossKV -> noise
    prediction (B,4,F,h,w)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, heads, g, eps = cfg.block_out_channels, cfg.attention_head_dim, cfg.norm_num_groups, cfg.norm_eps
        ctx, temb = cfg.cross_attention_dim, ch[0] * 4
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)

        self.down_blocks = nn.ModuleList()
        cout = ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            cin, cout = cout, ch[i]
            cins = [cin] + [cout] * (cfg.layers_per_block - 1)
            self.down_blocks.append(Block3D(cins, cout, temb, heads[i], ctx, g, eps, attn=kind.startswith("CrossAttn"),
                                            sampler="down" if i < n - 1 else None))
        self.mid_block = MidBlock3D(ch[-1], temb, heads[-1], ctx, g, eps)

        self.up_blocks = nn.ModuleList()
        rch, rheads = ch[::-1], heads[::-1]
        cout = rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, cout, skip_in = cout, rch[i], rch[min(i + 1, n - 1)]
            layers = cfg.layers_per_block + 1
            # layer j concatenates [h, skip]: h has `prev` channels at j=0, the skip of the last layer has `skip_in`
            cins = [(prev if j == 0 else cout) + (skip_in if j == layers - 1 else cout) for j in range(layers)]
            self.up_blocks.append(Block3D(cins, cout, temb, rheads[i], ctx, g, eps, attn=kind.startswith("CrossAttn"),
                                          sampler="up" if i < n - 1 else None))
        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep, context: torch.Tensor,
                cache: FeatureCache | None = None) -> torch.Tensor:
        """cache None: the full UNet. "store": the full UNet, keeping the deep feature in the cache; "reuse": only
        the shallow path (conv_in, the first skips, the last cache.depth up blocks) on the stored deep feature."""
        b, f = sample.shape[0], sample.shape[2]
        dtype = self.conv_in.weight.dtype
        t = torch.as_tensor(timestep, device=sample.device)
        if t.dim() == 2:  # a timestep per frame (diagonal denoising): an embedding per frame
            if tuple(t.shape) != (b, f):
                raise ValueError(f"timestep of shape {tuple(t.shape)} must be (), (B,) or (B,F) = {(b, f)}")
            emb = self.time_embedding(timestep_embedding(t.reshape(b * f), self.conv_in.out_channels).to(dtype))
            emb = emb.view(b, f, -1)  # (B,F,Dt): the ResNet blocks add it per frame
        else:
            t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(b)  # (B,)
            emb = self.time_embedding(timestep_embedding(t, self.conv_in.out_channels).to(dtype))  # (B,Dt)
        x = sample.to(dtype)
        if not isinstance(context, CrossKV):  # a CrossKV holds keys/values already in the layers' dtype
            context = context.to(dtype)

        n_up = len(self.up_blocks) - 1
        # Up-sampling to an explicit size is needed when h or w is not a multiple of 2**(number of up-samplers).
        explicit = any(s % (2 ** n_up) for s in x.shape[-2:])
        first = self._first_cached(cache)  # the up block whose input a cache holds: n-depth
        reuse = cache is not None and cache.mode == "reuse"
        start = first if reuse else 0  # the first up block that runs
        # up block i pops layers_per_block+1 skips, so the up blocks from `first` on read only the first ones
        skips = self._down(x, emb, context,
                           keep=(len(self.up_blocks) - first) * (self.cfg.layers_per_block + 1) if reuse else None)
        if reuse:
            x = cache.feature
            if x is None or x.shape[0] != b or x.shape[2:] != skips[-1].shape[2:]:
                raise ValueError(f"cache.feature {None if x is None else tuple(x.shape)} does not fit this call "
                                 f"(batch {b}, (F,h,w) {tuple(skips[-1].shape[2:])}): run a 'store' forward with "
                                 "the same batch and size first")
        else:
            x = self.mid_block(skips[-1], emb, context)

        for i, blk in enumerate(self.up_blocks[start:], start):
            if i == first and cache is not None and cache.mode == "store":
                cache.feature = x  # (B,C,F,h,w) a reference, not a copy: nothing below writes into x in place
            for j in range(len(blk.resnets)):
                x = torch.cat([x, skips.pop()], dim=1)  # (B,C+Cskip,F,h,w)
                x = blk.layer(j, x, emb, context)
            if hasattr(blk, "upsamplers"):
                size = tuple(skips[-1].shape[2:]) if explicit else None  # (F,h,w) of the next skip
                x = blk.upsamplers[0](x, size)
        x = F.silu(self.conv_norm_out(x))  # 5-D GroupNorm: statistics over all frames
        return conv2d_5d(self.conv_out, x)

    def _down(self, x, emb, context, keep: int | None) -> list:
        """conv_in and the down blocks -> the skips [conv_in, down0 layers..., down0 downsampler, down1 ...]
        (the last one is the mid block's input); with `keep`, stop once that many skips exist."""
        x = conv2d_5d(self.conv_in, x)  # (B,C0,F,h,w)
        skips = [x]
        for blk in self.down_blocks:
            for j in range(len(blk.resnets)):
                if len(skips) == keep:
                    return skips
                x = blk.layer(j, x, emb, context)
                skips.append(x)
            if hasattr(blk, "downsamplers"):
                if len(skips) == keep:
                    return skips
                x = blk.downsamplers[0](x)
                skips.append(x)
        return skips

    def _first_cached(self, cache: FeatureCache | None) -> int:
        """The up block whose input the cache holds (n-depth), after checking the cache's mode and depth."""
        if cache is None:
            return 0
        if cache.mode not in ("store", "reuse"):
            raise ValueError(f"cache.mode={cache.mode!r} must be 'store' or 'reuse'")
        n = len(self.up_blocks)
        if not isinstance(cache.depth, int) or not 1 <= cache.depth <= n:
            raise ValueError(f"cache.depth={cache.depth!r} must be an integer between 1 and {n} (the up blocks)")
        return n - cache.depth
