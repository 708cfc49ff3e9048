"""The onnxruntime backend: a `vidrd export` folder run with I/O binding straight into the runtime's buffers (no
copies on the CPU), on the best execution provider this onnxruntime build offers (TensorRT EP > CUDA EP > CPU).

Everything about a component (file, tensor names, dtypes, dim ranges) comes from the export's manifest.json
(`vidrd.export.spec`); the runtime's call order is bound by runtime/backends.py (GraphBackend, GraphVAE).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from vidrd.export.spec import ComponentSpec, read_specs

from .base import Backend, Graph
from .graphs import bind

log = logging.getLogger("vidrd.runtime")
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


class OrtGraph(Graph):
    """One exported ONNX graph in an InferenceSession, its buffers bound by the spec's tensor names."""

    def __init__(self, export_dir: Path, spec: ComponentSpec, device: torch.device, threads: int | None = None):
        from vidrd.export.ort import make_session, session_provider

        self.spec, self.device = spec, device
        prefer = ("CPUExecutionProvider",) if device.type == "cpu" else \
            ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        fp16 = any(t.dtype == "float16" for t in spec.inputs + spec.outputs)
        # ORT's TensorRT provider builds an engine per process unless it has a cache and profile shapes: give it
        # the export's dim ranges (one engine covers every request the export takes) and a persistent cache folder.
        self.sess = make_session(Path(export_dir) / spec.file, prefer, threads=threads, fp16=fp16,
                                 cache_dir=ort_trt_cache_dir(), trt_options=trt_profile_options(spec))
        self.provider = session_provider(self.sess)
        if device.type == "cuda" and self.provider == "CPUExecutionProvider":
            raise RuntimeError(f"{spec.name}: onnxruntime ran on the CPU although device is {device}: install "
                               "onnxruntime-gpu (instead of onnxruntime) with CUDA libraries matching it")
        self.dtype = torch.float16 if fp16 else torch.float32
        self.binding = self.sess.io_binding()
        log.info("%s: onnxruntime on %s", spec.name, self.provider)

    def check(self, batch, frames, height, width, guidance):
        """The export's dim ranges must hold the request: else a ValueError naming the dim and the re-export."""
        try:
            self.spec.check_dims(self.spec.request_dims(batch, frames, height, width, guidance))
        except ValueError as e:
            raise ValueError(f"the exported {self.spec.name} cannot run this request: {e}; re-export with `vidrd "
                             "export` (the ranges are in its manifest.json) or use the torch backend") from None

    def run(self, tensors: dict[str, torch.Tensor]) -> None:
        b, dev = self.binding, ("cuda" if self.device.type == "cuda" else "cpu")
        idx = self.device.index or 0
        inputs = self.spec.input_names
        for name, t in tensors.items():
            assert t.is_contiguous(), f"{self.spec.name}.{name}: buffer must be contiguous, got strides {t.stride()}"
            bind = b.bind_input if name in inputs else b.bind_output
            bind(name, dev, idx, _NP[t.dtype], tuple(t.shape), t.data_ptr())
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
    base = os.environ.get("VIDRD_ORT_TRT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                         Path.home() / ".cache") / "vidrd" / "ort-trt"
    return Path(base)


def trt_profile_options(spec: ComponentSpec) -> dict[str, str]:
    """trt_profile_{min,opt,max}_shapes for ORT's TensorRT provider: the spec's profile (every input over the
    export's dim ranges) in ORT's spelling."""
    profile = spec.profile()  # input -> (min, opt, max) shapes
    return {f"trt_profile_{at}_shapes": ",".join(f"{name}:{'x'.join(map(str, shapes[i]))}"
                                                 for name, shapes in profile.items())
            for i, at in enumerate(("min", "opt", "max"))}


def make(component: str, export_dir, device: torch.device) -> Backend:
    """The onnxruntime backend for `component` ('text', 'unet' or 'vae'); the export's precision sets its dtype."""
    if export_dir is None:
        raise ValueError("the onnxruntime backend needs --onnx DIR (make it with `vidrd export --out DIR`)")
    specs = read_specs(export_dir)
    if any(not s.file.endswith(".onnx") for s in specs.values()):
        raise ValueError(f"{export_dir} holds AOTInductor packages, not ONNX files: run them with --backend aoti, or "
                         "export ONNX files to another folder (`vidrd export --out DIR`)")

    return bind(component, specs, lambda spec: OrtGraph(Path(export_dir), spec, device), device, f"vidrd export --out {export_dir}")
