"""Exported graphs (ONNX Runtime sessions, TensorRT engines) behind the runtime's buffers: the text encoder and the
UNet bound by their spec's tensor names (`GraphBackend`), the VAE decoders through one layout adapter (`GraphVAE`)."""
from __future__ import annotations

import math

import torch

from vidrd.export.spec import LATENT

from .base import Backend, Graph


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


def bind(component: str, specs: dict, open_graph, device: torch.device, redo: str) -> Backend:
    """The backend of `component` ('text', 'unet' or 'vae') over an export's graphs: `open_graph(spec)` opens one
    (ONNX Runtime session, AOTInductor package); `redo` is the export command that makes a missing one."""
    def load(name: str) -> Graph:
        if name not in specs:
            raise FileNotFoundError(f"the export has no {name}: redo it with `{redo} --components {name}`")
        return open_graph(specs[name])

    if component == "vae":
        first = load("vae_decoder")  # the per-frame decoder now; the temporal one on its first use
        return GraphVAE(lambda name: first if name == "vae_decoder" else load(name), first.dtype, device)
    return GraphBackend(load({"text": "text_encoder", "unet": "unet"}[component]), device)
