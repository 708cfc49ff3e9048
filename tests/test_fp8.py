"""--dtype fp8 (runtime/backends/fp8.py): quantization and scale math against float matmuls, the module swap, the
refusal on devices without FP8 units, and (GPU, sm 8.9+) the runtime on FP8 GEMMs."""
import copy

import pytest
import torch
import torch.nn as nn

from tolerances import FP8_DEQUANT_REL, FP8_GEMM_REL, FP8_SCALED_MM_VS_REFERENCE, FP8_TINY_PSNR_DB, FP8_UNET_REL
from vidrd.ref.attention import Attention
from vidrd.ref.weights import random_model
from vidrd.runtime.backends.fp8 import (E4M3, E4M3_MAX, FP8Conv1x1, FP8Linear, fp8_copy, quantize, scaled_mm,
                                        scaled_mm_reference)
from vidrd.runtime.cli import main
from vidrd.runtime.options import RuntimeOptions
from vidrd.runtime.precision import fp8_support

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def operands(m=64, k=96, n=48, seed=0):
    """Activations (M,K) with per-row magnitudes over four decades, weights (N,K), bias (N,): float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m)[:, None]
    return x, torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g)


@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_quantize_round_trip_and_scales(scaling):
    x, _, _ = operands()
    q, s = quantize(x, scaling)
    assert q.dtype == E4M3 and s.dtype == torch.float32 and s.shape == ((64, 1) if scaling == "row" else ())
    assert q.float().abs().max() <= E4M3_MAX and (q.float().abs().amax(-1) == E4M3_MAX).any()  # amax maps to 448
    back = q.float() * s
    # every row within e4m3's 3-bit mantissa of itself, whatever its magnitude (four decades fit e4m3's range even
    # under one scale; per-row scales keep wider ranges out of the subnormals)
    assert ((back - x).norm(dim=-1) / x.norm(dim=-1)).max() <= FP8_DEQUANT_REL
    zero, s0 = quantize(torch.zeros(2, 16), scaling)
    assert torch.isfinite(s0).all() and (zero.float() == 0).all()


@pytest.mark.parametrize("scaling", ["row", "tensor"])
def test_fp8_gemm_against_float_matmul(scaling):
    x, w, b = operands()
    xq, sx = quantize(x, scaling)
    wq, sw = quantize(w, scaling)
    ref = scaled_mm_reference(xq, sx, wq, sw, b, torch.float32)
    assert rel(ref, x @ w.T + b) <= FP8_GEMM_REL  # the quantization error of both operands, nothing else
    if hasattr(torch, "_scaled_mm"):  # this torch's CPU _scaled_mm (emulated): the same definition
        try:
            got = scaled_mm(xq, sx, wq, sw, b.bfloat16(), torch.bfloat16)
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"torch._scaled_mm does not run on this CPU: {e}")
        assert rel(got, ref) <= FP8_SCALED_MM_VS_REFERENCE


def test_fp8_linear_and_conv_modules():
    x, w, b = operands(m=2 * 3 * 5, k=32, n=16)
    lin = nn.Linear(32, 16)
    lin.weight.data, lin.bias.data = w, b
    f = FP8Linear(lin.weight, lin.bias, "row", "reference", torch.float32)
    y = f(x.view(2, 3, 5, 32))
    assert y.shape == (2, 3, 5, 16) and rel(y, lin(x).view(2, 3, 5, 16)) <= FP8_GEMM_REL
    conv = nn.Conv2d(32, 16, 1)
    conv.weight.data, conv.bias.data = w[:, :, None, None], b
    c = FP8Conv1x1(conv.weight[:, :, 0, 0], conv.bias, "row", "reference", torch.float32)
    img = x.view(2, 3, 5, 32).permute(0, 3, 1, 2)  # (B,C,h,w)
    assert rel(c(img), conv(img)) <= FP8_GEMM_REL and c(img).shape == (2, 16, 3, 5)


def test_fp8_copy_swaps_exactly_the_gemms_and_leaves_the_model():
    model = random_model("tiny", 0)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    net = fp8_copy(model.unet, kernel="reference")
    fp8 = {n for n, m in net.named_modules() if isinstance(m, FP8Linear)}
    want = set()
    for n, m in model.unet.named_modules():
        parent = model.unet.get_submodule(n.rpartition(".")[0]) if "." in n else model.unet
        last = n.rpartition(".")[2]
        if type(m) is nn.Linear and "time_emb" not in n and not (isinstance(parent, Attention) and parent.cross
                                                                  and last in ("to_k", "to_v")):
            want.add(n)
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1):
            want.add(n)
    assert fp8 == want and any(n.endswith("conv_shortcut") for n in fp8) and any("ff." in n for n in fp8)
    assert all(isinstance(net.get_submodule(n), FP8Conv1x1) for n in fp8 if n.endswith("conv_shortcut"))
    # an independent copy: bf16 everywhere else, the caller's UNet untouched (same class, values, dtype)
    assert all(t.dtype in (torch.bfloat16, E4M3, torch.float32) for t in net.state_dict().values())
    ptrs = {t.data_ptr() for t in model.unet.state_dict().values()}
    assert not ptrs & {t.data_ptr() for t in net.state_dict().values()}
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    assert not any(isinstance(m, FP8Linear) for m in model.unet.modules())
    # the whole UNet on the reference path stays near the bf16 UNet (e4m3 in every GEMM, 2 steps' worth of layers)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 2, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        ref = copy.deepcopy(model.unet).to(torch.bfloat16)(x.bfloat16(), t, ctx.bfloat16()).float()
        got = net(x.bfloat16(), t, ctx.bfloat16()).float()
    assert rel(got, ref) <= FP8_UNET_REL


def test_fp8_is_refused_on_the_cpu(tmp_path, capsys):
    ok, reason = fp8_support("cpu")
    assert not ok and "FP8" in reason
    with pytest.raises(ValueError, match="--dtype fp8: the CPU has no FP8 units"):
        RuntimeOptions(dtype="fp8", device="cpu").resolved()
    with pytest.raises(ValueError, match="not the onnxruntime UNet"):
        RuntimeOptions(dtype="fp8", unet_backend="onnxruntime", export_dir=tmp_path)
    with pytest.raises(ValueError, match="not --backend reference"):
        RuntimeOptions("reference", dtype="fp8")
    # the command line: one line, exit 2, before the model loads (no "model:" line)
    code = main(["generate", "a boat", "-o", str(tmp_path / "a.mp4"), "--preset", "tiny", "--dtype", "fp8",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "fp8" in err and "model:" not in err, err


def fp8_vs_bf16_psnr(device: str) -> float:
    """The runtime with --dtype fp8 against bf16 on the tiny preset, one 2-clip request: PSNR of the videos."""
    from vidrd.ref.loading import to
    from vidrd.ref.sampler import SamplerSettings
    from vidrd.runtime.bench.metrics import psnr
    from vidrd.runtime.loop import Limits, Request
    from vidrd.runtime.options import open_runtime

    model = to(random_model("tiny", 0), dtype=torch.bfloat16, device=device)
    s = SamplerSettings(height=64, width=64, frames=4, steps=3, clips=2, overlap=2)
    videos = {}
    for dtype in ("bf16", "fp8"):
        rt = open_runtime(model, RuntimeOptions(dtype=dtype, device=device), Limits(1, 4, 64, 64, 3, 2))
        assert any(isinstance(m, FP8Linear) for m in rt.unet.net.modules()) == (dtype == "fp8")
        videos[dtype] = torch.cat([c.video for c in rt.generate(Request(("a boat",), None, s, 5, True))], 2)
        rt.close()
    return psnr(videos["fp8"], videos["bf16"])


def test_fp8_runtime_on_the_cpu_scaled_mm():
    """open_runtime takes the options as given (the refusal is RuntimeOptions.resolved's, before a command loads
    its model), so the runtime's FP8 path runs here on this torch's CPU _scaled_mm: the integration, not the speed."""
    try:
        torch._scaled_mm(torch.zeros(16, 16, dtype=E4M3), torch.zeros(16, 16, dtype=E4M3).t(),
                         scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm does not run on this CPU: {e}")
    assert fp8_vs_bf16_psnr("cpu") >= FP8_TINY_PSNR_DB


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not fp8_support("cuda")[0],
                    reason="needs a CUDA GPU with FP8 units (compute capability 8.9+)")
def test_fp8_runtime_on_cuda():
    assert fp8_vs_bf16_psnr("cuda") >= FP8_TINY_PSNR_DB


def test_gpu_check_fp8_section_skips_without_fp8_units():
    import gpu_check
    assert "fp8" in [n for n, _, _ in gpu_check.SECTIONS]
    if not torch.cuda.is_available():
        with pytest.raises(gpu_check.Skip, match="CUDA is not available"):
            gpu_check.fp8()
    r = {"status": "ok", "fp8_row": {"ms": 40.0}, "bf16": {"ms": 52.0}, "video_psnr_db_vs_bf16": 36.5}
    assert gpu_check.gist("fp8", r) == "UNet 40 vs bf16 52 ms (row scales), video PSNR 36.5 dB"
