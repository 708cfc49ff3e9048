"""Whether a reduced-precision dtype is fast on a device, decided once before the networks are cast.

On CPUs bf16 is fast only on bf16 units (AVX512-BF16, AMX-BF16) driven by oneDNN, which runs the GEMMs and
convolutions. Measured on an AMD EPYC (Zen 4, AVX512-BF16), one thread, `small` UNet at 16x16x4 latents:
  fp32 0.30 s, bf16 0.23 s; bf16 with ATEN_CPU_CAPABILITY=avx2 or default: 0.23 s as well (it lowers only ATen's own
  elementwise kernels; oneDNN still uses the bf16 units);
  ONEDNN_MAX_CPU_ISA=AVX512_CORE (a CPU with AVX512 but no bf16 units): bf16 0.46 s vs fp32 0.35 s;
  ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN refuses bf16, as on AVX2-only CPUs): bf16 2.8 s vs 0.31 s, a 512^2 GEMM 40x slower;
  float16 (no fp16 units): 2.6 s. README: about 100x on AVX2-only CPUs.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below the first level with bf16 instructions (avx512_core_bf16)
_NO_BF16_ISA = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
SLOW = "about 10-100x slower than float32"
CONVERTED = "oneDNN converts bf16 through float32, slower than float32 (measured 1.3x)"


@dataclass(frozen=True)
class CpuProbe:
    """What the CPU and this torch build report about bf16, as probe_cpu reads it."""
    onednn_bf16: bool  # torch.ops.mkldnn._is_mkldnn_bf16_supported(): oneDNN takes bf16 GEMM/conv (AVX512 core+)
    onednn_fp16: bool  # the same for float16 (AVX512-FP16 or AMX-FP16)
    flags: frozenset | None  # /proc/cpuinfo flags (avx2, avx512f, avx512_bf16, amx_bf16, ...); None where unreadable
    capability: str  # torch.backends.cpu.get_cpu_capability(): ATen's dispatch, lowered by ATEN_CPU_CAPABILITY
    onednn_isa: str | None  # ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA): a cap on oneDNN's instructions


def cpu_name() -> str:
    """The CPU model as lscpu names it (`model name` in /proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def probe_cpu() -> CpuProbe:
    """The low-level probe: torch's oneDNN checks, /proc/cpuinfo flags, ATen's dispatch level, oneDNN's ISA cap."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = frozenset(w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split())
    except OSError:  # not Linux, or /proc hidden
        flags = None
    return CpuProbe(bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()), flags or None,
                    torch.backends.cpu.get_cpu_capability(),
                    os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"))


def cpu_bf16(p: CpuProbe) -> tuple[bool, str]:
    """(fast, reason) for bf16 on the CPU described by `p`."""
    units = None if p.flags is None else \
        "AMX-BF16" if "amx_bf16" in p.flags else "AVX512-BF16" if "avx512_bf16" in p.flags else None
    if p.onednn_isa is not None and p.onednn_isa.upper() in _NO_BF16_ISA:
        has = f" (the CPU has {units})" if units else ""
        return False, (f"ONEDNN_MAX_CPU_ISA={p.onednn_isa} keeps oneDNN off bf16 instructions{has}: "
                       f"{CONVERTED if p.onednn_bf16 else 'bf16 would be emulated, ' + SLOW}")
    if not p.onednn_bf16:
        if units:
            return False, f"CPU has {units}, but this torch's oneDNN does not run bf16: bf16 would be emulated, {SLOW}"
        return False, f"CPU lacks bf16 units ({_level(p)} only): bf16 would be emulated, {SLOW}"
    if p.flags is None:
        return True, ("oneDNN runs bf16 on this CPU (AVX512 or better; /proc/cpuinfo unreadable, so whether it has "
                      "bf16 units is unknown: without them bf16 is about 1.3x slower than float32)")
    if units is None:
        return False, f"CPU lacks bf16 units ({_level(p)} without AVX512-BF16 or AMX): {CONVERTED}"
    note = "" if p.capability.startswith("AVX512") else \
        f" (ATen's own kernels run at {p.capability}, e.g. ATEN_CPU_CAPABILITY; oneDNN's GEMM/conv still use {units})"
    return True, f"CPU has {units}{note}"


def _level(p: CpuProbe) -> str:
    """The CPU's vector level, from its flags when readable (ATEN_CPU_CAPABILITY may report a lower one)."""
    if p.flags is None:
        return p.capability
    return "AVX512" if "avx512f" in p.flags else "AVX2" if "avx2" in p.flags else "SSE"


def _device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: vidrd runs on cpu or cuda")
    return dev


def bf16_support(device: str | torch.device) -> tuple[bool, str]:
    """(fast, reason): whether bf16 networks run at least as fast as float32 on `device`, and why."""
    dev = _device(device)
    if dev.type == "cpu":
        return cpu_bf16(probe_cpu())
    if not torch.cuda.is_available():
        return False, f"{device}: CUDA is not available"
    with torch.cuda.device(dev):
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        name, cc = torch.cuda.get_device_name(), "%d.%d" % torch.cuda.get_device_capability()
    if ok:
        return True, f"{name} (sm {cc}) has bf16 tensor cores"
    return False, f"{name} (sm {cc}) lacks bf16 units (sm 8.0+): bf16 would be emulated; use fp16"


def check_dtype(dtype: torch.dtype, device: str | torch.device, allow_slow: bool = False) -> str:
    """The reason `dtype` is fine on `device`, for the log; ValueError where it would be slow, unless allow_slow."""
    dev = _device(device)
    if dtype == torch.float32:
        return "float32"
    if dtype == torch.bfloat16:
        ok, reason = bf16_support(dev)
    elif dtype == torch.float16:
        ok = dev.type == "cuda" or probe_cpu().onednn_fp16
        reason = "float16" if dev.type == "cuda" else "CPU has float16 units" if ok else \
            f"CPU lacks float16 units: float16 would be emulated, {SLOW}"
    else:
        raise ValueError(f"dtype={dtype!r} must be torch.float32, torch.bfloat16 or torch.float16")
    if ok:
        return reason
    if not allow_slow:
        raise ValueError(f"{str(dtype).removeprefix('torch.')} on {dev}: {reason}. Use float32, or allow slow "
                         "precision (allow_slow) to run it anyway")
    return f"{reason} (allowed: slow precision)"


def fp8_support(device: str | torch.device) -> tuple[bool, str]:
    """(has FP8 units, reason): FP8 (e4m3) GEMMs need tensor cores of compute capability 8.9+ (Ada, Hopper)."""
    dev = _device(device)
    if dev.type == "cpu":
        return False, "the CPU has no FP8 units (FP8 GEMMs need an NVIDIA GPU of compute capability 8.9+)"
    if not torch.cuda.is_available():
        return False, f"{device}: CUDA is not available"
    with torch.cuda.device(dev):
        name, cc = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    if cc < (8, 9):
        return False, f"{name} (sm {cc[0]}.{cc[1]}) has no FP8 tensor cores (sm 8.9+: Ada, Hopper)"
    return True, f"{name} (sm {cc[0]}.{cc[1]}) has FP8 tensor cores"


def check_fp8(device: str | torch.device) -> str:
    """The reason FP8 GEMMs run on `device`, for the log; ValueError (with the reason) where they cannot."""
    ok, reason = fp8_support(device)
    if not ok:
        raise ValueError(f"{reason}; use --dtype bf16")
    return reason
