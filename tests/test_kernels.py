"""vidrd.kernels: Triton attention vs torch SDPA under the interpreter, GPU compile checks, fallback, custom op.

Runs on CPU: conftest sets TRITON_INTERPRET=1 before triton is imported, so the kernels run in
Triton's interpreter (which computes in fp32 after loads: UPCAST). Inputs are seeded: each case draws from a
generator seeded by the case's name, so every run and every machine sees the same inputs.
"""
import json
import logging
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from tolerances import ATTENTION, TRITON_UNET_REL
from vidrd.kernels import attention, ops
from vidrd.kernels.ops import attention_into, plan

triton = pytest.importorskip("triton")

# (path, N, H, Lq, Lk, D); default configs: temporal when Lq, Lk <= 32, cross when Lk <= 128.
CASES = [
    ("spatial", 1, 2, 200, 200, 64),
    ("spatial", 1, 2, 150, 260, 40),
    ("spatial", 1, 1, 256, 256, 80),
    ("cross", 2, 2, 100, 77, 64),
    ("cross", 1, 2, 37, 77, 40),
    ("cross", 1, 1, 64, 77, 160),
    ("temporal", 6, 5, 16, 16, 64),
    ("temporal", 3, 5, 6, 6, 40),
    ("temporal", 4, 3, 8, 8, 80),
    ("temporal", 2, 3, 8, 12, 64),
]


def gen(name: str) -> torch.Generator:
    """A CPU generator seeded by `name` (crc32: stable across runs, processes and machines)."""
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _inputs(n, h, lq, lk, d, dtype, layout, g):
    """Seeded q (N,H,Lq,D), k, v (N,H,Lk,D) from generator g; 'nlhd' gives the strided views the UNet produces."""
    def make(length):
        if layout == "nlhd":  # (N, L, H, D) buffer viewed as (N, H, L, D)
            return torch.randn(n, length, h, d, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(n, h, length, d, generator=g).to(dtype)
    return make(lq), make(lk), make(lk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_sdpa(case, dtype):
    """Each path (spatial, cross Lk=77, temporal short sequences) matches SDPA and writes every output."""
    path, n, h, lq, lk, d = case
    seed = zlib.crc32(f"{case}-{dtype}".encode())  # the layout and scale vary over the cases, fixed per case
    layout = "nlhd" if seed % 2 else "nhld"
    scale = None if seed % 3 else 0.3
    q, k, v = _inputs(n, h, lq, lk, d, dtype, layout, torch.Generator().manual_seed(seed))
    name, consts, _ = plan("default", dtype, d, lq, lk, upcast=True)
    assert name == ("short_fwd" if path == "temporal" else "flash_fwd")
    if path == "temporal":
        assert consts["GROUP"] > 1
    out = torch.full((n, h, lq, d), float("nan"), dtype=dtype)
    got = attention_into(q, k, v, out, scale=scale)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    msg = f"seed={seed} layout={layout} scale={scale}"
    assert got is out and not out.isnan().any(), msg
    torch.testing.assert_close(out.float(), ref, atol=ATTENTION[dtype], rtol=ATTENTION[dtype], msg=msg)
    public = attention(q, k, v, scale=scale)
    assert public.shape == q.shape and public.dtype == dtype and public.stride() == torch.empty_like(q).stride()
    torch.testing.assert_close(public, out, atol=0, rtol=0, msg=msg)


def test_dispatch_by_shape():
    """The SD2.1 shapes pick the intended kernel and tiles on sm_90, sm_80 and unknown GPUs."""
    for key in ("sm_90", "sm_80", "default"):
        name, c, _ = plan(key, torch.float16, 64, 16, 16)
        assert name == "short_fwd" and c["GROUP"] * c["BLOCK_LQ"] >= 64 and c["BLOCK_D"] == 64
        name, c, _ = plan(key, torch.float16, 64, 4096, 77)
        assert name == "flash_fwd" and c["BLOCK_N"] == 128 and not c["EVEN_N"]
        name, c, _ = plan(key, torch.float16, 64, 4096, 4096)
        assert name == "flash_fwd" and c["EVEN_N"] and c["BLOCK_N"] < 4096
        name, c, _ = plan(key, torch.bfloat16, 40, 1024, 1024)
        assert c["BLOCK_D"] == 64 and c["HEAD_D"] == 40
        _, c, _ = plan(key, torch.float32, 160, 300, 300)
        assert c["BLOCK_D"] == 256 and c["IEEE"]


def test_fallback_logs_once(caplog):
    """Valid but unsupported inputs (D > 256, float64) return SDPA's result and log once per reason."""
    ops._warned.clear()
    g = gen("fallback")
    q, k, v = (torch.randn(1, 2, 5, 320, generator=g) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger="vidrd.kernels.ops"):
        for _ in range(2):
            torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
        q64, k64, v64 = (torch.randn(1, 2, 5, 16, dtype=torch.float64, generator=g) for _ in range(3))
        torch.testing.assert_close(attention(q64, k64, v64), F.scaled_dot_product_attention(q64, k64, v64))
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("head dim > 256" in m for m in msgs) == 1, msgs
    assert sum("torch.float64" in m for m in msgs) == 1, msgs


def test_fallback_cpu_without_interpreter(monkeypatch):
    """CPU tensors without TRITON_INTERPRET=1 fall back to SDPA; autograd inputs too, keeping gradients."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = gen("cpu-fallback")
    q, k, v = (torch.randn(1, 2, 20, 32, generator=g) for _ in range(3))
    assert ops._unsupported(q, k, v).startswith("CPU tensors")
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q.requires_grad_(True)
    attention(q, k, v).sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


def test_bad_shapes_raise():
    """Mismatched shapes, dtypes or ranks raise ValueError naming the shapes."""
    q = torch.zeros(2, 3, 10, 64)  # only the shapes and dtypes matter here
    with pytest.raises(ValueError, match=r"\(2, 3, 10, 64\).*\(2, 3, 7, 32\)"):
        attention(q, torch.zeros(2, 3, 7, 32), torch.zeros(2, 3, 7, 32))
    with pytest.raises(ValueError, match="k .*v "):
        attention(q, torch.zeros(2, 3, 7, 64), torch.zeros(2, 3, 8, 64))
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="dtype"):
        attention(q, q.half(), q)


def test_custom_op_compile_and_fake():
    """torch.ops.vidrd.attention traces as one op under torch.compile(fullgraph) and fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    g = gen("custom-op")
    q, k, v = (torch.randn(2, 2, l, 40, generator=g) for l in (24, 77, 77))
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fo = torch.ops.vidrd.attention(fq, fk, fv, None)
        assert fo.shape == (2, 2, 24, 40) and fo.dtype == q.dtype
    compiled = torch.compile(lambda a, b, c: attention(a, b, c, scale=0.2) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), F.scaled_dot_product_attention(q, k, v, scale=0.2) * 2,
                               atol=ATTENTION[torch.float32], rtol=ATTENTION[torch.float32])
    qs, ks, vs = _inputs(2, 3, 20, 77, 64, torch.float16, "nlhd", g)  # output strides follow q
    for args in ((q, k, v, None), (qs, ks, vs, 0.125)):
        torch.library.opcheck(torch.ops.vidrd.attention.default, args,
                              test_utils=("test_schema", "test_faketensor"))
    assert torch.ops.vidrd.attention(qs, ks, vs).transpose(1, 2).is_contiguous()


def test_bench_refuses_without_cuda(capsys):
    """python -m vidrd.kernels.bench exits 2 politely on a machine without CUDA; its shape list is SD2.1's."""
    from vidrd.kernels import bench
    rows = bench.shapes(512, 16)
    assert ("spatial 512px/320ch", 32, 5, 4096, 4096, 64) in rows
    assert ("cross 512px/640ch", 32, 10, 1024, 77, 64) in rows
    assert ("temporal 512px/320ch", 2 * 64 * 64, 5, 16, 16, 64) in rows
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the benchmark would run")
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_import_is_cheap():
    """import vidrd.kernels does not import triton (the kernels load on first use)."""
    code = "import sys, vidrd.kernels; assert 'triton' not in sys.modules; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_gpu_matches_sdpa(dtype):
    """On a CUDA machine: the compiled kernels (no interpreter) match SDPA on the UNet and odd shapes."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "vidrd.kernels.bench", "--check", "--res", "256",
                          "--frames", "8", "--dtype", dtype], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]


def _has_nvidia_backend():
    from triton.backends import backends
    return "nvidia" in backends


@pytest.fixture(scope="module", autouse=True)
def aot_sweep(request, tmp_path_factory):
    """Start `python -m vidrd.kernels.aot` at the module's first test so it overlaps the interpreter tests.

    Under the interpreter even tl.max / tl.cdiv are interpreted functions the compiler cannot lower,
    so the real JIT kernels are compiled in a subprocess with TRITON_INTERPRET unset:
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 80 | 90, 32)) needs
    no GPU, and the ptxas bundled with triton turns the PTX into a cubin. To stay fast, the default run
    (--stop auto) takes the fp16 sm_80 / sm_90 entries all the way to cubin and stops every other case
    after LLIR (ttir -> ttgir -> llir: shared memory is allocated and layout / tl.dot shape errors
    surface there); VIDRD_SLOW=1 takes every case to cubin.
    """
    wanted = any(item.name.startswith("test_config_compiles") for item in request.session.items)
    if not wanted or not _has_nvidia_backend():
        yield None
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    stop = "cubin" if os.environ.get("VIDRD_SLOW") == "1" else "auto"
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "vidrd.kernels.aot", "--json", "--stop", stop],
                                env=env, stdout=f, stderr=subprocess.PIPE, text=True)
        yield proc, out
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def compiled_rows(aot_sweep):
    """Rows of the compile sweep by case id; each also checks shared memory against its GPUs' limit."""
    if aot_sweep is None:
        pytest.skip("triton has no NVIDIA backend")
    proc, out = aot_sweep
    _, err = proc.communicate(timeout=1200)
    text = out.read_text()
    assert text.strip(), err[-4000:]
    return {_case_id(r): r for r in json.loads(text)}


def _case_id(c):
    return f"{c['key']}-sm{c['arch']}-{c['dtype']}-{c['path']}-d{c['d']}-{c['lq']}x{c['lk']}"


def _compile_cases():
    from vidrd.kernels.aot import cases
    return cases()


@pytest.mark.parametrize("case", _compile_cases(), ids=_case_id)
def test_config_compiles_for_gpu(case, compiled_rows):
    """Every configs.json entry x path x head-dim bucket x dtype compiles for its GPU and fits its shared memory."""
    row = compiled_rows[_case_id(case)]
    assert row["error"] is None, row["error"]
    assert row["stop"] in ("llir", "cubin")
    assert row["shared"] <= row["smem_limit"], row
    assert row["ok"], row


def test_tiny_unet_with_triton_attention_matches_sdpa():
    """The model's attention switch routes all three attention kinds of the UNet through the Triton kernels."""
    from vidrd.ref.attention import set_attention
    from vidrd.ref.weights import random_model

    unet = random_model("tiny", 0).unet
    g = gen("tiny-unet")
    x, ctx = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        want = unet(x, 501, ctx)
        try:
            got = set_attention(unet, "triton")(x, 501, ctx)
        finally:
            set_attention(unet, "sdpa")
    err = ((got - want).abs().max() / max(1.0, want.abs().max().item())).item()
    print(f"tiny UNet, Triton vs SDPA attention: max abs error / max(1, max |out|) = {err:.3g}")
    assert err <= TRITON_UNET_REL
