"""ONNX Runtime sessions with the best available execution provider: TensorRT EP > CUDA EP > CPU.

ORT falls back silently when a provider fails to load (missing CUDA or TensorRT libraries), so the provider
actually taken is read back from `session.get_providers()` and can be required.
"""
from __future__ import annotations

from pathlib import Path

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(prefer=PREFERENCE, available=None) -> list[str]:
    """The providers of `prefer` that this onnxruntime build offers, in preference order (CPU always last)."""
    import onnxruntime as ort

    available = ort.get_available_providers() if available is None else available
    unknown = [p for p in prefer if p not in PREFERENCE]
    if unknown:
        raise ValueError(f"unknown execution providers {unknown}; choose from {list(PREFERENCE)}")
    chosen = [p for p in prefer if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def make_session(path, prefer=PREFERENCE, *, require: str | None = None, threads: int | None = None,
                 fp16: bool = False, cache_dir=None, trt_options: dict | None = None):
    """An InferenceSession for the ONNX file `path` on the first provider of `prefer` that loads.

    require: raise RuntimeError unless this provider was actually taken (e.g. "TensorrtExecutionProvider").
    threads: intra-op threads of the CPU provider (None: ORT's default, one per physical core).
    fp16, cache_dir: TensorRT EP options (fp16 kernels; engine and timing cache folder).
    trt_options: further TensorRT EP options (e.g. trt_profile_min/opt/max_shapes).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path} (make it with `vidrd export`)")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    providers = []
    for p in choose_providers(prefer):
        if p == "TensorrtExecutionProvider":
            trt = {"trt_fp16_enable": fp16}
            if cache_dir is not None:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                trt.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                           trt_timing_cache_enable=True, trt_timing_cache_path=str(cache_dir))
            trt.update(trt_options or {})
            providers.append((p, trt))
        else:
            providers.append(p)
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    if require is not None and session_provider(sess) != require:
        raise RuntimeError(f"{path.name}: asked for {require}, ONNX Runtime took {sess.get_providers()}")
    return sess


def session_provider(sess) -> str:
    """The provider a session actually runs on first (ORT lists what it registered, best first)."""
    return sess.get_providers()[0]
