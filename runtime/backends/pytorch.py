"""The reference networks as backends: the CLIP text encoder, the UNet3D (eager or compiled, optional fast ops and
attention kernels) and the temporal VAE decoder (optional channels-last). Each runs the caller's model or a copy
that shares its weights: the caller's model is never changed."""
from __future__ import annotations

import torch

from vidrd.export.spec import LATENT
from vidrd.ref.attention import Attention, CrossKV, set_attention

from . import fast_ops as fast_ops_module
from .base import Backend


class TorchText(Backend):
    """The reference CLIP text encoder, eager."""

    def __init__(self, model, dtype: torch.dtype, device: torch.device):
        self.net, self.dtype, self.device = model.text_encoder, dtype, device

    @torch.no_grad()
    def __call__(self, ids, out):
        out.copy_(self.net(ids))


class TorchUNet(Backend):
    """The reference UNet3D, eager or through torch.compile (CUDA graphs with mode='reduce-overhead' on a GPU);
    fp8: its GEMMs in FP8 on a copy (runtime.precision.check_fp8 decides where that may run)."""

    def __init__(self, model, dtype: torch.dtype, device: torch.device, compile: str | None = None,
                 attention: str = "sdpa", fast_ops: bool = False, fp8: bool = False):
        self.dtype, self.device = dtype, device
        self.net = model.unet
        if fp8:  # a private copy with FP8 linear layers and 1x1 convolutions (backends/fp8.py)
            from .fp8 import fp8_copy
            self.net = fp8_copy(self.net, dtype=dtype)
        if any(isinstance(m, Attention) and m.backend != attention for m in self.net.modules()):
            self.net = set_attention(fast_ops_module.shared_copy(self.net), attention)  # the caller's stays as is
        if fast_ops:  # a copy sharing the weights (runtime/fast_ops.py); chunked attention is eager-only
            self.net = fast_ops_module.apply(self.net, chunked_attention=compile is None)
        self.fn = self.net if compile is None else _compiled(self.net, compile, device)
        # A compiled graph takes tensors only; a FeatureCache holds a tensor between calls (runtime/README.md, quality presets).
        self.feature_cache = compile is None
        self.frame_timesteps = True  # timestep (N,F): diagonal denoising (vidrd.ref.unet.UNet3D.forward)
        # eager: cross-attention keys/values of the request's context and, under guidance reuse, of its conditional
        # half (a view of it), keyed on the view; new_context() drops them when a request writes a new context
        self.cross_kv: dict[tuple, CrossKV] = {}

    def new_context(self) -> None:
        self.cross_kv.clear()

    @torch.no_grad()
    def __call__(self, sample, timestep, context, out, cache=None):
        if self.fn is not self.net:  # compiled: the graph takes the context tensor
            assert cache is None, "the compiled UNet takes no FeatureCache"
            out.copy_(self.fn(sample, timestep, context))
            return
        key = (context.data_ptr(), tuple(context.shape), tuple(context.stride()))
        kv = self.cross_kv.get(key)
        if kv is None:
            kv = self.cross_kv[key] = CrossKV(self.net, context)
        out.copy_(self.net(sample, timestep, kv, cache=cache))  # cache None: the plain forward


def _compiled(fn, mode: str, device: torch.device):
    """torch.compile for inference; on the CPU with freezing (weights as constants: prepacked oneDNN kernels), set
    for this graph only: the mode's own inductor options plus freezing, not the process-wide inductor config."""
    if device.type == "cpu":
        from torch._inductor import list_mode_options
        return torch.compile(fn, options={**list_mode_options(mode, dynamic=False), "freezing": True}, dynamic=False)
    return torch.compile(fn, mode=mode, dynamic=False)


class TorchVAE(Backend):
    """The reference temporal VAE decoder: per frame (official) or with its temporal layers; optionally compiled.

    channels_last (--vae-channels-last, opt-in: not bit-exact): the decoder's 2-D convolutions run in channels-last
    memory format, about 1.2x faster on the CPU. Its Conv2d weights are converted once, here, in a private copy of
    the decoder (the model's own VAE, which the reference sampler may share, stays as it is; the Conv3d weights are
    rank 5 and stay too); each call copies the latents into a channels-last scratch buffer sized by check_shapes at
    setup (else on first use), the one copy the default layout also makes for a batch over 1.
    """

    def __init__(self, model, dtype: torch.dtype, device: torch.device, compile: str | None = None,
                 channels_last: bool = False, fast_ops: bool = False):
        self.vae, self.dtype, self.device = model.vae, dtype, device
        self.channels_last = channels_last
        if channels_last:
            self.vae = _channels_last_decoder(self.vae)
        if fast_ops:  # temporal convolutions as 2-D ones (runtime/fast_ops.py)
            self.vae = fast_ops_module.apply(self.vae, chunked_attention=False)
        # --fast-ops on the CPU: the per-frame decode one frame per call (fresh pages cost more than the batch saves)
        self.frame_at_a_time = fast_ops and device.type == "cpu"
        self.scratch = torch.empty(0, dtype=dtype, device=device)  # channels_last: ((B F),h,w,C) latents
        self.decode = self.vae.decode if compile is None else _compiled(self.vae.decode, compile, device)

    def _buf(self, n: int) -> torch.Tensor:
        if self.scratch.numel() < n:
            self.scratch = torch.empty(n, dtype=self.dtype, device=self.device)
        return self.scratch[:n]

    def check_shapes(self, batch, frames, height, width, *, guidance=True, temporal=False):
        """Any request runs; with channels_last, size the scratch for it (at setup: for the largest request)."""
        if self.channels_last:
            self._buf(batch * frames * self.vae.cfg.latent_channels * (height // LATENT) * (width // LATENT))

    @torch.no_grad()
    def __call__(self, latents, out, temporal: bool):
        b, c, f, h, w = latents.shape
        if self.channels_last:  # ((B F),C,h,w) b-major, channels-last: strides (h w C, 1, w C, C)
            z = self._buf(b * f * h * w * c).view(b, f, h, w, c)
            z.copy_(latents.permute(0, 2, 3, 4, 1))
            z = z.view(b * f, h, w, c).permute(0, 3, 1, 2)
        else:
            z = latents.transpose(1, 2).reshape(b * f, c, h, w)  # ((B F),C,h,w) b-major
        if self.frame_at_a_time and not temporal:
            frames = out.view(b * f, *out.shape[-3:])  # ((B F),3,H,W)
            for i in range(b * f):
                frames[i:i + 1].copy_(self.decode(z[i:i + 1], num_frames=1))
            return
        x = self.decode(z, num_frames=f if temporal else 1)  # ((B F),3,H,W)
        out.view(b * f, *x.shape[1:]).copy_(x)


def _channels_last_decoder(vae):
    """A copy of `vae` sharing every tensor with it but the Conv2d weights of its decoder (post_quant_conv and
    decoder), which are channels-last copies. Conv3d weights (the temporal layers) are rank 5: left as they are."""
    clone = fast_ops_module.shared_copy(vae)
    for m in (*clone.post_quant_conv.modules(), *clone.decoder.modules()):
        if isinstance(m, torch.nn.Conv2d):
            w = m.weight
            m.weight = torch.nn.Parameter(w.detach().clone(memory_format=torch.channels_last),
                                          requires_grad=w.requires_grad)
    return clone
