"""Backends behind one interface (`Backend`): each component writes into caller-owned buffers, so the loop cannot
tell them apart.

    text(ids (B,77) int64, out (B,77,D))
    unet(sample (N,C,F,h,w), timestep (N,) or (N,F) float32, context (N,77,D), out (N,C,F,h,w)[, cache: FeatureCache])
    vae(latents (B,C,F,h,w) already / scaling factor, out (B,F,3,H,W) raw decoder output, temporal: bool)

Exported graphs (ONNX Runtime sessions, TensorRT engines, AOTInductor packages: `Graph`) are bound from their export spec: the text and
UNet call's buffers are the spec's inputs then outputs, in the spec's order (`GraphBackend`), and one layout adapter
(`GraphVAE`) reorders the VAE's buffers for both exported decoders.
"""
from __future__ import annotations

import torch

from .base import Backend, Graph
from .graphs import GraphBackend, GraphVAE
from .pytorch import TorchText, TorchUNet, TorchVAE

BACKENDS = ("torch", "onnxruntime", "tensorrt", "aoti")
COMPONENTS = ("text", "unet", "vae")
__all__ = ["BACKENDS", "COMPONENTS", "Backend", "Graph", "GraphBackend", "GraphVAE", "TorchText", "TorchUNet",
           "TorchVAE", "make"]


def _cast(model, component: str, dtype: torch.dtype):
    """A shallow copy of `model` whose `component` network is a converted copy in `dtype`."""
    import copy
    attr = {"text": "text_encoder", "unet": "unet", "vae": "vae"}[component]
    clone = copy.copy(model)
    setattr(clone, attr, copy.deepcopy(getattr(model, attr)).to(dtype))
    return clone


def make(kind: str, component: str, model, dtype: torch.dtype, device: torch.device, *, export_dir=None,
         engine_dir=None, **torch_options) -> Backend:
    """The backend `kind` for `component` ('text', 'unet' or 'vae'); errors name what is missing. torch_options go
    to the torch backend of the component as they are (TorchUNet: compile, attention, fast_ops, fp8; TorchVAE: compile,
    channels_last, fast_ops); the other kinds take none."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose one of {BACKENDS}")
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; choose one of {COMPONENTS}")
    if kind != "torch" and (torch_options.get("compile") or torch_options.get("attention", "sdpa") != "sdpa"
                            or torch_options.get("fp8")):
        raise ValueError(f"compile, attention and fp8 options apply to the torch backend, not {kind}")
    if torch_options.get("channels_last") and (kind, component) != ("torch", "vae"):
        raise ValueError(f"channels_last (--vae-channels-last) applies to the torch VAE decoder, not the {kind} "
                         f"{component}")
    if kind == "torch":
        if model is None:
            raise ValueError("the torch backend needs the model's weights (--weights, --sd/--ckpt or --preset)")
        if model.device.type != device.type:
            raise ValueError(f"the model is loaded on {model.device}, the runtime runs on {device}: load it there")
        if model.dtype != dtype:  # a private copy of this component in the asked dtype (e.g. a bf16 VAE)
            model = _cast(model, component, dtype)
        torch_class = {"text": TorchText, "unet": TorchUNet, "vae": TorchVAE}[component]
        return torch_class(model, dtype, device, **torch_options)
    if kind == "onnxruntime":
        from . import ort  # imports onnxruntime lazily
        return ort.make(component, export_dir, device)
    if kind == "aoti":
        from . import aoti
        return aoti.make(component, export_dir, device)
    from . import trt  # imports tensorrt lazily and explains how to install it when missing
    return trt.make(component, engine_dir, dtype, device)
