"""--quality exact|balanced|fast (runtime/quality.py): resolved as documented, explicit settings win, contradictions
refused before any work, and accepted by vidrd generate, bench, eval, the service's requests and the Python API.

bf16's speed is substituted (`bf16` fixture), so the resolution is the same on every machine."""
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from tolerances import assert_uint8_close
from vidrd.ref.reuse import PRESETS as REUSE
from vidrd.ref.sampler import SamplerSettings, generate
from vidrd.ref.weights import random_model
from vidrd.runtime import precision
from vidrd.runtime.bench.metrics import ssim
from vidrd.runtime.bench.runtime import WORKLOADS
from vidrd.runtime.cli import main
from vidrd.runtime.loop import Limits, Request
from vidrd.runtime.options import RuntimeOptions, open_runtime
from vidrd.runtime.quality import resolve
from vidrd.runtime.video_io import read_video, to_uint8

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REUSE_FIELDS = ("cache_interval", "cache_from", "cache_until", "cache_depth", "guidance_reuse_after", "guidance_refresh")


@pytest.fixture
def bf16(monkeypatch):
    """bf16_support substituted: bf16(True) makes bf16 fast on every device, bf16(False) slow."""
    def set_fast(fast: bool):
        reason = "CPU has AVX512-BF16" if fast else "CPU lacks bf16 units (AVX2 only): bf16 would be emulated"
        monkeypatch.setattr(precision, "bf16_support", lambda device: (fast, reason))
    return set_fast


def reuse_of(s: SamplerSettings) -> dict:
    return {k: getattr(s, k) for k in REUSE_FIELDS}


# ---------------------------------------------------------------------------------------------- resolution

@pytest.mark.parametrize("quality, requested, steps", [
    ("exact", 25, 25), ("balanced", 25, 15), ("balanced", 50, 30), ("fast", 25, 10), ("fast", 50, 20),
    ("balanced", 5, 4), ("fast", 5, 4), ("fast", 3, 3),  # at least 4 steps, never more than requested
])
def test_presets_resolve_as_documented(bf16, quality, requested, steps):
    bf16(True)
    q = resolve(quality, SamplerSettings(steps=requested, clips=3), RuntimeOptions(device="cpu"))
    s = q.settings
    assert s.steps == steps and q.requested_steps == requested and s.clips == 3
    if quality == "exact":
        assert s == SamplerSettings(steps=requested, clips=3) and q.options.dtype == "fp32"
        assert not q.options.vae_channels_last and q.summary()["vae_channels_last"] is False
        assert not q.options.fast_ops and q.summary()["fast_ops"] is False
        assert q.line() == f"quality exact (the official sampler): ddim, {steps} steps, no feature reuse, no guidance " \
            "reuse, fp32"
        return
    assert s.solver == "dpmpp-2m" and s.spacing == "trailing" and reuse_of(s) == asdict(REUSE[quality])
    assert q.options.dtype == "bf16" and q.options.device == "cpu"
    line = q.line()
    assert line.startswith(f"quality {quality}: dpmpp-2m (trailing timesteps), {steps} steps "
                           f"({REUSE_FRACTION[quality]} x {requested} ")
    guidance = "no guidance reuse" if quality == "fast" else "guidance reuse after 0.7 of the steps"
    assert "no feature reuse" in line and guidance in line and line.endswith(
        "channels-last VAE (torch VAE decoder: about 1.2x faster on CPU, within 1e-4), fast ops (torch UNet and VAE decoder: "
        "faster kernels within float rounding), bf16 (CPU has AVX512-BF16)")
    assert q.options.vae_channels_last and q.options.fast_ops
    summary = q.summary()
    assert summary["quality"] == quality and summary["steps"] == steps and summary["dtype"] == "bf16"
    assert summary["vae_channels_last"] is True and "vae_channels_last" in summary["why"]
    assert summary["fast_ops"] is True and "fast_ops" in summary["why"]
    json.dumps(summary, allow_nan=False)


REUSE_FRACTION = {"balanced": "0.6", "fast": "0.4"}


def test_bf16_only_where_it_is_fast(bf16):
    bf16(False)
    q = resolve("balanced", SamplerSettings(), RuntimeOptions(device="cpu"))
    assert q.options.dtype == "fp32" and q.line().endswith("fp32 (bf16 is not fast here: CPU lacks bf16 units (AVX2 "
                                                           "only): bf16 would be emulated)")


def test_explicit_settings_win(bf16):
    bf16(True)
    s = SamplerSettings(steps=30, solver="ddim", cache_interval=4, guidance_reuse_after=1.0)
    q = resolve("fast", s, RuntimeOptions(device="cpu"),
                explicit={"steps", "solver", "cache_interval", "guidance_reuse_after", "dtype"})
    assert (q.settings.steps, q.settings.solver, q.settings.cache_interval, q.settings.guidance_reuse_after) == \
        (12, "ddim", 4, 1.0)  # --steps is the request, which the preset scales (0.4 x 30)
    assert q.settings.cache_from == REUSE["fast"].cache_from  # what was not given comes from the preset
    assert q.options.dtype == "fp32" and "12 steps (0.4 x 30 requested)" in q.line() and "fp32 (--dtype given)" in q.line()
    # given values that contradict each other are named
    with pytest.raises(ValueError, match="cache_from=0.95 must not exceed cache_until=0.9"):
        resolve("fast", SamplerSettings(cache_from=0.95, cache_until=0.9), explicit={"cache_from", "cache_until"})


def test_vae_channels_last_only_on_the_torch_vae_and_explicit_wins(bf16, tmp_path):
    bf16(False)
    s = SamplerSettings()
    q = resolve("fast", s, RuntimeOptions(device="cpu"), explicit={"vae_channels_last"})  # --no-vae-channels-last
    assert not q.options.vae_channels_last and "default-layout VAE (--no-vae-channels-last given)" in q.line()
    q = resolve("exact", s, RuntimeOptions(vae_channels_last=True, device="cpu"), explicit={"vae_channels_last"})
    assert q.options.vae_channels_last and q.line().endswith("channels-last VAE (--vae-channels-last given), fp32")
    q = resolve("balanced", s, RuntimeOptions(unet_backend="onnxruntime", export_dir=str(tmp_path), device="cpu"))
    assert q.options.vae_channels_last  # the UNet's backend does not matter
    q = resolve("balanced", s, RuntimeOptions(vae_backend="onnxruntime", export_dir=str(tmp_path), device="cpu"))
    assert not q.options.vae_channels_last and q.summary()["vae_channels_last"] is False
    assert "default-layout VAE (kept: the onnxruntime VAE decoder is an exported graph)" in q.line()
    q = resolve("fast", s, RuntimeOptions("reference", device="cpu"))
    assert not q.options.vae_channels_last and "default-layout VAE (kept: the reference sampler runs as written" in q.line()
    q = resolve("fast", s, RuntimeOptions(compile="default", device="cpu"))
    assert q.options.vae_channels_last  # the compiled torch decoder too
    assert resolve("fast", s, None).summary()["vae_channels_last"] is None  # the service: its runtime's own


def test_fast_ops_on_a_torch_unet_or_vae_and_explicit_wins(bf16, tmp_path):
    bf16(False)
    s, onnx = SamplerSettings(), str(tmp_path)
    q = resolve("fast", s, RuntimeOptions(device="cpu"), explicit={"fast_ops"})  # --no-fast-ops
    assert not q.options.fast_ops and "default ops (--no-fast-ops given)" in q.line()
    q = resolve("exact", s, RuntimeOptions(fast_ops=True, device="cpu"), explicit={"fast_ops"})
    assert q.options.fast_ops and q.line().endswith("fast ops (--fast-ops given), fp32")
    assert not resolve("exact", s, RuntimeOptions(device="cpu")).options.fast_ops  # exact: off unless given
    q = resolve("balanced", s, RuntimeOptions(unet_backend="onnxruntime", export_dir=onnx, device="cpu"))
    assert q.options.fast_ops and "fast ops (torch VAE decoder: faster kernels" in q.line()
    q = resolve("balanced", s, RuntimeOptions(vae_backend="onnxruntime", export_dir=onnx, device="cpu"))
    assert q.options.fast_ops and "fast ops (torch UNet: faster kernels" in q.line()
    q = resolve("fast", s, RuntimeOptions("onnxruntime", export_dir=onnx, device="cpu"))
    assert not q.options.fast_ops and "default ops (kept: the UNet and the VAE decoder are exported graphs)" in q.line()
    q = resolve("fast", s, RuntimeOptions("reference", device="cpu"))
    assert not q.options.fast_ops and "default ops (kept: the reference sampler runs as written)" in q.line()
    assert resolve("fast", s, None).summary()["fast_ops"] is None  # the service: its runtime's own


@pytest.mark.parametrize("given, flag", [
    (dict(cache_interval=2), "--cache-interval"), (dict(guidance_reuse_after=0.5), "--guidance-reuse-after"),
    (dict(solver="dpmpp-2m"), "--solver"), (dict(cache_depth=2), "--cache-depth"), (dict(spacing="trailing"), "--spacing"),
])
def test_exact_with_reuse_or_another_solver_is_a_contradiction(given, flag):
    with pytest.raises(ValueError, match=f"^--quality exact runs the official sampler; drop {flag} or choose "
                       r"--quality balanced\|fast$"):
        resolve("exact", SamplerSettings(**given), RuntimeOptions(device="cpu"), explicit=set(given))
    # the same values as exact's are no contradiction, and unset ones are not looked at
    resolve("exact", SamplerSettings(), RuntimeOptions(device="cpu"), explicit=set(given))
    resolve("exact", SamplerSettings(steps=7), RuntimeOptions(device="cpu"), explicit={"steps", "dtype"})


def test_backends_limit_what_a_preset_sets(bf16, tmp_path):
    bf16(True)
    onnx = RuntimeOptions(unet_backend="onnxruntime", export_dir=str(tmp_path), device="cpu")
    q = resolve("balanced", SamplerSettings(), onnx)
    assert q.settings.cache_interval == 1 and q.settings.guidance_reuse_after == 0.7  # guidance reuse stays
    assert q.options.dtype == "fp32" and ", no feature reuse, " in q.line()  # none to leave off
    assert "fp32 (kept: exported graphs (onnxruntime) run in the precision they were exported in)" in q.line()
    with pytest.raises(ValueError, match="^--cache-interval 2 .*needs the eager torch UNet: the onnxruntime UNet"):
        resolve("balanced", SamplerSettings(cache_interval=2), onnx, explicit={"cache_interval"})
    q = resolve("fast", SamplerSettings(), RuntimeOptions(compile="default", device="cpu"))
    assert q.settings == resolve("fast", SamplerSettings(), RuntimeOptions(device="cpu")).settings  # no reuse to drop
    assert q.options.dtype == "bf16" and q.options.compile == "default"
    q = resolve("fast", SamplerSettings(), RuntimeOptions("reference", device="cpu"))
    assert q.settings.cache_interval == REUSE["fast"].cache_interval and q.options.dtype == "fp32" and \
        "reference sampler" in q.line()
    with pytest.raises(ValueError, match="choose one of exact, balanced, fast"):
        resolve("turbo", SamplerSettings())


def test_service_resolution_leaves_the_dtype_alone(bf16):
    bf16(True)
    q = resolve("fast", SamplerSettings(guidance_scale=1.0), None, spell=lambda name: name)
    assert q.options is None and q.summary()["dtype"] is None and \
        q.settings.cache_interval == REUSE["fast"].cache_interval
    assert q.line().endswith("no guidance reuse (no guidance), the service's dtype")
    with pytest.raises(ValueError, match="^quality exact runs the official sampler; drop cache_interval or choose "
                       r"quality balanced\|fast$"):
        resolve("exact", SamplerSettings(cache_interval=2), None, {"cache_interval"}, spell=lambda name: name)


# ------------------------------------------------------------------------------------------------ entry points

def test_python_api(bf16):
    """resolve, then load the model in its dtype and run its settings: the runtime and the reference sampler."""
    bf16(False)
    # --no-fast-ops: the tiny random model amplifies their rounding (tolerances.FAST_OPS_*; test_fast_ops.py)
    q = resolve("fast", SamplerSettings(height=32, width=32, frames=4, steps=10, clips=2, overlap=2),
                RuntimeOptions(fast_ops=False), explicit={"fast_ops"})
    assert q.settings.steps == 4 and q.options.torch_dtype == torch.float32
    assert q.options.vae_channels_last  # within RUNTIME_VIDEO of the default layout on the tiny model (tolerances)
    model = random_model("tiny", 0, dtype=q.options.torch_dtype)
    rt = open_runtime(model, q.options, Limits.of(q.settings, 1))
    clips = list(rt.generate(Request(("a boat",), None, q.settings, seed=5)))
    video, _ = generate(model, ["a boat"], None, q.settings, torch.Generator().manual_seed(5))
    assert_uint8_close(np.concatenate([c.frames[0] for c in clips]), to_uint8(video[0]))


SMALL = ["--height", "32", "--width", "32", "--frames", "4", "--clips", "2", "--overlap", "2", "--no-progress",
         "--preset", "tiny", "--device", "cpu"]


def test_generate_quality_fast(bf16, tmp_path, capsys):
    bf16(False)
    out = tmp_path / "frames"
    # --no-fast-ops: the tiny random model amplifies their rounding (tolerances.FAST_OPS_*; test_fast_ops.py)
    assert main(["generate", "a boat", "-o", str(out), "--quality", "fast", "--steps", "10", "--no-fast-ops",
                 *SMALL]) == 0
    err = capsys.readouterr().err
    assert "quality fast: dpmpp-2m (trailing timesteps), 4 steps (0.4 x 10 requested), no feature reuse, no " \
        "guidance reuse" in err
    assert ", channels-last VAE (torch VAE decoder: " in err and ", default ops (--no-fast-ops given)" in err
    s = SamplerSettings(height=32, width=32, frames=4, steps=4, clips=2, overlap=2, solver="dpmpp-2m",
                        spacing="trailing", **asdict(REUSE["fast"]))
    video, _ = generate(random_model("tiny", 0), ["a boat"], ["watermark"], s, torch.Generator().manual_seed(42))
    assert_uint8_close(read_video(out), to_uint8(video[0]))  # PNG frames: lossless


@pytest.mark.parametrize("flags, needle", [
    (["--quality", "exact", "--cache-interval", "2"], "--quality exact runs the official sampler; drop "
     "--cache-interval"),
    (["--quality", "balanced", "--unet-backend", "onnxruntime", "--onnx", "x", "--cache-interval", "2"],
     "--cache-interval 2 (UNet feature reuse) needs the eager torch UNet"),
    (["--cache-interval", "2", "--compile", "default"], "--cache-interval 2 (UNet feature reuse) needs the eager"),
    (["--quality", "fast", "--cache-from", "0.95", "--cache-until", "0.9"], "cache_from=0.95 must not exceed"),
    (["--quality", "fast", "--vae-backend", "onnxruntime", "--onnx", "x", "--vae-channels-last"],
     "--vae-channels-last applies to the torch VAE decoder, not the onnxruntime VAE decoder"),
    (["--backend", "reference", "--vae-channels-last"], "--vae-channels-last applies to the torch VAE decoder, not "
     "--backend reference"),
])
def test_generate_contradictions_fail_before_any_work(tmp_path, capsys, flags, needle):
    out = tmp_path / "v.gif"
    assert main(["generate", "a boat", "-o", str(out), "--steps", "2", *SMALL, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vidrd generate: error: ") and needle in err, err
    assert not out.exists()


def test_bench_quality_compares_with_the_exact_reference(bf16, capsys):
    """The runtime runs the preset; the baseline stays the float32 reference at the workload's settings."""
    bf16(False)
    assert main(["bench", "--workload", "tiny", "--repeats", "1", "--quality", "fast"]) == 0
    out = capsys.readouterr()
    assert "[bench] quality fast: dpmpp-2m (trailing timesteps), 3 steps" in out.err
    summary = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")][-1]
    base = WORKLOADS["tiny"]["settings"]
    assert summary["baseline_settings"] == asdict(base) and summary["quality"]["quality"] == "fast"
    assert summary["settings"]["solver"] == "dpmpp-2m" and summary["settings"]["spacing"] == "trailing"
    assert summary["config"]["dtype"] == "fp32" and summary["quality"]["spacing"] == "trailing"
    assert summary["config"]["vae_channels_last"] is True and summary["quality"]["vae_channels_last"] is True
    # tiny: 3 steps x 2 clips, every call whole (fast reuses nothing)
    assert summary["unet_calls_by_mode"] == {"full": 6, "store": 0, "reuse": 0}
    assert summary["unet_cond_only_calls"] == 0
    assert summary["unet_gflop_per_run"] == pytest.approx(6 * summary["unet_gflop_per_call"])
    assert 0 < summary["psnr_db"] < 60 and 0 < summary["ssim"] < 1  # another sampler: close, not equal
    assert main(["bench", "--workload", "tiny", "--repeats", "1", "--quality", "exact"]) == 0
    summary = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1]
    assert summary["quality"]["quality"] == "exact" and summary["ssim"] == 1.0
    assert summary["psnr_db"] is None and "identical" in summary["non_finite"]["psnr_db"]  # standard JSON: no Infinity
    assert summary["config"]["vae_channels_last"] is False  # exact: bit for bit the reference
    assert summary["unet_calls_by_mode"] == {"full": 6, "store": 0, "reuse": 0} and summary["unet_cond_only_calls"] == 0


def test_eval_quality(bf16, tmp_path, capsys):
    bf16(False)
    out = tmp_path / "report.json"
    assert main(["eval", "--preset", "tiny", "--samples", "1", "--steps", "4", "--clips", "2", "--no-progress",
                 "--quality", "balanced", "--out", str(out)]) == 0
    assert "quality balanced: dpmpp-2m (trailing timesteps), 4 steps (0.6 x 4 requested, kept within 4..4)" in \
        capsys.readouterr().err
    config = json.loads(out.read_text())["config"]
    assert config["quality"]["quality"] == "balanced" and config["quality"]["dtype"] == "fp32"
    assert config["settings"]["solver"] == "dpmpp-2m" and \
        config["settings"]["guidance_reuse_after"] == REUSE["balanced"].guidance_reuse_after


def test_service_request_quality():
    pytest.importorskip("fastapi")
    from fastapi.exceptions import RequestValidationError

    from vidrd.runtime.serve.api import VideoRequest, to_spec
    from vidrd.runtime.loop import Limits
    from vidrd.runtime.serve.jobs import ServeConfig
    config = ServeConfig(limits=Limits(steps=50))
    spec = to_spec(VideoRequest(prompts=["a"], quality="balanced"), config)
    assert spec["settings"]["steps"] == 30 and spec["settings"]["solver"] == "dpmpp-2m"
    assert {k: spec["settings"][k] for k in REUSE_FIELDS} == asdict(REUSE["balanced"])
    assert spec["quality"]["quality"] == "balanced" and spec["quality"]["dtype"] is None
    spec = to_spec(VideoRequest(prompts=["a"], quality="fast", steps=12, cache_interval=1), config)
    assert spec["settings"]["steps"] == 5 and spec["settings"]["cache_interval"] == 1  # steps scaled, given fields win
    assert to_spec(VideoRequest(prompts=["a"]), config)["quality"] is None
    for body, field in ((dict(quality="exact", guidance_reuse_after=0.5), "quality"),
                        (dict(quality="fast", cache_from=0.95, cache_until=0.9), "cache_from")):
        with pytest.raises(RequestValidationError) as e:
            to_spec(VideoRequest(prompts=["a"], **body), config)
        assert e.value.errors()[0]["loc"] == ("body", field)
    with pytest.raises(RequestValidationError) as e:  # the resolved steps must fit the service's limit
        to_spec(VideoRequest(prompts=["a"], quality="fast"), ServeConfig(limits=Limits(steps=12)))
    assert e.value.errors()[0]["loc"] == ("body", "steps") and "steps=20 exceeds" in e.value.errors()[0]["msg"]


def test_service_with_an_exported_unet_leaves_feature_reuse_off():
    pytest.importorskip("fastapi")
    from fastapi.exceptions import RequestValidationError

    from vidrd.runtime.cli import parser
    from vidrd.runtime.serve.api import VideoRequest, to_spec
    from vidrd.runtime.cli.serve import config_from
    config = config_from(parser().parse_args(["serve", "--preset", "tiny", "--unet-backend", "onnxruntime", "--onnx",
                                              "x", "--max-steps", "50"]))
    assert config.feature_reuse_off.startswith("the onnxruntime UNet is an exported graph")
    assert config_from(parser().parse_args(["serve", "--preset", "tiny"])).feature_reuse_off is None
    spec = to_spec(VideoRequest(prompts=["a"], quality="balanced"), config)
    assert spec["settings"]["cache_interval"] == 1 and spec["settings"]["guidance_reuse_after"] == 0.7
    assert "reuse" not in spec["quality"]["why"]  # the presets reuse no features, so nothing was left off
    for body in (dict(quality="fast", cache_interval=2), dict(cache_interval=2)):
        with pytest.raises(RequestValidationError) as e:
            to_spec(VideoRequest(prompts=["a"], **body), config)
        err = e.value.errors()[0]
        assert err["loc"] == ("body", "cache_interval") and "needs the eager torch UNet" in err["msg"]


# -------------------------------------------------------------------------------------------------------- SSIM

def test_ssim():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 2, 24, 20, generator=g)  # (B,3,T,H,W)
    noisy = (a + 0.1 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, noisy) == pytest.approx(ssim(noisy, a), abs=1e-12) and 0 < ssim(a, noisy) < 0.95
    assert ssim(a, (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(0, 1)) < ssim(a, noisy)
    # constant frames x, y: no variance, so SSIM = (2xy + C1) / (x^2 + y^2 + C1)
    x, y, c1 = 0.2, 0.6, 0.01 ** 2
    got = ssim(torch.full((1, 3, 1, 16, 16), x), torch.full((1, 3, 1, 16, 16), y))
    assert got == pytest.approx((2 * x * y + c1) / (x * x + y * y + c1), rel=1e-6)
    small = torch.rand(1, 3, 1, 4, 6, generator=g)  # frames under 11 pixels: one window of the frame's size
    assert ssim(small, small) == pytest.approx(1.0, abs=1e-12) and ssim(small, 1 - small) < 0.5
