"""The tensorrt backend: engines from `vidrd build-engines`, run into the runtime's buffers (the interface of
runtime/backends.py, which binds them by the spec each sidecar records) on a stream of their own, ordered with
torch's current stream both ways (enqueueing on the legacy default stream makes TensorRT synchronise around every
call).

Each engine has one optimisation profile and one execution context. Buffers are bound by tensor name and rebound
only when a shape or an address changes. Engines built with --static capture a CUDA graph of the execute call after
one eager run and replay it while shapes and addresses stay the same (as NVIDIA's diffusion demo).

Setup check, before any work: `backend.check_shapes(batch, frames, height, width, guidance=True, temporal=False)`
raises EngineMismatch (a ValueError) naming the dim, the engine's range and the rebuild command when a request falls
outside the engine's profile. Every call checks the same when its shapes change.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from vidrd.export import engines
from vidrd.export.spec import ComponentSpec

from .base import Backend, Graph
from .graphs import GraphBackend, GraphVAE

log = logging.getLogger("vidrd.runtime")
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FLAG = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _sidecar(engine_dir, name: str, dtype: torch.dtype) -> dict:
    """The sidecar of engine `name`, checked against the runtime dtype (no TensorRT needed)."""
    sidecar = engines.read_sidecar(engine_dir, name)
    io = _TORCH[sidecar["flags"]["io_dtype"]]
    if io != dtype:
        flag = "--vae-dtype" if sidecar["component"].startswith("vae") else "--dtype"
        raise engines.EngineMismatch(
            f"{sidecar['engine']} takes {io} inputs and outputs (built with --precision {sidecar['precision']}) but "
            f"the runtime dtype is {dtype}: run with {flag} {sidecar['precision']}, or rebuild the engines with "
            f"`vidrd build-engines --onnx {sidecar['onnx_dir']} --out {engine_dir} --precision "
            f"{_FLAG.get(dtype, dtype)}`")
    return sidecar


class TrtGraph(Graph):
    """One deserialized engine with its execution context; `run` binds the given buffers by name and executes."""

    def __init__(self, engine_dir, sidecar: dict, device: torch.device):
        trt = engines.import_tensorrt()
        self.sidecar, self.device, self.name = sidecar, device, sidecar["component"]
        self.spec = ComponentSpec.from_json(sidecar["spec"])
        plan = engines.engine_path(engine_dir, self.name)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # kept alive as long as the engine
        with torch.cuda.device(device):
            self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
            if self.engine is None:
                raise engines.EngineMismatch(f"TensorRT could not load {plan} (see its log above): rebuild it with "
                                             f"`{sidecar['command']} --force`")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        if sorted(names) != sorted(self.spec.io):
            raise engines.EngineMismatch(f"{plan} has tensors {sorted(names)}, its sidecar's spec "
                                         f"{sorted(self.spec.io)}: rebuild it with `{sidecar['command']} --force`")
        self.dtype = _TORCH[sidecar["flags"]["io_dtype"]]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        to_torch = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                    trt.DataType.BF16: torch.bfloat16, trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32}
        self.dtypes = {n: to_torch[self.engine.get_tensor_dtype(n)] for n in names}
        self.static = bool(sidecar["flags"]["static"])
        self.bound = None  # (address, shape) of every tensor as last bound
        self.warm: set = set()  # keys run once eagerly (TensorRT finishes shape-dependent setup on the first run)
        self.graphs: dict = {}  # key -> torch.cuda.CUDAGraph of the execute call (static engines only)
        self.stream = torch.cuda.Stream(device)  # TensorRT's own stream, never the legacy default stream
        log.info("%s: TensorRT engine %s (%s, %s)", self.name, plan, sidecar["precision"],
                 "static, CUDA graphs" if self.static else "dynamic shapes")

    def check(self, batch, frames, height, width, guidance):
        engines.check_request(self.sidecar, batch, frames, height, width, guidance)

    def dims(self, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
        """The spec's dim values read off the buffers' shapes; EngineMismatch when a fixed size differs."""
        dims: dict[str, int] = {}
        for name, t in tensors.items():
            want = self.spec.io[name].shape
            ok = len(want) == t.dim()
            for s, v in zip(want, t.shape):
                if isinstance(s, int):
                    ok = ok and s == v
                else:  # "h" or "8*h"
                    k, _, d = s.rpartition("*")
                    k = int(k or 1)
                    ok = ok and v % k == 0 and dims.setdefault(d, v // k) == v // k
            if not ok:
                raise engines.EngineMismatch(f"{self.name}: {name} has shape {tuple(t.shape)}, the engine takes "
                                             f"{want}: the engines come from another model's export or the dims "
                                             f"disagree ({dims})")
        return dims

    def _bind(self, tensors: dict[str, torch.Tensor]) -> None:
        engines.check_profile(self.sidecar, self.dims(tensors))
        for name, t in tensors.items():
            assert t.is_cuda and t.is_contiguous() and t.dtype == self.dtypes[name], \
                f"{self.name}.{name}: needs a contiguous {self.dtypes[name]} CUDA buffer, got {t.dtype} on " \
                f"{t.device} with strides {t.stride()}"
        for name in self.inputs:
            if not self.context.set_input_shape(name, tuple(tensors[name].shape)):
                raise engines.EngineMismatch(f"{self.name}: TensorRT refused {name} shape {tuple(tensors[name].shape)}"
                                             f" (profile {self.sidecar['profile'][name]})")
        for name, t in tensors.items():
            self.context.set_tensor_address(name, t.data_ptr())
        for name in self.outputs:
            got = tuple(self.context.get_tensor_shape(name))
            assert got == tuple(tensors[name].shape), f"{self.name}.{name}: engine writes {got}, buffer is " \
                                                      f"{tuple(tensors[name].shape)}"

    def _execute(self, stream_handle: int) -> None:
        if not self.context.execute_async_v3(stream_handle):
            raise RuntimeError(f"TensorRT failed to run {self.name} (see its log above)")

    def run(self, tensors: dict[str, torch.Tensor]) -> None:
        """Execute with `tensors` (every input and output, by name) as the engine's I/O, after the work queued on
        torch's current stream and before the work queued on it next (the caller's stream waits for ours)."""
        key = tuple((t.data_ptr(), tuple(t.shape)) for t in tensors.values())
        if key != self.bound:
            self._bind(tensors)
            self.bound = key
        caller, stream = torch.cuda.current_stream(self.device), self.stream
        capturing = torch.cuda.is_current_stream_capturing()  # a caller's graph records this call (fork and join)
        stream.wait_stream(caller)  # the inputs were written on the caller's stream
        with torch.cuda.stream(stream):
            self._run_on_stream(key, capturing)
        caller.wait_stream(stream)  # the caller reads the outputs after TensorRT wrote them

    def _run_on_stream(self, key, capturing: bool) -> None:
        """Eager execute, or (static engines) one eager run, then a captured CUDA graph replayed on self.stream."""
        handle = self.stream.cuda_stream
        if not self.static or capturing:
            self._execute(handle)
            return
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        if key not in self.warm:
            self._execute(handle)
            self.warm.add(key)
            return
        graph = torch.cuda.CUDAGraph()
        # Captured on self.stream with capture_begin/end rather than torch.cuda.graph(), whose entry synchronises the
        # whole device; thread_local: the VAE captures on the decode thread while the main thread keeps denoising.
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            self._execute(handle)
        finally:
            graph.capture_end()
        graph.replay()  # capture records without running
        self.graphs[key] = graph


def make(component: str, engine_dir, dtype: torch.dtype, device) -> Backend:
    """The tensorrt backend for `component` ('text', 'unet' or 'vae'); every error names what fixes it.

    The VAE's per-frame engine is loaded now when it was built, the temporal one on its first use."""
    if component not in engines.RUNTIME_COMPONENTS:
        raise ValueError(f"unknown component {component!r}; choose one of {sorted(engines.RUNTIME_COMPONENTS)}")
    if engine_dir is None:
        raise ValueError("the tensorrt backend needs --engines DIR (made by `vidrd build-engines --onnx EXPORT_DIR "
                         "--out DIR --precision P`)")
    if not Path(engine_dir).is_dir():
        raise FileNotFoundError(f"no engine folder {engine_dir}: make it with `vidrd build-engines --onnx EXPORT_DIR "
                                f"--out {engine_dir} --precision P`")
    device = torch.device(device)
    names = engines.RUNTIME_COMPONENTS[component]
    present = [n for n in names if engines.engine_path(engine_dir, n).is_file()] or names[:1]
    sidecars = {n: _sidecar(engine_dir, n, dtype) for n in present}  # missing files and dtype: before TensorRT
    env = engines.running_env(device)  # TensorRT installed, a CUDA device
    for sidecar in sidecars.values():
        engines.check_compatible(sidecar, env)

    def load(name: str) -> TrtGraph:
        if name not in sidecars:
            sidecars[name] = _sidecar(engine_dir, name, dtype)
            engines.check_compatible(sidecars[name], env)
        return TrtGraph(engine_dir, sidecars[name], device)

    if component == "vae":
        return GraphVAE(load, dtype, device, per_frame="vae_decoder" in sidecars)
    return GraphBackend(load(names[0]), device)
