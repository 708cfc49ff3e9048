"""Backends behind one interface: each component writes into caller-owned buffers, so the loop cannot tell them apart.

    text(ids (B,77) int64, out (B,77,D))
    unet(sample (N,C,F,h,w), timestep (N,) float32, context (N,77,D), out (N,C,F,h,w))
    vae(latents (B,C,F,h,w) already / scaling factor, out (B,F,3,H,W) raw decoder output, temporal: bool)

`dtype` is the float dtype the backend wants its float inputs and outputs in; `device` where they must live.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vidrd.ref.attention import CrossKV, set_attention

log = logging.getLogger("vidrd.runtime")
BACKENDS = ("torch", "onnxruntime", "tensorrt")


class TorchText:
    """The reference CLIP text encoder, eager."""

    def __init__(self, model, dtype: torch.dtype, device: torch.device):
        self.net, self.dtype, self.device = model.text_encoder, dtype, device

    @torch.no_grad()
    def __call__(self, ids, out):
        out.copy_(self.net(ids))


class TorchUNet:
    """The reference UNet3D, eager or through torch.compile (CUDA graphs with mode='reduce-overhead' on a GPU)."""

    def __init__(self, model, dtype: torch.dtype, device: torch.device, compile: str | None = None,
                 attention: str = "sdpa"):
        self.dtype, self.device = dtype, device
        self.net = set_attention(model.unet, attention)
        self.fn = self.net if compile is None else _compiled(self.net, compile, device)
        self.cross_kv, self._kv_of = None, None  # eager: cross-attention keys/values of the current context

    @torch.no_grad()
    def __call__(self, sample, timestep, context, out):
        if self.fn is not self.net:  # compiled: the graph takes the context tensor
            out.copy_(self.fn(sample, timestep, context))
            return
        key = (context.data_ptr(), context.shape, context._version)  # the runtime writes the context once a request
        if key != self._kv_of:
            self.cross_kv, self._kv_of = CrossKV(self.net, context), key
        out.copy_(self.net(sample, timestep, self.cross_kv))


def _compiled(fn, mode: str, device: torch.device):
    """torch.compile for inference; on the CPU with freezing (weights as constants: prepacked oneDNN kernels)."""
    if device.type == "cpu":
        import torch._inductor.config as inductor
        inductor.freezing = True
    return torch.compile(fn, mode=mode, dynamic=False)


class TorchVAE:
    """The reference temporal VAE decoder: per frame (official) or with its temporal layers; optionally compiled."""

    def __init__(self, model, dtype: torch.dtype, device: torch.device, compile: str | None = None):
        self.vae, self.dtype, self.device = model.vae, dtype, device
        self.decode = self.vae.decode if compile is None else _compiled(self.vae.decode, compile, device)

    @torch.no_grad()
    def __call__(self, latents, out, temporal: bool):
        b, c, f, h, w = latents.shape
        z = latents.transpose(1, 2).reshape(b * f, c, h, w)  # ((B F),C,h,w) b-major
        x = self.decode(z, num_frames=f if temporal else 1)  # ((B F),3,H,W)
        out.view(b * f, *x.shape[1:]).copy_(x)


# ------------------------------------------------------------------------------------------------ ONNX Runtime

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


class OrtComponent:
    """One exported ONNX graph run with I/O binding straight into torch buffers (no copies on the CPU)."""

    def __init__(self, export_dir: Path, name: str, device: torch.device, threads: int | None = None):
        from vidrd.export.ort import make_session, session_provider
        from vidrd.export.spec import read_specs

        self.spec = read_specs(export_dir)[name]
        prefer = ("CPUExecutionProvider",) if device.type == "cpu" else \
            ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        fp16 = any(t.dtype == "float16" for t in self.spec.inputs + self.spec.outputs)
        # ORT's TensorRT provider builds an engine per process unless it has a cache and profile shapes: give it
        # the export's dim ranges (one engine covers every request the export takes) and a persistent cache folder.
        self.sess = make_session(Path(export_dir) / self.spec.file, prefer, threads=threads, fp16=fp16,
                                 cache_dir=ort_trt_cache_dir(), trt_options=trt_profile_options(self.spec))
        self.provider = session_provider(self.sess)
        if device.type == "cuda" and self.provider == "CPUExecutionProvider":
            raise RuntimeError(f"{name}: onnxruntime ran on the CPU although device is {device}: install "
                               "onnxruntime-gpu (instead of onnxruntime) with CUDA libraries matching it")
        self.device = device
        self.dtype = torch.float16 if self.spec.inputs[0].dtype == "float16" or \
            self.spec.outputs[0].dtype == "float16" else torch.float32
        self.binding = self.sess.io_binding()
        log.info("%s: onnxruntime on %s", name, self.provider)

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        b, dev = self.binding, ("cuda" if self.device.type == "cuda" else "cpu")
        idx = self.device.index or 0
        for name, t in {**inputs, **outputs}.items():
            assert t.is_contiguous(), f"{self.spec.name}.{name}: buffer must be contiguous, got strides {t.stride()}"
        for name, t in inputs.items():
            b.bind_input(name, dev, idx, _NP[t.dtype], tuple(t.shape), t.data_ptr())
        for name, t in outputs.items():
            b.bind_output(name, dev, idx, _NP[t.dtype], tuple(t.shape), t.data_ptr())
        if self.device.type == "cuda":
            # The inputs were written on torch's current stream (the main stream for the UNet, the decode stream for
            # the VAE) and ORT runs on a stream of its own: wait for that work before ORT reads them, and for ORT's
            # stream to finish before torch reads the outputs.
            torch.cuda.current_stream(self.device).synchronize()
            b.synchronize_inputs()
            self.sess.run_with_iobinding(b)
            b.synchronize_outputs()
            return
        self.sess.run_with_iobinding(b)


def ort_trt_cache_dir() -> Path:
    """Engine and timing cache of ORT's TensorRT provider: $VIDRD_ORT_TRT_CACHE, else ~/.cache/vidrd/ort-trt."""
    import os
    base = os.environ.get("VIDRD_ORT_TRT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                         Path.home() / ".cache") / "vidrd" / "ort-trt"
    return Path(base)


def trt_profile_options(spec) -> dict[str, str]:
    """trt_profile_{min,opt,max}_shapes for ORT's TensorRT provider: every input over the export's dim ranges."""
    out = {}
    for at in ("min", "opt", "max"):
        dims = {k: getattr(d, at) for k, d in spec.dims.items()}
        out[f"trt_profile_{at}_shapes"] = ",".join(
            f"{t.name}:{'x'.join(map(str, t.resolve(dims)))}" for t in spec.inputs)
    return out


def _check(spec, dims: dict) -> None:
    """The export's dim ranges (spec) must hold the request: else a ValueError naming the dim and the re-export."""
    try:
        spec.check_dims(dims)
    except ValueError as e:
        raise ValueError(f"the exported {spec.name} cannot run this request: {e}; re-export with `vidrd export` "
                         "(the ranges are in its manifest.json) or use the torch backend") from None


class OrtText:
    def __init__(self, export_dir, dtype, device):
        self.c = OrtComponent(export_dir, "text_encoder", device)
        self.dtype, self.device = self.c.dtype, device

    def check_shapes(self, batch, frames, height, width, *, guidance=True, temporal=False):
        _check(self.c.spec, {"B": 2 * batch if guidance else batch})

    def __call__(self, ids, out):
        self.c.run({"input_ids": ids}, {"last_hidden_state": out})


class OrtUNet:
    def __init__(self, export_dir, dtype, device):
        self.c = OrtComponent(export_dir, "unet", device)
        self.dtype, self.device = self.c.dtype, device

    def check_shapes(self, batch, frames, height, width, *, guidance=True, temporal=False):
        _check(self.c.spec, {"N": 2 * batch if guidance else batch, "F": frames, "h": height // 8, "w": width // 8})

    def __call__(self, sample, timestep, context, out):
        self.c.run({"sample": sample, "timestep": timestep, "encoder_hidden_states": context}, {"noise_pred": out})


class OrtVAE:
    """Per-frame decode through `vae_decoder.onnx`, temporal through `vae_decoder_temporal.onnx` (loaded on use).

    The graphs' layouts differ from the runtime's, so each keeps one scratch tensor per shape (made on first use).
    """

    def __init__(self, export_dir, dtype, device):
        self.export_dir, self.device = export_dir, device
        self.per_frame = OrtComponent(export_dir, "vae_decoder", device)
        self.temporal = None
        self.dtype = self.per_frame.dtype
        self.scratch: dict[tuple, torch.Tensor] = {}

    def check_shapes(self, batch, frames, height, width, *, guidance=True, temporal=False):
        from vidrd.export.spec import read_specs
        if temporal:
            _check(read_specs(self.export_dir)["vae_decoder_temporal"],
                   {"B": batch, "F": frames, "h": height // 8, "w": width // 8})
        else:
            _check(self.per_frame.spec, {"N": batch * frames, "h": height // 8, "w": width // 8})

    def _buf(self, shape):
        if shape not in self.scratch:
            self.scratch[shape] = torch.empty(shape, dtype=self.dtype, device=self.device)
        return self.scratch[shape]

    def __call__(self, latents, out, temporal: bool):
        b, c, f, h, w = latents.shape
        if temporal:
            if self.temporal is None:
                self.temporal = OrtComponent(self.export_dir, "vae_decoder_temporal", self.device)
            frames = self._buf((b, 3, f, *out.shape[-2:]))  # (B,3,F,H,W) as the graph writes it
            self.temporal.run({"latents": latents}, {"frames": frames})
            out.copy_(frames.transpose(1, 2))
            return
        z = self._buf((b, f, c, h, w))  # ((B F),C,h,w) frames b-major, as the per-frame graph takes them
        z.copy_(latents.transpose(1, 2))
        self.per_frame.run({"latents": z.view(b * f, c, h, w)}, {"frames": out.view(b * f, *out.shape[2:])})


def _cast(model, component: str, dtype: torch.dtype):
    """A shallow copy of `model` whose `component` network is a converted copy in `dtype`."""
    import copy
    attr = {"text": "text_encoder", "unet": "unet", "vae": "vae"}[component]
    clone = copy.copy(model)
    setattr(clone, attr, copy.deepcopy(getattr(model, attr)).to(dtype))
    return clone


def make(kind: str, component: str, model, dtype: torch.dtype, device: torch.device, *, export_dir=None,
         engine_dir=None, compile: str | None = None, attention: str = "sdpa"):
    """The backend `kind` for `component` ('text', 'unet' or 'vae'); errors name what is missing."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {BACKENDS}")
    if kind != "torch" and (compile or attention != "sdpa"):
        raise ValueError(f"compile and attention options apply to the torch backend, not {kind}")
    if kind == "torch":
        if model is None:
            raise ValueError("the torch backend needs the model's weights (--weights, --sd/--ckpt or --preset)")
        if model.device.type != device.type:
            raise ValueError(f"the model is loaded on {model.device}, the runtime runs on {device}: load it there")
        if model.dtype != dtype:  # a private copy of this component in the asked dtype (e.g. a bf16 VAE)
            model = _cast(model, component, dtype)
        if component == "unet":
            return TorchUNet(model, dtype, device, compile, attention)
        if component == "vae":
            return TorchVAE(model, dtype, device, compile)
        return TorchText(model, dtype, device)
    if kind == "onnxruntime":
        if export_dir is None:
            raise ValueError("the onnxruntime backend needs --onnx DIR (made by `vidrd export`)")
        return {"text": OrtText, "unet": OrtUNet, "vae": OrtVAE}[component](export_dir, dtype, device)
    from . import trt_backend  # imports tensorrt lazily and explains how to install it when missing
    return trt_backend.make(component, engine_dir, dtype, device)
