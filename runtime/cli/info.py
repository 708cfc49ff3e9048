"""`vidrd info`: versions, devices and available backends."""
from __future__ import annotations

import importlib.metadata as md
import json
import platform


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def info() -> dict:
    """Everything a bug report needs: versions, device, and which backends can run here."""
    import torch

    out = {"vidrd": _version("vidrd"), "python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
           "cpu_threads": torch.get_num_threads(),
           # AVX2 only: bf16 is emulated and ~100x slower than fp32; AVX512_BF16/AMX: bf16 is the fast CPU path
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for dist in ("transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "triton", "tensorrt", "polygraphy", "av"):
        out[dist] = _version(dist)
    backends = {"reference": True, "torch": True}
    try:
        import onnxruntime as ort
        backends["onnxruntime"] = ort.get_available_providers()
    except ImportError:
        backends["onnxruntime"] = False
    backends["tensorrt"] = bool(out["tensorrt"]) and torch.cuda.is_available()
    backends["triton_attention"] = bool(out["triton"]) and torch.cuda.is_available()
    out["backends"] = backends
    return out


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, device and available backends")
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    p.set_defaults(func=run)


def run(args) -> int:
    data = info()
    if args.json:
        print(json.dumps(data))
    else:
        for k, v in data.items():
            print(f"{k:16s} {v}")
    return 0
