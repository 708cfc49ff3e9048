"""The VidRD temporal VAE (official TemporalAutoencoderKL, SPEC §2): SD's AutoencoderKL with temporal convs."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VAEConfig
from .unet_blocks import TemporalConv

EPS = 1e-6  # every norm of the SD VAE


class Resnet2D(nn.Module):
    """diffusers ResnetBlock2D without a time embedding. (N,C,H,W) -> (N,C',H,W)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
    """diffusers-0.14 AttentionBlock: one head over H*W tokens, old key names query/key/value/proj_attn."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=EPS)
        self.query, self.key, self.value = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.proj_attn = nn.Linear(c, c)

    def forward(self, x):
        n, c, h, w = x.shape
        t = self.group_norm(x).view(n, c, h * w).transpose(1, 2)  # (N,HW,C)
        q, k, v = (m(t)[:, None] for m in (self.query, self.key, self.value))  # (N,1,HW,C)
        o = F.scaled_dot_product_attention(q, k, v, scale=c ** -0.5)[:, 0]  # (N,HW,C)
        return x + self.proj_attn(o).transpose(1, 2).reshape(n, c, h, w)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet2D(c, c, groups), Resnet2D(c, c, groups)])
        self.attentions = nn.ModuleList([AttentionBlock(c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Sampler(nn.Module):
    """`downsamplers.0` (pad right/bottom by one, 3x3 stride 2) or `upsamplers.0` (nearest x2, 3x3)."""

    def __init__(self, c: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        if self.up:
            dtype = x.dtype
            x = F.interpolate(x.float() if dtype == torch.bfloat16 else x, scale_factor=2.0, mode="nearest").to(dtype)
        else:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class EncoderBlock(nn.Module):
    def __init__(self, cin, cout, layers, groups, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet2D(cin if j == 0 else cout, cout, groups) for j in range(layers)])
        if down:
            self.downsamplers = nn.ModuleList([Sampler(cout, up=False)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if hasattr(self, "downsamplers") else x


class DecoderBlock(nn.Module):
    """UpDecoderBlock2D with a TemporalConv (3 repetitions) after every resnet when add_temp_conv."""

    def __init__(self, cin, cout, layers, groups, up: bool, temporal: bool):
        super().__init__()
        self.resnets = nn.ModuleList([Resnet2D(cin if j == 0 else cout, cout, groups) for j in range(layers)])
        if temporal:
            self.temp_convs = nn.ModuleList([TemporalConv(cout, 3) for _ in range(layers)])
        if up:
            self.upsamplers = nn.ModuleList([Sampler(cout, up=True)])

    def forward(self, x, frames: int):
        for j, r in enumerate(self.resnets):
            x = r(x)
            if frames > 1 and hasattr(self, "temp_convs"):
                n, c, h, w = x.shape
                v = x.view(n // frames, frames, c, h, w).transpose(1, 2)  # (B,C,F,H,W): frames b-major, f-minor
                x = self.temp_convs[j](v).transpose(1, 2).reshape(n, c, h, w)  # ((B F),C,H,W)
        return self.upsamplers[0](x) if hasattr(self, "upsamplers") else x


class Encoder(nn.Module):
    """Images (N,3,H,W) -> posterior moments (N,2*C,h,w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, down=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """Latents ((B F),C,h,w) -> images ((B F),3,H,W); temporal convs act only when frames > 1."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rch, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, rch[0], 3, padding=1)
        self.mid_block = MidBlock(rch[0], g)
        self.up_blocks = nn.ModuleList([
            DecoderBlock(rch[max(i - 1, 0)], rch[i], cfg.layers_per_block + 1, g, up=i < len(rch) - 1,
                         temporal=cfg.add_temp_conv)
            for i in range(len(rch))])
        self.conv_norm_out = nn.GroupNorm(g, rch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(rch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z, frames: int = 1):
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x, frames)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class TemporalVAE(nn.Module):
    """Encoder, quant convs and the temporal decoder; `decode` mirrors the official vae.decode."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv2d(c, c, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N,3,H,W) in [-1,1] -> posterior (mean, logvar) stacked on channels (N,2C,h,w)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor, num_frames: int = 1) -> torch.Tensor:
        """z ((B F),C,h,w), frames b-major -> raw decoder output ((B F),3,H,W), before rescaling to [0,1].

        num_frames=1 is what the official pipeline does (temporal layers inactive, SPEC §4.1); num_frames=F runs
        the temporal convolutions over each video's F frames.
        """
        if num_frames < 1 or z.shape[0] % num_frames:
            raise ValueError(f"decode: {z.shape[0]} latents cannot be split into videos of num_frames={num_frames}")
        return self.decoder(self.post_quant_conv(z), num_frames)
