"""Export-time module surgery (TensorRT-friendly graphs, same weights, same math) and the per-component wrappers.

Rewrites, each numerically equal to the reference (checked by `verify` before every export):
- frame embedding: a precomputed (F_MAX, C) table sliced by F, instead of building it in the graph (SPEC §5);
- temporal Conv3d (3,1,1): a Conv2d (3,1) on the 4-D view (B,C,F,h*w), GroupNorm on the same view;
- GroupNorm on 5-D tensors: run on the 4-D view (B,C,F*h,w), which has the same groups and statistics;
- the 5-D nearest up-sample (1,2,2): a 4-D x2 resize on the ((B F),C,h,w) frames.
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from vidrd.ref.unet_blocks import TemporalConv, TransformerBlock, Upsample, frame_embedding

from .spec import F_MAX, ComponentSpec


class GroupNorm4D(nn.GroupNorm):
    """nn.GroupNorm that runs 5-D input (B,C,F,h,w) on the view (B,C,F*h,w): same statistics, rank-4 graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)
        return super().forward(x.flatten(2, 3)).view_as(x)  # (B,C,F*h,w) -> (B,C,F,h,w)


class TemporalConv2d(nn.Module):
    """TemporalConv on the view (B,C,F,h*w): its Conv3d (3,1,1) become Conv2d (3,1) sharing the same weights."""

    def __init__(self, ref: TemporalConv):
        super().__init__()
        layers = []
        for m in ref.convs:
            if isinstance(m, nn.Conv3d):
                conv = nn.Conv2d(m.in_channels, m.out_channels, (3, 1), padding=(1, 0), device="meta")
                conv.weight = nn.Parameter(m.weight[..., 0], requires_grad=False)  # (C,C,3,1,1) -> (C,C,3,1)
                conv.bias = m.bias
                m = conv
            layers.append(m)
        self.convs = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] == 1:  # as the reference: images skip the layer (exported graphs require F >= 2)
            return x
        v = x.flatten(3)  # (B,C,F,h*w)
        h = v
        for layer in self.convs:
            h = layer(h)
        return (v + h).view_as(x)  # (B,C,F,h,w)


class TableTransformerBlock(TransformerBlock):
    """TransformerBlock whose frame embedding is sliced from the buffer `pe_table` (F_MAX,C): no in-graph PE."""

    def frame_embedding(self, frames: int, x: torch.Tensor) -> torch.Tensor:
        return self.pe_table[:frames]  # (F,C)


class Upsample4D(Upsample):
    """Upsample as a 4-D nearest x2 resize of the ((B F),C,h,w) frames, then the 3x3 conv."""

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        if size is not None:  # the forced-size path (h, w not multiples of 8): keep the reference's 5-D resize
            return super().forward(x, size)
        dtype = x.dtype
        f = x.transpose(1, 2).flatten(0, 1)  # ((B F),C,h,w)
        f = F.interpolate(f.float() if dtype == torch.bfloat16 else f, scale_factor=2.0, mode="nearest").to(dtype)
        y = self.conv(f)  # ((B F),C,2h,2w)
        return y.view(x.shape[0], x.shape[2], *y.shape[1:]).transpose(1, 2)  # (B,C,F,2h,2w)


def _copy(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of `module` whose tensors are the original ones (dtype None) or cast copies of them."""
    memo = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        if dtype is None or not t.is_floating_point():
            memo[id(t)] = t
        elif isinstance(t, nn.Parameter):
            memo[id(t)] = nn.Parameter(t.detach().to(dtype), requires_grad=False)
        else:
            memo[id(t)] = t.to(dtype)
    return copy.deepcopy(module, memo)


def rewrite(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of `module` with the TensorRT-friendly rewrites; the original is untouched (its tensors are shared)."""
    out = _copy(module, dtype)
    tables = {}
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TemporalConv):
                setattr(parent, name, TemporalConv2d(child))
    for m in out.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = GroupNorm4D
        elif type(m) is Upsample:
            m.__class__ = Upsample4D
        elif type(m) is TransformerBlock:
            m.__class__ = TableTransformerBlock
            c, dt = m.norm1.normalized_shape[0], m.norm1.weight.dtype
            if (c, dt) not in tables:  # one table per width, shared by the blocks (one initializer in the graph)
                tables[c, dt] = frame_embedding(F_MAX, c, dt, m.norm1.weight.device)  # (F_MAX,C)
            m.register_buffer("pe_table", tables[c, dt], persistent=False)
    return out


# ---------------------------------------------------------------------------------------------------- wrappers

class TextWrapper(nn.Module):
    """input_ids (B,77) int64 -> last_hidden_state (B,77,D)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids)


class UNetWrapper(nn.Module):
    """sample (N,4,F,h,w), timestep (N,) float32, encoder_hidden_states (N,77,D) -> noise_pred (N,4,F,h,w)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states)


class VAEDecodeWrapper(nn.Module):
    """Per-frame decode: latents (N,4,h,w) -> raw frames (N,3,H,W), as vae.decode(z, num_frames=1)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decoder(self.vae.post_quant_conv(latents), 1)


class VAETemporalDecodeWrapper(VAEDecodeWrapper):
    """Temporal decode: latents (B,4,F,h,w) -> raw frames (B,3,F,H,W), as vae.decode(z, num_frames=F) per video."""

    def forward(self, latents):
        z = latents.transpose(1, 2).flatten(0, 1)  # ((B F),4,h,w): frames b-major as vae.decode expects
        x = self.vae.decoder(self.vae.post_quant_conv(z), latents.shape[2])  # ((B F),3,H,W)
        return x.view(latents.shape[0], latents.shape[2], *x.shape[1:]).transpose(1, 2)  # (B,3,F,H,W)


def export_module(model, name: str, dtype: torch.dtype | None = None) -> nn.Module:
    """The module exported as component `name`: rewritten copy of the model's network, in `dtype`."""
    if name == "text_encoder":
        text = _copy(model.text_encoder, dtype)
        # Eager attention: the exporter's SDPA symbolic builds the causal mask in fp32, which breaks fp16 typing.
        text.text_model.config._attn_implementation = "eager"
        return TextWrapper(text).eval()
    if name == "unet":
        return UNetWrapper(rewrite(model.unet, dtype)).eval()
    if name in ("vae_decoder", "vae_decoder_temporal"):
        wrap = VAEDecodeWrapper if name == "vae_decoder" else VAETemporalDecodeWrapper
        return wrap(rewrite(model.vae, dtype)).eval()
    raise ValueError(f"unknown component {name!r}")


@torch.no_grad()
def reference(model, name: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference model's outputs for component `name` (unrewritten vidrd.ref networks), fp32."""
    if name == "text_encoder":
        return {"last_hidden_state": model.text_encoder(inputs["input_ids"])}
    if name == "unet":
        return {"noise_pred": model.unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"])}
    if name == "vae_decoder":
        return {"frames": model.vae.decode(inputs["latents"], num_frames=1)}
    if name == "vae_decoder_temporal":
        lat = inputs["latents"]
        b, c, f, h, w = lat.shape
        x = model.vae.decode(lat.transpose(1, 2).reshape(b * f, c, h, w), num_frames=f)  # ((B F),3,H,W)
        return {"frames": x.view(b, f, *x.shape[1:]).transpose(1, 2)}  # (B,3,F,H,W)
    raise ValueError(f"unknown component {name!r}")


def example_inputs(spec: ComponentSpec, dims: dict[str, int], cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs for `spec` at `dims` (float32; timesteps are integer-valued like DDIM's, ids below vocab)."""
    spec.check_dims(dims)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in spec.inputs:
        shape = t.resolve(dims)
        if t.name == "input_ids":
            out[t.name] = torch.randint(0, cfg.text.vocab_size, shape, generator=g)
        elif t.name == "timestep":
            out[t.name] = torch.randint(0, cfg.scheduler.num_train_timesteps, shape, generator=g).float()
        else:
            out[t.name] = torch.randn(shape, generator=g)
    return out


@torch.no_grad()
def verify(model, name: str, module: nn.Module, inputs: dict[str, torch.Tensor], tol: float = 1e-4) -> float:
    """Max abs difference between the rewritten fp32 `module` and the reference; ValueError above tol*scale."""
    ref = reference(model, name, inputs)
    got = module(*inputs.values())
    got = got if isinstance(got, (tuple, list)) else (got,)
    err = 0.0
    for (k, r), g in zip(ref.items(), got):
        assert r.shape == g.shape, (name, k, r.shape, g.shape)
        e = (r - g.float()).abs().max().item()
        if e > tol * max(1.0, r.abs().max().item()):
            raise ValueError(f"{name}: export rewrite differs from the reference on {k}: max abs error {e:.3g}")
        err = max(err, e)
    return err

