"""runtime/precision.py: which dtypes are fast where. The logic runs on substituted probes, so it is the same on
every CPU; the real probe is only checked for its types."""
import contextlib

import pytest
import torch

from vidrd.runtime import precision
from vidrd.runtime.precision import CpuProbe, bf16_support, check_dtype, cpu_bf16

ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16"})
SAPPHIRE = ZEN4 | {"amx_bf16", "amx_tile"}
SKYLAKE = frozenset({"avx2", "avx512f"})
HASWELL = frozenset({"avx2"})


def cpu(flags, onednn_bf16=True, capability="AVX512", isa=None, onednn_fp16=False):
    return CpuProbe(onednn_bf16, onednn_fp16, flags, capability, isa)


@pytest.mark.parametrize("probe, fast, reason", [
    (cpu(ZEN4), True, "CPU has AVX512-BF16"),
    (cpu(SAPPHIRE), True, "CPU has AMX-BF16"),
    (cpu(ZEN4, capability="AVX2"), True, "CPU has AVX512-BF16 (ATen's own kernels run at AVX2"),
    (cpu(HASWELL, onednn_bf16=False, capability="AVX2"), False,
     "CPU lacks bf16 units (AVX2 only): bf16 would be emulated, about 10-100x slower than float32"),
    (cpu(SKYLAKE), False, "CPU lacks bf16 units (AVX512 without AVX512-BF16 or AMX): oneDNN converts bf16"),
    (cpu(ZEN4, isa="AVX512_CORE"), False, "ONEDNN_MAX_CPU_ISA=AVX512_CORE keeps oneDNN off bf16 instructions "
                                          "(the CPU has AVX512-BF16): oneDNN converts bf16"),
    (cpu(ZEN4, onednn_bf16=False, isa="avx2"), False, "ONEDNN_MAX_CPU_ISA=avx2 keeps oneDNN off bf16 instructions "
                                                      "(the CPU has AVX512-BF16): bf16 would be emulated"),
    (cpu(ZEN4, isa="AVX512_CORE_AMX"), True, "CPU has AVX512-BF16"),  # a cap above bf16 changes nothing
    (cpu(ZEN4, onednn_bf16=False), False, "CPU has AVX512-BF16, but this torch's oneDNN does not run bf16"),
    (cpu(None), True, "oneDNN runs bf16 on this CPU (AVX512 or better; /proc/cpuinfo unreadable"),
    (cpu(None, onednn_bf16=False, capability="AVX2"), False, "CPU lacks bf16 units (AVX2 only)"),
])
def test_cpu_bf16_decisions(probe, fast, reason):
    got_fast, got_reason = cpu_bf16(probe)
    assert got_fast is fast and got_reason.startswith(reason), got_reason


def test_check_dtype_on_cpu(monkeypatch):
    monkeypatch.setattr(precision, "probe_cpu", lambda: cpu(ZEN4))
    assert check_dtype(torch.bfloat16, "cpu") == "CPU has AVX512-BF16"
    assert check_dtype(torch.float32, torch.device("cpu")) == "float32"
    monkeypatch.setattr(precision, "probe_cpu", lambda: cpu(HASWELL, onednn_bf16=False, capability="AVX2"))
    with pytest.raises(ValueError, match=r"bfloat16 on cpu: CPU lacks bf16 units \(AVX2 only\).*allow_slow"):
        check_dtype(torch.bfloat16, "cpu")
    assert check_dtype(torch.bfloat16, "cpu", allow_slow=True).endswith("(allowed: slow precision)")
    assert bf16_support("cpu")[0] is False
    with pytest.raises(ValueError, match="float16 on cpu: CPU lacks float16 units"):
        check_dtype(torch.float16, "cpu")
    monkeypatch.setattr(precision, "probe_cpu", lambda: cpu(SAPPHIRE, onednn_fp16=True))
    assert check_dtype(torch.float16, "cpu") == "CPU has float16 units"


def test_check_dtype_bad_values():
    with pytest.raises(ValueError, match="dtype=torch.float64"):
        check_dtype(torch.float64, "cpu")
    with pytest.raises(ValueError, match="dtype='bf16'"):
        check_dtype("bf16", "cpu")
    with pytest.raises(ValueError, match="device='gpu0'"):
        bf16_support("gpu0")
    with pytest.raises(ValueError, match="device='meta': vidrd runs on cpu or cuda"):
        check_dtype(torch.bfloat16, "meta")


@pytest.mark.parametrize("major, fast, reason", [
    (8, True, "NVIDIA A100 (sm 8.0) has bf16 tensor cores"),
    (7, False, "NVIDIA A100 (sm 7.0) lacks bf16 units (sm 8.0+): bf16 would be emulated; use fp16"),
])
def test_cuda_decision(monkeypatch, major, fast, reason):
    # torch.cuda replaced, so this runs without a GPU; the GPU machines run the real probe below
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: major >= 8)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (major, 0))
    assert bf16_support("cuda:0") == (fast, reason)


def test_no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bf16_support("cuda") == (False, "cuda: CUDA is not available")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_real_probe(device):
    fast, reason = bf16_support(device)
    assert isinstance(fast, bool) and isinstance(reason, str) and reason
    p = precision.probe_cpu()
    assert isinstance(p.onednn_bf16, bool) and isinstance(p.capability, str)
    assert p.flags is None or isinstance(p.flags, frozenset)


def test_runtime_options_refuse_a_slow_dtype_unless_allowed(monkeypatch, tmp_path, capsys):
    """RuntimeOptions.resolved (every command, before its model loads) asks check_dtype for the networks and VAE."""
    from vidrd.runtime.cli import main
    from vidrd.runtime.options import RuntimeOptions
    monkeypatch.setattr(precision, "probe_cpu", lambda: cpu(HASWELL, onednn_bf16=False, capability="AVX2"))
    with pytest.raises(ValueError, match=r"^--dtype bf16: bfloat16 on cpu: CPU lacks bf16 units \(AVX2 only\).*"
                       r"\(--allow-slow-dtype\)"):
        RuntimeOptions(dtype="bf16", device="cpu").resolved()
    with pytest.raises(ValueError, match="^--vae-dtype bf16: bfloat16 on cpu"):
        RuntimeOptions(vae_dtype="bf16", device="cpu").resolved()
    assert RuntimeOptions(dtype="bf16", device="cpu", allow_slow_dtype=True).resolved().dtype == "bf16"
    assert RuntimeOptions(device="cpu").resolved().dtype == "fp32"
    args = ["generate", "a boat", "-o", str(tmp_path / "v.gif"), "--preset", "tiny", "--height", "16", "--width", "16",
            "--frames", "2", "--steps", "1", "--no-progress", "--device", "cpu", "--dtype", "bf16"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vidrd generate: error: --dtype bf16") and "--allow-slow-dtype" in err[0]
    assert not (tmp_path / "v.gif").exists()
    assert main(args + ["--allow-slow-dtype"]) == 0  # slow, not wrong
    monkeypatch.setattr(precision, "probe_cpu", lambda: cpu(ZEN4))
    assert RuntimeOptions(dtype="bf16", device="cpu").resolved().dtype == "bf16"
