"""The interface every backend implements (`Backend`) and the one exported graphs implement (`Graph`)."""
from __future__ import annotations

import abc

import torch

from vidrd.export.spec import ComponentSpec


class Backend(abc.ABC):
    """One component on one backend. `dtype`: the float dtype of its float inputs and outputs; `device`: where they
    live. Calls write into the caller's buffers (shapes in the module docstring). `feature_cache`: a UNet that takes
    a vidrd.ref.reuse.FeatureCache after its buffers (UNet feature reuse); exported graphs cannot. `frame_timesteps`:
    a UNet that takes a timestep per frame, (N,F) (continuation "fifo"); exported graphs take (N,) only."""
    dtype: torch.dtype
    device: torch.device
    feature_cache: bool = False
    frame_timesteps: bool = False

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
