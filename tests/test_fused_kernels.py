"""vidrd.kernels.fused: GroupNorm+SiLU and GEGLU kernels vs the unfused torch ops under the interpreter, the
fallbacks, the custom ops, and an sm_90 compile check.

Runs on CPU: conftest sets TRITON_INTERPRET=1 before triton is imported. Inputs are seeded by the case's name.
References run in float64 on the same (rounded) inputs; bounds come from tolerances.FUSED.
"""
import logging
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from tolerances import FUSED, FUSED_GN_LARGE_MEAN_VS_TORCH
from vidrd.kernels import fused, geglu, group_norm_silu
from vidrd.kernels.fused import geglu_reference, group_norm_silu_reference

triton = pytest.importorskip("triton")


def gen(name: str) -> torch.Generator:
    """A CPU generator seeded by `name` (crc32: stable across runs, processes and machines)."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _layout(t, layout):
    """t (B,C,F,h,w) or (B,C,h,w) in the given memory layout, same values."""
    if layout == "frame-major":  # what conv2d_5d returns: (B,F,C,h,w) memory seen as (B,C,F,h,w)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "channels-last":
        return t.contiguous(memory_format=torch.channels_last_3d if t.dim() == 5 else torch.channels_last)
    return t.contiguous()


def _gn_inputs(name, shape, dtype, temb, offset=3.0):
    """Seeded x (B,C,...) with mean `offset` and std 2, weight, bias (C,), temb (B,C) or None."""
    g = gen(name)
    b, c = shape[:2]
    x = torch.randn(shape, generator=g) * 2 + offset
    w, bias, t = torch.randn(c, generator=g), torch.randn(c, generator=g), torch.randn(b, c, generator=g)
    return x.to(dtype), w.to(dtype), bias.to(dtype), t.to(dtype) if temb else None


def _close(got, want, dtype, msg):
    atol, rtol = FUSED[dtype]
    err = (got.double() - want).abs().max().item()
    print(f"{msg}: max abs err {err:.3g}")
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol, msg=msg)


def _f64(*ts):
    return [t.double() if t is not None else None for t in ts]


# (shape, groups, layout, temb): Cg = 10, 3, 10, 4, 1, 3, 4 channels a group; odd h, w, F and lengths.
GN_CASES = [
    ((1, 40, 3, 5, 7), 4, "frame-major", True),
    ((2, 24, 2, 6, 10), 8, "contiguous", False),
    ((2, 20, 3, 4, 5), 2, "channels-last", True),
    ((2, 12, 9, 7), 3, "contiguous", True),
    ((1, 32, 6, 6), 32, "channels-last", False),
    ((2, 12, 50), 4, "contiguous", True),
    ((1, 16, 1, 3, 3), 4, "frame-major", True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-g{c[1]}-{c[2]}-temb{c[3]}")
def test_group_norm_silu_matches_torch(case, dtype, monkeypatch):
    """silu(group_norm(x + temb)) over all frames, in x's layout, every output written; no fallback taken."""
    shape, groups, layout, temb = case
    x, w, b, t = _gn_inputs(str(case), shape, dtype, temb)
    x = _layout(x, layout) if x.dim() > 3 else x
    monkeypatch.setattr(fused, "group_norm_silu_reference", None)  # a fallback would raise TypeError
    out = group_norm_silu(x, w, b, groups, 1e-5, t)
    assert out.shape == x.shape and out.dtype == dtype and out.stride() == x.stride()
    _close(out, F.silu(F.group_norm(x.double() + (0 if t is None else t.double().view(*t.shape, *(1,) * (x.dim() - 2))),
                                    groups, w.double(), b.double(), 1e-5)), dtype, f"{case} {dtype}")


def test_group_norm_silu_split_reduction(monkeypatch):
    """Small tiles: a group's tiles spread over several programs (n_split > 1), several tiles each, partial frames."""
    monkeypatch.setattr(fused, "GN_TILE", 32)
    monkeypatch.setattr(fused, "GN_MAX_SPLIT", 3)
    x, w, b, t = _gn_inputs("split", (2, 6, 5, 3, 7), torch.float32, True)
    x = _layout(x, "frame-major")
    _, stats, _, _ = fused.gn_args(x, w, b, 2, 1e-5, t, torch.empty_like(x))
    assert stats["n_split"] == 3 and stats["tiles_per_prog"] > 1 and stats["n_sblk"] > 1, stats
    _close(group_norm_silu(x, w, b, 2, 1e-5, t), group_norm_silu_reference(*_f64(x, w, b), 2, 1e-5, t.double()),
           torch.float32, "split")


def test_group_norm_silu_large_mean():
    """|mean| >> std: shifted sums keep the variance accurate (no worse than torch's own fp32 GroupNorm)."""
    x, w, b, t = _gn_inputs("large-mean", (2, 8, 3, 6, 6), torch.float32, True, offset=100.0)
    want = group_norm_silu_reference(*_f64(x, w, b), 2, 1e-5, t.double())
    ours = (group_norm_silu(x, w, b, 2, 1e-5, t).double() - want).abs().max().item()
    torch_err = (group_norm_silu_reference(x, w, b, 2, 1e-5, t).double() - want).abs().max().item()
    print(f"mean 100: fused {ours:.3g}, torch fp32 {torch_err:.3g} (max abs vs float64)")
    assert ours <= FUSED_GN_LARGE_MEAN_VS_TORCH * torch_err


def test_group_norm_silu_is_the_resnet_blocks_norm2():
    """group_norm_silu(h, norm2, temb) equals vidrd_ref ResnetBlock's silu(norm2(h + time_emb_proj(silu(temb))))."""
    from vidrd.ref.unet_blocks import ResnetBlock
    torch.manual_seed(1)
    block = ResnetBlock(16, 16, 24, groups=4, eps=1e-5).eval()
    g = gen("resnet")
    h, temb = torch.randn(2, 16, 3, 5, 6, generator=g), torch.randn(2, 24, generator=g)
    h = _layout(h, "frame-major")  # what conv1 hands to norm2
    with torch.no_grad():
        t = block.time_emb_proj(F.silu(temb))  # (B,C)
        want = F.silu(block.norm2(h + t[:, :, None, None, None]))
        got = group_norm_silu(h, block.norm2.weight, block.norm2.bias, 4, block.norm2.eps, t)
    _close(got, want.double(), torch.float32, "ResnetBlock norm2")


GEGLU_CASES = [((3, 7, 80), True), ((5, 400), False), ((5, 400), True), ((2, 3, 4, 48), True), ((1, 2), False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", GEGLU_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-bias{c[1]}")
def test_geglu_matches_torch(case, dtype, monkeypatch):
    """value * gelu(gate) (exact erf) with the bias added first; I non-power-of-2 and past one column block."""
    shape, with_bias = case
    g = gen(str(case))
    x = (torch.randn(shape, generator=g) * 4).to(dtype)  # gates well into gelu's tails
    bias = torch.randn(shape[-1], generator=g).to(dtype) if with_bias else None
    monkeypatch.setattr(fused, "geglu_reference", None)  # a fallback would raise TypeError
    out = geglu(x, bias)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype and out.is_contiguous()
    x64 = x.double() + (bias.double() if with_bias else 0)
    _close(out, x64[..., :shape[-1] // 2] * F.gelu(x64[..., shape[-1] // 2:]), dtype, f"{case} {dtype}")


def test_geglu_strided_rows_and_the_ref_module():
    """Rows with a stride past 2I (a column slice) run in place; geglu(x W^T, b) equals vidrd_ref's GEGLU module."""
    from vidrd.ref.unet_blocks import GEGLU
    g = gen("geglu-ref")
    wide = torch.randn(6, 100, generator=g)
    x = wide[:, :72]  # (6, 72) view, row stride 100
    assert fused._geglu_unsupported(x, None) is None
    _close(geglu(x), geglu_reference(x.double()), torch.float32, "strided rows")
    torch.manual_seed(2)
    mod = GEGLU(12, 48).eval()
    h = torch.randn(2, 5, 12, generator=g)
    with torch.no_grad():
        got = geglu(h @ mod.proj.weight.T, mod.proj.bias)  # the bias moves from the matmul into the kernel
        want = mod(h)
    _close(got, want.double(), torch.float32, "GEGLU module")


def test_fallbacks_log_once(monkeypatch, caplog):
    """float64, unmergeable strides, CPU without the interpreter, no triton: the torch ops' result, one log line per
    reason."""
    fused._warned.clear()
    x, w, b, t = _gn_inputs("fallback", (1, 8, 2, 3, 5), torch.float32, True)
    want = group_norm_silu_reference(x, w, b, 2, 1e-5, t)
    with caplog.at_level(logging.WARNING, logger="vidrd.kernels.fused"):
        for _ in range(2):
            got = group_norm_silu(*_f64(x, w, b), 2, 1e-5, t.double())
            torch.testing.assert_close(got, want.double(), atol=1e-5, rtol=1e-5)
        xt = x.transpose(3, 4).contiguous().transpose(3, 4)  # w before h in memory: h, w do not merge
        got = group_norm_silu(xt, w, b, 2, 1e-5, t)
        assert got.stride() == xt.stride()
        _close(got, want.double(), torch.float32, "unmergeable strides")
        torch.testing.assert_close(geglu(x.double().view(-1, 30)), geglu_reference(x.double().view(-1, 30)))
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        torch.testing.assert_close(geglu(x.view(-1, 30)), geglu_reference(x.view(-1, 30)), atol=0, rtol=0)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        # without triton the wrapper's reason is "triton is not importable" (asked directly: the custom op may run
        # a module object that other tests' imports registered first, so a patched global need not reach it)
        monkeypatch.setattr(fused, "_kernels", lambda name: None)
        assert fused._gn_unsupported(x, w, b, None) == "triton is not importable"
    msgs = [r.getMessage() for r in caplog.records]
    for reason in ("do not merge", "CPU tensors need TRITON_INTERPRET=1"):
        assert sum(reason in m for m in msgs) == 1, (reason, msgs)
    for op in ("group_norm_silu", "geglu"):
        assert sum(f"{op} falls" in m and "torch.float64" in m for m in msgs) == 1, msgs


def test_autograd_falls_back_with_gradients():
    """Inputs that need gradients take the torch ops (the kernels are forward-only) and get their gradients."""
    x, w, b, t = _gn_inputs("grad", (1, 8, 2, 3, 3), torch.float32, True)
    w.requires_grad_(True)
    group_norm_silu(x, w, b, 2, 1e-5, t).sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape
    y = torch.randn(3, 8, generator=gen("grad-geglu"), requires_grad=True)
    geglu(y).sum().backward()
    assert y.grad is not None and y.grad.shape == y.shape


def test_bad_inputs_raise():
    """Contract violations raise ValueError naming the bad shape, dtype or value."""
    x, w, b, t = _gn_inputs("bad", (2, 8, 2, 3, 3), torch.float32, True)
    with pytest.raises(ValueError, match=r"\(B,C,F,h,w\); got \(3, 3\)"):
        group_norm_silu(x[0, 0, 0], w, b, 2)
    with pytest.raises(ValueError, match="groups 3"):
        group_norm_silu(x, w, b, 3)
    with pytest.raises(ValueError, match=r"weight \(8,\).*got \(7,\)"):
        group_norm_silu(x, w[:7], b, 2)
    with pytest.raises(ValueError, match=r"temb \(2, 8\).*got \(8,\)"):
        group_norm_silu(x, w, b, 2, temb=t[0])
    with pytest.raises(ValueError, match="bias .*torch.float16"):
        group_norm_silu(x, w, b.half(), 2)
    with pytest.raises(ValueError, match="eps -1"):
        group_norm_silu(x, w, b, 2, eps=-1)
    with pytest.raises(ValueError, match="floating"):
        group_norm_silu(x.long(), w, b, 2)
    with pytest.raises(ValueError, match=r"even last dim.*\(3, 5\)"):
        geglu(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"bias \(6,\).*got \(3,\)"):
        geglu(torch.zeros(3, 6), torch.zeros(3))


def test_custom_ops_compile_and_fake():
    """torch.ops.vidrd.group_norm_silu / .geglu pass opcheck's schema and fake-tensor checks and trace fullgraph."""
    x, w, b, t = _gn_inputs("custom-op", (1, 8, 2, 3, 5), torch.float32, True)
    xf = _layout(x, "frame-major")
    for args in ((x, w, b, 2, 1e-5, t), (xf, w, b, 4, 1e-6, None)):
        torch.library.opcheck(torch.ops.vidrd.group_norm_silu.default, args,
                              test_utils=("test_schema", "test_faketensor"))
    y = torch.randn(2, 3, 16, generator=gen("custom-op-geglu"))
    for args in ((y, None), (y, torch.randn(16, generator=gen("bias")))):
        torch.library.opcheck(torch.ops.vidrd.geglu.default, args, test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda a: geglu(group_norm_silu(a, w, b, 2, 1e-5, t).flatten(2)), backend="eager",
                       fullgraph=True)
    _close(fn(x), geglu_reference(group_norm_silu_reference(*_f64(x, w, b), 2, 1e-5, t.double()).flatten(2)),
           torch.float32, "compiled")


def test_compiles_for_sm90():
    """The fused kernels at their launch plans on SD2.1 shapes (fp16/bf16/fp32, three layouts) build sm_90 cubins."""
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton.compile with GPUTarget unavailable: {e}")
    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend")
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter cannot compile
    res = subprocess.run([sys.executable, "-m", "vidrd.kernels.aot", "--fused", "90", "--json", "--workers", "2"],
                         env=env, capture_output=True, text=True, timeout=300)
    rows = json.loads(res.stdout) if res.stdout.strip() else []
    assert rows and res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert {r["kernel"] for r in rows} == {"gn_stats", "gn_apply", "geglu_fwd"}
    assert all(r["ok"] and r["stop"] == "cubin" for r in rows), [r for r in rows if not r["ok"]]


def test_bench_fused_refuses_without_cuda(capsys):
    """python -m vidrd.kernels.bench_fused exits 2 with one line on a machine without CUDA; its shapes are SD2.1's."""
    from vidrd.kernels import bench_fused
    rows = bench_fused.shapes(512, 16)
    assert ("group_norm_silu 512px/320ch", "gn", (2, 320, 16, 64, 64)) in rows
    assert ("geglu 512px/640ch", "geglu", (2 * 16 * 32 * 32, 2 * 4 * 640)) in rows
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the benchmark would run")
    assert bench_fused.main([]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and err.count("\n") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_gpu_fused_match_torch(dtype):
    """On a CUDA machine: the compiled kernels (no interpreter) match the torch ops on UNet and odd shapes."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "vidrd.kernels.bench_fused", "--check", "--res", "256",
                          "--frames", "8", "--dtype", dtype], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
