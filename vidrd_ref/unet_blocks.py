"""Building blocks of the VidRD UNet3D (SPEC §1.3-§1.5). Every block maps (B,C,F,h,w) -> (B,C',F,h',w')."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Attention


def conv2d_5d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The official InflatedConv3d: a Conv2d applied to every frame. x (B,C,F,h,w) -> (B,C',F,h',w')."""
    b, c, f, h, w = x.shape
    y = conv(x.transpose(1, 2).reshape(b * f, c, h, w))  # ((B F),C',h',w')
    return y.view(b, f, *y.shape[1:]).transpose(1, 2)  # (B,C',F,h',w')


def frame_embedding(f: int, c: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Interleaved sin/cos frame embedding (official get_sin_pos_embedding): PE[p,2i]=sin, PE[p,2i+1]=cos. (F,C)."""
    pos = torch.arange(f, dtype=torch.float32, device=device)[:, None]  # (F,1)
    freq = torch.exp(torch.arange(0, c, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / c))
    pe = torch.stack([torch.sin(pos * freq), torch.cos(pos * freq)], dim=-1)  # (F,C/2,2)
    return pe.reshape(f, c).to(dtype)


class TemporalConv(nn.Module):
    """Official TemporalConvLayer: `reps` x [GroupNorm(32), SiLU, Dropout, Conv3d (3,1,1)], residual. (B,C,F,h,w)."""

    def __init__(self, c: int, reps: int, eps: float = 1e-5):
        super().__init__()
        layers = []
        for _ in range(reps):  # Dropout is inactive at inference: Identity keeps the key indices 0/3, 4/7, ...
            layers += [nn.GroupNorm(32, c, eps=eps), nn.SiLU(), nn.Identity(), nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0))]
        self.convs = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] == 1:  # official: x + 0 * convs(x) for images; identical for finite inputs
            return x
        h = x
        for layer in self.convs:  # GroupNorm on 5-D: statistics span all frames of a video (SPEC §4.5)
            h = layer(h)
        return x + h


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D on 5-D tensors: GroupNorm spans frames, convs per frame. temb (B,Dt), (B,F,Dt) or
    None."""

    def __init__(self, cin: int, cout: int, temb: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout) if temb else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = conv2d_5d(self.conv1, F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            e = self.time_emb_proj(F.silu(temb))  # (B,C), or (B,F,C) with a timestep per frame
            if e.dim() == 2:
                h = h + e[:, :, None, None, None]  # (B,C,1,1,1): shared by frames
            else:
                h = h + e.transpose(1, 2)[:, :, :, None, None]  # (B,C,F,1,1)
        h = conv2d_5d(self.conv2, F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else conv2d_5d(self.conv_shortcut, x)
        return skip + h


class GEGLU(nn.Module):
    """Linear(C, 8C) split into [value | gate]; value * gelu(gate)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """`ff.net` = [GEGLU, Dropout (no parameters), Linear(4C, C)]."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Official BasicTransformerBlock with temporal attention (SPEC §1.5). x ((B F),hw,C), ctx ((B F),L,Dc)."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        # Registration order mirrors the official block (it only affects state-dict key order).
        self.attn1 = Attention(dim, heads)
        self.temp_norm = nn.LayerNorm(dim)
        self.temp_attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.norm3 = nn.LayerNorm(dim)

    def frame_embedding(self, frames: int, x: torch.Tensor) -> torch.Tensor:
        """The (F,C) frame embedding for x ((B F),hw,C); the ONNX export overrides this with a table slice."""
        return frame_embedding(frames, x.shape[-1], x.dtype, x.device)

    def forward(self, x: torch.Tensor, context, frames: int) -> torch.Tensor:
        """x ((B F),hw,C); context (B,L,Dc) or its CrossKV."""
        x = self.attn1(self.norm1(x)) + x
        bf, hw, c = x.shape
        b = bf // frames
        # Every frame of a video attends to the same context: its queries go in as one (F hw) sequence, the same
        # arithmetic per query as the official per-frame copies of the context, without F copies of its keys/values.
        x = self.attn2(self.norm2(x).view(b, frames * hw, c), context).view(bf, hw, c) + x
        # The frame embedding stays in the residual stream (SPEC §4.3); for F == 1 the official in-place add
        # leaks into the returned identity, so PE[0] is added even on the single-frame path (SPEC §4.4).
        pe = self.frame_embedding(frames, x)  # (F,C)
        x = (x.view(b, frames, hw, c) + pe[None, :, None, :])  # (B,F,hw,C)
        if frames > 1:
            t = x.transpose(1, 2).reshape(b * hw, frames, c)  # ((B hw),F,C)
            t = self.temp_attn(self.temp_norm(t)) + t
            x = t.view(b, hw, frames, c).transpose(1, 2)  # (B,F,hw,C)
        x = x.reshape(bf, hw, c)  # ((B F),hw,C)
        return self.ff(self.norm3(x)) + x


class Transformer3D(nn.Module):
    """Official Transformer3DModel: per-frame GroupNorm, linear proj in/out, one block. (B,C,F,h,w), ctx (B,L,Dc)
    or its CrossKV."""

    def __init__(self, dim: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, heads, context_dim)])
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * f, c, h, w)  # ((B F),C,h,w)
        t = self.norm(frames).permute(0, 2, 3, 1).reshape(b * f, h * w, c)  # ((B F),hw,C): norm is per frame
        t = self.proj_in(t)
        t = self.transformer_blocks[0](t, context, f)
        t = self.proj_out(t).view(b * f, h, w, c).permute(0, 3, 1, 2)  # ((B F),C,h,w)
        return (t + frames).view(b, f, c, h, w).transpose(1, 2)  # (B,C,F,h,w)


class Downsample(nn.Module):
    """3x3 stride-2 conv per frame (key `downsamplers.0.conv`)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return conv2d_5d(self.conv, x)


class Upsample(nn.Module):
    """Nearest x2 in h,w (or to an explicit (F,h,w) size), then a 3x3 conv per frame (key `upsamplers.0.conv`)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, size=None):
        dtype = x.dtype
        if dtype == torch.bfloat16:  # the official Upsample3D upcasts bf16 around the interpolate
            x = x.float()
        if size is None:
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return conv2d_5d(self.conv, x.to(dtype))


class Block3D(nn.Module):
    """A down, mid or up block: layers of resnet -> temporal conv [-> transformer], then a resampler."""

    def __init__(self, cins, cout, temb, heads, context_dim, groups, eps, attn: bool, sampler: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ci, cout, temb, groups, eps) for ci in cins])
        self.temp_convs = nn.ModuleList([TemporalConv(cout, 4) for _ in cins])
        n_attn = len(cins) if attn else 0
        self.attentions = nn.ModuleList([Transformer3D(cout, heads, context_dim, groups) for _ in range(n_attn)])
        if sampler == "down":
            self.downsamplers = nn.ModuleList([Downsample(cout)])
        if sampler == "up":
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def layer(self, j: int, x, temb, context):
        x = self.temp_convs[j](self.resnets[j](x, temb))
        return self.attentions[j](x, context) if len(self.attentions) else x


class MidBlock3D(Block3D):
    """resnet0 -> temp_conv0 -> attention0 -> resnet1 -> temp_conv1 (official UNetMidBlock3DCrossAttn)."""

    def __init__(self, c, temb, heads, context_dim, groups, eps):
        super().__init__([c, c], c, temb, heads, context_dim, groups, eps, attn=False, sampler=None)
        self.attentions = nn.ModuleList([Transformer3D(c, heads, context_dim, groups)])

    def forward(self, x, temb, context):
        x = self.temp_convs[0](self.resnets[0](x, temb))
        x = self.attentions[0](x, context)
        return self.temp_convs[1](self.resnets[1](x, temb))
