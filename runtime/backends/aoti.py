"""The aoti backend: a `vidrd export --format aoti` folder of AOTInductor packages, run without Python model code.

Everything about a component (file, tensor names, dtypes, dim ranges) comes from the export's manifest.json
(`vidrd.export.spec`), bound like the other exported graphs (GraphBackend, GraphVAE). A package returns tensors it
allocated itself (AOTInductor has no output binding): each call copies them into the caller's buffers.
"""
from __future__ import annotations

from pathlib import Path

import torch

from vidrd.export.spec import ComponentSpec, read_specs

from .base import Backend, Graph
from .graphs import bind


def load_package(path: Path, device: torch.device):
    """An AOTInductor package as a callable on `device` (its CUDA index, where it has one)."""
    index = device.index if device.type == "cuda" and device.index is not None else -1
    return torch._inductor.aoti_load_package(str(path), device_index=index)


class AotiGraph(Graph):
    """One exported component in an AOTInductor package, its buffers bound by the spec's tensor names."""

    def __init__(self, export_dir: Path, spec: ComponentSpec, device: torch.device):
        self.spec, self.device = spec, device
        self.dtype = spec.outputs[0].torch_dtype
        self.fn = load_package(Path(export_dir) / spec.file, device)

    def check(self, batch, frames, height, width, guidance):
        """The export's dim ranges must hold the request: else a ValueError naming the dim and the re-export."""
        try:
            self.spec.check_dims(self.spec.request_dims(batch, frames, height, width, guidance))
        except ValueError as e:
            raise ValueError(f"the exported {self.spec.name} cannot run this request: {e}; re-export with `vidrd "
                             "export --format aoti` (the ranges are in its manifest.json) or use the torch backend") \
                from None

    def run(self, tensors: dict[str, torch.Tensor]) -> None:
        args = []
        for name in self.spec.input_names:
            t = tensors[name]
            assert t.is_contiguous(), f"{self.spec.name}.{name}: buffer must be contiguous, got strides {t.stride()}"
            args.append(t)
        with torch.no_grad():
            got = self.fn(*args)
        for name, t in zip(self.spec.output_names, (got,) if isinstance(got, torch.Tensor) else got):
            tensors[name].copy_(t)


def make(component: str, export_dir, device: torch.device) -> Backend:
    """The aoti backend for `component` ('text', 'unet' or 'vae'); the export's precision sets its dtype."""
    from vidrd.export.aoti_export import read_manifest

    if export_dir is None:
        raise ValueError("the aoti backend needs --onnx DIR (make it with `vidrd export --format aoti --out DIR`)")
    manifest = read_manifest(export_dir)
    if manifest is None:
        raise FileNotFoundError(f"no manifest.json in {export_dir} (make one with `vidrd export --format aoti --out "
                                f"{export_dir}`)")
    if manifest["device"] != device.type:
        raise ValueError(f"the AOTInductor packages in {export_dir} were compiled for {manifest['device']}, the "
                         f"runtime runs on {device.type}: export them there (`vidrd export --format aoti --device "
                         f"{device.type}`)")
    specs = read_specs(export_dir)

    return bind(component, specs, lambda spec: AotiGraph(Path(export_dir), spec, device), device, f"vidrd export --format aoti --out {export_dir}")
