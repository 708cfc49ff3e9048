"""Backends behind one interface (`Backend`): each component writes into caller-owned buffers, so the loop cannot
tell them apart.

    text(ids (B,77) int64, out (B,77,D))
    unet(sample (N,C,F,h,w), timestep (N,) float32, context (N,77,D), out (N,C,F,h,w)[, cache: FeatureCache])
    vae(latents (B,C,F,h,w) already / scaling factor, out (B,F,3,H,W) raw decoder output, temporal: bool)

Exported graphs (ONNX Runtime sessions, TensorRT engines: `Graph`) are bound from their export spec: the text and
UNet call's buffers are the spec's inputs then outputs, in the spec's order (`GraphBackend`), and one layout adapter
(`GraphVAE`) reorders the VAE's buffers for both exported decoders.
"""
from __future__ import annotations

import abc
import math

import torch

from vidrd.export.spec import LATENT, ComponentSpec
from vidrd.ref.attention import Attention, CrossKV, set_attention

from . import fast_ops as fast_ops_module

BACKENDS = ("torch", "onnxruntime", "tensorrt")
COMPONENTS = ("text", "unet", "vae")


class Backend(abc.ABC):
    """One component on one backend. `dtype`: the float dtype of its float inputs and outputs; `device`: where they
    live. Calls write into the caller's buffers (shapes in the module docstring). `feature_cache`: a UNet that takes
    a vidrd.ref.reuse.FeatureCache after its buffers (UNet feature reuse, issue 14); exported graphs cannot."""
    dtype: torch.dtype
    device: torch.device
    feature_cache: bool = False

    def check_shapes(self, batch: int, frames: int, height: int, width: int, *, guidance: bool = True,
                     temporal: bool = False) -> None:
        """ValueError (naming the dim and what fixes it) when B prompts of F frames at H x W pixels cannot run;
        backends without fixed shape ranges take any request."""

    @abc.abstractmethod
    def __call__(self, *buffers) -> None:
        """Read the inputs and write the outputs, all caller-owned buffers."""

    def new_context(self) -> None:
        """The caller wrote a new text context into its buffer (a new request): drop anything derived from the old."""


class Graph(abc.ABC):
    """One exported component (an ONNX Runtime session or a TensorRT engine), bound by its spec's tensor names."""
    spec: ComponentSpec
    dtype: torch.dtype

    @abc.abstractmethod
    def check(self, batch: int, frames: int, height: int, width: int, guidance: bool) -> None:
        """ValueError unless the request's dims (spec.request_dims) lie in this graph's ranges."""

    @abc.abstractmethod
    def run(self, tensors: dict[str, torch.Tensor]) -> None:
        """Execute with every input and output of the spec, by name, as contiguous buffers."""


class TorchText(Backend):
    """The reference CLIP text encoder, eager."""

    def __init__(self, model, dtype: torch.dtype, device: torch.device):
        self.net, self.dtype, self.device = model.text_encoder, dtype, device

    @torch.no_grad()
    def __call__(self, ids, out):
        out.copy_(self.net(ids))


class TorchUNet(Backend):
    """The reference UNet3D, eager or through torch.compile (CUDA graphs with mode='reduce-overhead' on a GPU)."""

    def __init__(self, model, dtype: torch.dtype, device: torch.device, compile: str | None = None,
                 attention: str = "sdpa", fast_ops: bool = False):
        self.dtype, self.device = dtype, device
        self.net = model.unet
        if any(isinstance(m, Attention) and m.backend != attention for m in self.net.modules()):
            self.net = set_attention(fast_ops_module.shared_copy(self.net), attention)  # the caller's stays as is
        if fast_ops:  # a copy sharing the weights (runtime/fast_ops.py); chunked attention is eager-only
            self.net = fast_ops_module.apply(self.net, chunked_attention=compile is None)
        self.fn = self.net if compile is None else _compiled(self.net, compile, device)
        # A compiled graph takes tensors only; a FeatureCache holds a tensor between calls (see README, presets).
        self.feature_cache = compile is None
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


# ------------------------------------------------------------------------------------- exported graphs


class GraphBackend(Backend):
    """The text encoder or the UNet as an exported graph: the call's buffers are the spec's inputs, then outputs."""

    def __init__(self, graph: Graph, device: torch.device):
        self.graph, self.dtype, self.device = graph, graph.dtype, device
        self.names = graph.spec.input_names + graph.spec.output_names

    def check_shapes(self, batch, frames, height, width, *, guidance=True, temporal=False):
        self.graph.check(batch, frames, height, width, guidance)

    def __call__(self, *buffers):
        assert len(buffers) == len(self.names), f"{self.graph.spec.name} takes {self.names}, got {len(buffers)}"
        self.graph.run(dict(zip(self.names, buffers)))


class GraphVAE(Backend):
    """The exported VAE decoders behind the runtime's layout, for ONNX Runtime and TensorRT alike.

    `vae_decoder` decodes frames ((B F),C,h,w) -> ((B F),3,H,W); `vae_decoder_temporal` videos (B,C,F,h,w) ->
    (B,3,F,H,W). The runtime holds (B,C,F,h,w) latents and wants (B,F,3,H,W) frames, so one scratch buffer, sized
    by check_shapes at setup (else on first use), holds the reordered latents or frames. `load(name)` opens a graph;
    the temporal decoder is opened on its first use.
    """

    def __init__(self, load, dtype: torch.dtype, device: torch.device, per_frame: bool = True):
        self.load, self.dtype, self.device = load, dtype, device
        self.graphs: dict[str, Graph] = {}
        if per_frame:
            self.graph("vae_decoder")
        self.scratch = torch.empty(0, dtype=dtype, device=device)

    def graph(self, name: str) -> Graph:
        if name not in self.graphs:
            self.graphs[name] = self.load(name)
        return self.graphs[name]

    @property
    def temporal(self) -> Graph | None:
        """The temporal decoder once it was opened."""
        return self.graphs.get("vae_decoder_temporal")

    def _buf(self, shape: tuple) -> torch.Tensor:
        n = math.prod(shape)
        if self.scratch.numel() < n:
            self.scratch = torch.empty(n, dtype=self.dtype, device=self.device)
        return self.scratch[:n].view(shape)

    def check_shapes(self, batch, frames, height, width, *, guidance=True, temporal=False):
        """Check the decoder a request uses (the temporal one only when temporal) and size the scratch for it."""
        graph = self.graph("vae_decoder_temporal" if temporal else "vae_decoder")
        graph.check(batch, frames, height, width, guidance)
        c, h, w = graph.spec.inputs[0].shape[1], height // LATENT, width // LATENT
        self._buf((batch, 3, frames, height, width) if temporal else (batch, frames, c, h, w))

    def __call__(self, latents, out, temporal: bool):
        b, c, f, h, w = latents.shape
        if temporal:
            frames = self._buf((b, out.shape[2], f, *out.shape[-2:]))  # (B,3,F,H,W) as the graph writes it
            self.graph("vae_decoder_temporal").run({"latents": latents, "frames": frames})
            out.copy_(frames.transpose(1, 2))
            return
        z = self._buf((b, f, c, h, w))  # ((B F),C,h,w) frames b-major, as the per-frame graph takes them
        z.copy_(latents.transpose(1, 2))
        self.graph("vae_decoder").run({"latents": z.view(b * f, c, h, w), "frames": out.view(b * f, *out.shape[2:])})


def _cast(model, component: str, dtype: torch.dtype):
    """A shallow copy of `model` whose `component` network is a converted copy in `dtype`."""
    import copy
    attr = {"text": "text_encoder", "unet": "unet", "vae": "vae"}[component]
    clone = copy.copy(model)
    setattr(clone, attr, copy.deepcopy(getattr(model, attr)).to(dtype))
    return clone


def make(kind: str, component: str, model, dtype: torch.dtype, device: torch.device, *, export_dir=None,
         engine_dir=None, compile: str | None = None, attention: str = "sdpa", channels_last: bool = False,
         fast_ops: bool = False) -> Backend:
    """The backend `kind` for `component` ('text', 'unet' or 'vae'); errors name what is missing. channels_last:
    the torch VAE decoder's 2-D convolutions in channels-last memory format (TorchVAE); fast_ops: the torch UNet's
    and VAE decoder's faster, not bit-exact kernels (runtime/fast_ops.py; the text encoder has none)."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {BACKENDS}")
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; choose one of {COMPONENTS}")
    if kind != "torch" and (compile or attention != "sdpa"):
        raise ValueError(f"compile and attention options apply to the torch backend, not {kind}")
    if channels_last and (kind, component) != ("torch", "vae"):
        raise ValueError(f"channels_last (--vae-channels-last) applies to the torch VAE decoder, not the {kind} "
                         f"{component}")
    if kind == "torch":
        if model is None:
            raise ValueError("the torch backend needs the model's weights (--weights, --sd/--ckpt or --preset)")
        if model.device.type != device.type:
            raise ValueError(f"the model is loaded on {model.device}, the runtime runs on {device}: load it there")
        if model.dtype != dtype:  # a private copy of this component in the asked dtype (e.g. a bf16 VAE)
            model = _cast(model, component, dtype)
        if component == "unet":
            return TorchUNet(model, dtype, device, compile, attention, fast_ops)
        if component == "vae":
            return TorchVAE(model, dtype, device, compile, channels_last, fast_ops)
        return TorchText(model, dtype, device)
    if kind == "onnxruntime":
        from . import ort_backend  # imports onnxruntime lazily
        return ort_backend.make(component, export_dir, device)
    from . import trt_backend  # imports tensorrt lazily and explains how to install it when missing
    return trt_backend.make(component, engine_dir, dtype, device)
