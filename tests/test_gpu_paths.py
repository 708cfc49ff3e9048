"""The GPU paths' fixes, checked on the CPU where they can be (only CUDA APIs are stood in for), and on a GPU.

Stream ordering (ONNX Runtime, TensorRT), event timing in the benchmark, the benchmark's host-side accuracy, the VAE's
dtype default and non-finite check, *255 in float32, engines built without guidance, SDPA batch slices, and the
`gpu-check` command on a machine without CUDA. Tests marked gpu run on a CUDA machine (`./dev gpu-check` runs them).
"""
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tolerances import (BENCH_FP16_PSNR_DB, BENCH_FP32_PSNR_DB, FP16_GPU_VIDEO, PSNR_ROUNDING_DB, SDPA_SLICES,
                        UNET_SDPA_SLICES)
from vidrd.ref.sampler import SamplerSettings
from vidrd.ref.weights import random_model
from vidrd.runtime import backends
from vidrd.runtime.backends import ort as ort_backend
from vidrd.runtime.backends import trt as trt_backend
from vidrd.runtime.bench import runtime as bench
from vidrd.runtime.loop import Limits, NonFiniteOutput, Request, Runtime
from vidrd.runtime.options import RuntimeOptions, open_runtime

ROOT = Path(__file__).resolve().parents[1]
SMALL = Limits(batch=1, frames=4, height=32, width=32, steps=2, overlap=2)
REQUEST = Request(("a",), None, SamplerSettings(height=32, width=32, frames=4, steps=1), float_video=True)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return random_model("tiny", 0)


class FakeStream:
    """Stands in for torch.cuda.Stream: records synchronize/wait_stream into a shared event list."""

    def __init__(self, name, events, handle=0):
        self.name, self.events, self.cuda_stream = name, events, handle

    def synchronize(self):
        self.events.append(f"{self.name}.synchronize")

    def wait_stream(self, other):
        self.events.append(f"{self.name} waits {other.name}")


# --------------------------------------------------------------------------------- 1, 6: ONNX Runtime on CUDA

def test_onnxruntime_on_cuda_waits_for_torchs_stream(monkeypatch):
    events = []

    class Binding:
        def bind_input(self, name, dev, idx, dtype, shape, ptr):
            events.append(f"bind {name} {dev}")

        bind_output = bind_input

        def synchronize_inputs(self):
            events.append("ort.synchronize_inputs")

        def synchronize_outputs(self):
            events.append("ort.synchronize_outputs")

    comp = object.__new__(ort_backend.OrtGraph)
    comp.spec = SimpleNamespace(name="unet", input_names=["sample"])
    comp.device, comp.binding = torch.device("cuda"), Binding()
    comp.sess = SimpleNamespace(run_with_iobinding=lambda b: events.append("ort.run"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream("torch", events))
    comp.run({"sample": torch.zeros(2), "noise_pred": torch.zeros(2)})
    assert events == ["bind sample cuda", "bind noise_pred cuda", "torch.synchronize", "ort.synchronize_inputs",
                      "ort.run", "ort.synchronize_outputs"]


def test_onnxruntime_tensorrt_provider_gets_a_cache_and_the_export_ranges(monkeypatch, tmp_path):
    import onnxruntime

    from vidrd.export.ort import make_session
    from vidrd.export.spec import component_specs
    from vidrd.ref.config import preset

    spec = component_specs(preset("tiny"))["unet"]
    opts = ort_backend.trt_profile_options(spec)
    n, f, h = spec.dims["N"], spec.dims["F"], spec.dims["h"]
    assert opts["trt_profile_min_shapes"] == f"sample:{n.min}x4x{f.min}x{h.min}x{h.min},timestep:{n.min}," \
                                             f"encoder_hidden_states:{n.min}x77x32"
    assert opts["trt_profile_max_shapes"].startswith(f"sample:{n.max}x4x{f.max}x{h.max}x{h.max},")
    seen = {}
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda path, so, providers: seen.update(p=providers) or
                        SimpleNamespace(get_providers=lambda: [providers[0][0]]))
    (tmp_path / "unet.onnx").write_bytes(b"")
    make_session(tmp_path / "unet.onnx", ("TensorrtExecutionProvider", "CUDAExecutionProvider"),
                 cache_dir=tmp_path / "cache", trt_options=opts)
    name, trt = seen["p"][0]
    assert name == "TensorrtExecutionProvider" and trt["trt_engine_cache_enable"] is True
    assert trt["trt_engine_cache_path"] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    assert trt["trt_timing_cache_enable"] is True and trt["trt_profile_opt_shapes"] == opts["trt_profile_opt_shapes"]
    assert seen["p"][1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


# --------------------------------------------------------------------------------- 5: TensorRT on its own stream

def test_tensorrt_runs_on_its_own_stream_ordered_with_torchs(monkeypatch):
    events = []

    class Context:
        def execute_async_v3(self, handle):
            events.append(f"execute on {handle}")
            return True

    class Graph:
        def capture_begin(self, capture_error_mode):
            events.append(f"capture_begin {capture_error_mode}")

        def capture_end(self):
            events.append("capture_end")

        def replay(self):
            events.append("replay")

    @contextmanager
    def on(stream):
        events.append(f"enter {stream.name}")
        yield
        events.append(f"exit {stream.name}")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream("torch", events, 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("device-wide synchronize"))
    comp = object.__new__(trt_backend.TrtGraph)
    tensors = {"sample": torch.zeros(2), "noise_pred": torch.zeros(2)}
    comp.name, comp.device, comp.context, comp.static = "unet", torch.device("cuda"), Context(), False
    comp.bound = tuple((t.data_ptr(), tuple(t.shape)) for t in tensors.values())  # bound already
    comp.warm, comp.graphs, comp.stream = set(), {}, FakeStream("trt", events, 1234)
    comp.run(tensors)
    assert events == ["trt waits torch", "enter trt", "execute on 1234", "exit trt", "torch waits trt"]
    events.clear()
    comp.static = True  # CUDA graphs: one eager run, then captured on TensorRT's stream, then replayed
    for _ in range(3):
        comp.run(tensors)
    inner = [e for e in events if "wait" not in e and "enter" not in e and "exit" not in e]
    assert inner == ["execute on 1234", "capture_begin thread_local", "execute on 1234", "capture_end", "replay",
                     "replay"]


# --------------------------------------------------------------------------------- 8: benchmark timing with events

def test_bench_times_cuda_calls_with_events_on_the_callers_stream(monkeypatch):
    events = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self, stream=None):
            events.append(f"record on {stream.name}")

        def elapsed_time(self, end):
            return 5.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream("decode", events))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("device-wide synchronize in a call"))
    calls = []
    timed = bench.Timed(SimpleNamespace(dtype=torch.float32), torch.device("cuda"))
    timed.backend = lambda *a: calls.append(a) or events.append("call")
    timed(1, 2)
    timed(3)
    assert calls == [(1, 2), (3,)] and timed.calls == 2
    assert events == ["record on decode", "call", "record on decode"] * 2
    assert timed.seconds == pytest.approx(0.010)
    timed.reset()
    assert timed.seconds == 0 and timed.calls == 0


# ------------------------------------------------------------------------------- 3: accuracy on one device

def test_bench_accuracy_brings_the_reference_to_the_host():
    g = torch.Generator().manual_seed(0)
    video, latents = torch.rand(1, 3, 8, 4, 4, generator=g), torch.randn(2, 1, 4, 4, 1, 1, generator=g)
    moved = []

    class Elsewhere:
        """A reference tensor on another device: usable only after .to('cpu', ...)."""

        def __init__(self, t):
            self.t = t

        def to(self, device, dtype=None):
            moved.append((device, dtype))
            return self.t.to(dtype)

    clips = [SimpleNamespace(video=video[:, :, :4], latents=latents[0]),
             SimpleNamespace(video=video[:, :, 4:], latents=latents[1])]
    acc = bench._accuracy(clips, (Elsewhere(video.double() + 0.01), Elsewhere(latents.double())))
    assert moved == [("cpu", torch.float32)] * 2
    assert acc["psnr_db"] == pytest.approx(40.0, abs=PSNR_ROUNDING_DB) and acc["latents_rel_err"] == 0


# ------------------------------------------------------------------------- 2, 9: the VAE's dtype and its output

def test_fp16_networks_keep_a_float32_vae_unless_asked(tiny):
    rt = open_runtime(tiny, RuntimeOptions(dtype="fp16"), SMALL)
    assert rt.unet.dtype == torch.float16 and rt.vae.dtype == torch.float32 and rt.dec_out.dtype == torch.float32
    rt = open_runtime(tiny, RuntimeOptions(dtype="fp16", vae_dtype="fp16"), SMALL)
    assert rt.vae.dtype == torch.float16 and rt.dec_f32.dtype == torch.float32
    rt = open_runtime(tiny, RuntimeOptions(dtype="bf16"), SMALL)
    assert rt.vae.dtype == torch.bfloat16


class WritesVAE(backends.Backend):
    """A VAE backend that writes fixed raw decoder values (or NaN) into the runtime's buffer."""

    def __init__(self, dtype, values):
        self.dtype, self.device, self.values = dtype, torch.device("cpu"), values

    def __call__(self, latents, out, temporal):
        flat = out.view(-1)
        flat.copy_(self.values.repeat(-(-flat.numel() // self.values.numel()))[: flat.numel()])


def _runtime(tiny, vae):
    be = {c: backends.make("torch", c, tiny, torch.float32, torch.device("cpu")) for c in ("text", "unet")}
    return Runtime(tiny, be["text"], be["unet"], vae, SMALL)


def test_decoded_clip_is_scaled_to_255_in_float32(tiny):
    raw = torch.linspace(-1, 1, 4097, dtype=torch.float16).unique()  # every step fp16 takes near 1
    x32 = (raw.float() / 2 + 0.5).clamp(0, 1)
    want = (x32 * 255).to(torch.uint8)  # float32 arithmetic, truncating cast
    in_fp16 = ((raw / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8)  # what float16 arithmetic gives
    assert (want != in_fp16).sum() > 10  # the values chosen tell the two apart
    rt = _runtime(tiny, WritesVAE(torch.float16, raw))
    clip = next(rt.generate(REQUEST))
    got = torch.from_numpy(clip.frames).permute(0, 1, 4, 2, 3).reshape(-1)  # back to (B,F,3,H,W) order
    n = got.numel()
    assert torch.equal(got, want.repeat(-(-n // want.numel()))[:n])
    assert clip.video.dtype == torch.float32


def test_non_finite_decode_raises_a_clear_error(tiny):
    rt = _runtime(tiny, WritesVAE(torch.float32, torch.tensor([0.1, float("nan"), float("inf")])))
    with pytest.raises(NonFiniteOutput, match=r"NaN or inf in clip 0.*--vae-dtype fp32"):
        list(rt.generate(REQUEST))
    rt.close()


# ---------------------------------------------------------------------- 4: engines built without guidance

class ProfileUNet(backends.Backend):
    """The torch UNet behind the TensorRT backend's shape check, with an engine profile of N in [1, n_max]."""

    def __init__(self, tiny, n_max):
        self.be = backends.make("torch", "unet", tiny, torch.float32, torch.device("cpu"))
        self.dtype, self.device = self.be.dtype, self.be.device
        self.sidecar = {"component": "unet", "engine": "unet.plan", "shapes": "--batch 1 --no-guidance",
                        "onnx_dir": "onnx", "engine_dir": "engines", "precision": "fp32",
                        "dims": {"N": [1, 1, n_max], "F": [2, 8, 16], "h": [4, 4, 8], "w": [4, 4, 8]},
                        "spec": {"dims": {k: {"multiple": 1} for k in "NFhw"}}}

    def check_shapes(self, batch, frames, height, width, *, guidance=True, temporal=False):
        from vidrd.export.engines import check_request
        check_request(self.sidecar, batch, frames, height, width, guidance)

    def __call__(self, *args):
        self.be(*args)


def test_engines_built_without_guidance_are_accepted_at_setup(tiny):
    from vidrd.export.engines import EngineMismatch

    be = {c: backends.make("torch", c, tiny, torch.float32, torch.device("cpu")) for c in ("text", "vae")}
    rt = Runtime(tiny, be["text"], ProfileUNet(tiny, 1), be["vae"], SMALL)  # N = B = 1
    s = SamplerSettings(height=32, width=32, frames=4, steps=1, guidance_scale=1.0)
    assert len(list(rt.generate(Request(("a",), None, s)))) == 1
    with pytest.raises(EngineMismatch, match="N=2"):  # a request with guidance needs N = 2B
        list(rt.generate(REQUEST))
    with pytest.raises(EngineMismatch, match="N=4"):  # neither N = 2B nor N = B fits: the guidance error
        Runtime(tiny, be["text"], ProfileUNet(tiny, 1), be["vae"], Limits(2, 4, 32, 32, 2, 2))


# --------------------------------------------------------------------- 7: SDPA in batch slices past 65,535

def test_sdpa_batch_slices_equal_one_call(monkeypatch, tiny):
    from vidrd.ref import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 2, 5, 8, generator=g) for _ in range(3))
    torch.testing.assert_close(attention.sdpa(q, k, v, 0.3, max_batch=3),
                               F.scaled_dot_product_attention(q, k, v, scale=0.3), rtol=SDPA_SLICES, atol=SDPA_SLICES)
    # the whole UNet (temporal attention has batch B*h*w) in slices of 3: same output, no SDPA call above 3
    x, ctx = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        want = tiny.unet(x, 501, ctx)
        batches, sdpa = [], F.scaled_dot_product_attention
        monkeypatch.setattr(attention, "SDPA_MAX_BATCH", 3)
        monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **kw: batches.append(q.shape[0]) or
                            sdpa(q, *a, **kw))
        got = tiny.unet(x, 501, ctx)
    assert max(batches) == 3 and len(batches) > 20
    torch.testing.assert_close(got, want, rtol=UNET_SDPA_SLICES, atol=UNET_SDPA_SLICES)


# ------------------------------------------------------------------------------- gpu-check without a GPU

def test_gpu_check_without_cuda_says_so_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: gpu-check would run")
    env = {**os.environ, "PYTHON": sys.executable}  # ./dev uses this python (it has torch): no venv set-up
    t0 = time.perf_counter()
    res = subprocess.run(["bash", str(ROOT / "dev"), "gpu-check"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in res.stderr
    assert time.perf_counter() - t0 < 60


def test_gpu_check_report_table():
    import gpu_check

    row = {"workload": "sd21-base", "config": {"dtype": "fp16"}, "s_per_frame": 0.05, "reference_s_per_frame": 0.5,
           "speedup": 10.0, "psnr_db": 35.2, "latents_rel_err": 0.01, "peak_cuda_mb": 9000.0}
    report = {"machine": {"gpu": "H100", "capability": "9.0", "gpu_memory_gb": 79.1, "torch": "2.11", "cuda": "13.0",
                          "triton": "3.6", "onnxruntime": "1.30", "tensorrt": None}, "total_s": 600.0,
              "sections": {"sd21_base": {"status": "ok", "seconds": 300, "rows": [row], "best": {"dtype": "fp16"}},
                           "tensorrt": {"status": "skipped", "reason": "TensorRT is not installed"}}}
    md = gpu_check.markdown(report)
    assert "| tensorrt | skipped |  | TensorRT is not installed |" in md
    assert "| sd21_base | sd21-base | dtype=fp16 | 0.05 | 0.5 | 10 | 35.2 | 0.01 | 9000 |" in md


# ------------------------------------------------------------------------------------------------ on a GPU

def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.mark.gpu
def test_gpu_sdpa_past_the_grid_limit():
    from vidrd.ref.attention import SDPA_MAX_BATCH, sdpa

    dev = _cuda()
    g = torch.Generator(device=dev).manual_seed(0)
    n = SDPA_MAX_BATCH + 100  # (2B h w) of eight 512 px prompts is 65,536
    q, k, v = (torch.randn(n, 5, 16, 64, device=dev, generator=g, dtype=torch.float16) for _ in range(3))
    got = sdpa(q, k, v)
    for i in (0, SDPA_MAX_BATCH - 1, n - 1):  # the slices agree with SDPA on single sequences
        torch.testing.assert_close(got[i:i + 1], F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1]))


@pytest.mark.gpu
def test_gpu_fp16_runtime_keeps_a_float32_vae_and_finite_frames(tiny):
    dev = _cuda()
    from vidrd.ref.loading import to
    model = to(random_model("tiny", 0), device=dev)
    s = SamplerSettings(height=64, width=64, frames=4, steps=3, clips=2, overlap=2)
    request = Request(("a boat",), ("watermark",), s, 42, True)
    videos = []
    for dtype in ("fp32", "fp16"):
        rt = open_runtime(model, RuntimeOptions(dtype=dtype, device=str(dev)), Limits(1, 4, 64, 64, 3, 2))
        assert rt.vae.dtype == torch.float32
        videos.append(torch.cat([c.video for c in rt.generate(request)], 2))
        rt.close()
    assert torch.isfinite(videos[1]).all() and (videos[0] - videos[1]).abs().max() < FP16_GPU_VIDEO


@pytest.mark.gpu
def test_gpu_bench_runs_to_the_end_with_events():
    _cuda()
    row = bench.run("tiny", RuntimeOptions(device="cuda"), repeats=1, log=lambda *a: None)
    assert row["psnr_db"] > BENCH_FP32_PSNR_DB and row["median"]["unet_s"] > 0 and row["median"]["vae_s"] > 0
    half = bench.run("tiny", RuntimeOptions(dtype="fp16", device="cuda"), repeats=1, log=lambda *a: None)
    assert half["psnr_db"] > BENCH_FP16_PSNR_DB and np.isfinite(half["latents_rel_err"])
