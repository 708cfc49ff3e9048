"""TensorRT engines: profiles from the specs, shape rejection, sidecars and the up-to-date skip, every error message,
the build-engines CLI. The GPU tests build tiny engines and compare them with ONNX Runtime and the torch backend;
they skip, saying why, without TensorRT and a CUDA GPU."""
import json
import sys

import pytest
import torch

from tolerances import TRT_FP32, TRT_RUNTIME_VIDEO
from vidrd.export import engines
from vidrd.export.engines import EngineMismatch, Shapes, TensorRTUnavailable, build_all, parse_range, profile_dims
from vidrd.export.onnx_export import FORMAT, file_sha256
from vidrd.export.spec import component_specs
from vidrd.ref.config import preset
from vidrd.runtime.backends import trt as trt_backend
from vidrd.runtime.cli import main

ENV = {"tensorrt": "10.15.1.29", "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}}
OTHER_GPU = {"tensorrt": ENV["tensorrt"], "gpu": {"name": "NVIDIA L4", "compute_capability": "8.9"}}
OTHER_TRT = {"tensorrt": "10.9.0.34", "gpu": ENV["gpu"]}


@pytest.fixture(scope="module")
def specs():
    return component_specs(preset("tiny"))


def _write_export(d, specs, precision="fp32", tag=""):
    """A folder shaped like `vidrd export` output; the .onnx files are stand-ins (only the builder parses them)."""
    d.mkdir(exist_ok=True)
    comps = {}
    for name, spec in specs.items():
        (d / spec.file).write_bytes(f"stand-in for {name}{tag}".encode())
        comps[name] = {"file": spec.file, "external_data": None, "bytes": (d / spec.file).stat().st_size,
                       "sha256": file_sha256(d / spec.file), "spec": spec.to_json()}
    manifest = {"format": FORMAT, "complete": True, "precision": precision, "weights_sha256": "0" * 64,
                "components": comps}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


@pytest.fixture
def export_dir(tmp_path, specs):
    return _write_export(tmp_path / "onnx", specs)


class FakeBuild:
    """Stands in for TensorRT's builder: records what it was asked to build and writes a plan file."""

    def __init__(self):
        self.calls = []

    def __call__(self, onnx, plan, profile, flags, cache):
        self.calls.append(plan.name)
        plan.write_bytes(b"plan of " + onnx.read_bytes())


def _build(export_dir, out, shapes=Shapes(), precision="fp16", env=ENV, **kw):
    fake = FakeBuild()
    built = build_all(export_dir, out, shapes, precision, env=env, build=fake, log=lambda *_: None, **kw)
    return fake.calls, {b.name: b.reason for b in built}


# ------------------------------------------------------------------------------------------------ profiles

def test_parse_range():
    assert parse_range("--frames", "8") == (8, 8, 8)
    assert parse_range("--batch", "1:4") == (1, 1, 4)  # opt = min
    assert parse_range("--size", "256:384:512") == (256, 384, 512)
    for bad in ("4:1", "0", "a", "1:2:3:4", "2:1:3", ""):
        with pytest.raises(ValueError, match="MIN:OPT:MAX"):
            parse_range("--batch", bad)


def test_profiles_from_specs_double_the_batch_under_guidance(specs):
    s = Shapes(batch=(1, 2, 4), frames=(8, 8, 8), size=(256, 256, 512))
    assert profile_dims(specs["unet"], s) == {"N": (2, 4, 8), "F": (8, 8, 8), "h": (32, 32, 64), "w": (32, 32, 64)}
    assert profile_dims(specs["text_encoder"], s) == {"B": (2, 4, 8)}
    assert profile_dims(specs["vae_decoder"], s) == {"N": (8, 16, 32), "h": (32, 32, 64), "w": (32, 32, 64)}
    assert profile_dims(specs["vae_decoder_temporal"], s)["B"] == (1, 2, 4)  # one video per prompt
    prof = engines.profile_shapes(specs["unet"], profile_dims(specs["unet"], s))
    assert prof["sample"] == {"min": [2, 4, 8, 32, 32], "opt": [4, 4, 8, 32, 32], "max": [8, 4, 8, 64, 64]}
    assert prof["timestep"] == {"min": [2], "opt": [4], "max": [8]}
    assert prof["encoder_hidden_states"]["max"] == [8, 77, 32]
    assert set(prof) == {"sample", "timestep", "encoder_hidden_states"}  # inputs only


def test_static_and_no_guidance_profiles(specs):
    static = Shapes(batch=(1, 2, 4), frames=(8, 8, 8), size=(256, 320, 512), static=True)
    assert profile_dims(specs["unet"], static) == {"N": (4, 4, 4), "F": (8, 8, 8), "h": (40, 40, 40), "w": (40, 40, 40)}
    plain = Shapes(batch=(1, 1, 4), guidance=False)
    assert profile_dims(specs["unet"], plain)["N"] == (1, 1, 4)
    assert profile_dims(specs["text_encoder"], plain)["B"] == (1, 1, 4)


@pytest.mark.parametrize("shapes, component, words", [
    (Shapes(batch=(1, 1, 5)), "unet", ["--batch 1:1:5", "N=10", "[1, 8]", "within [1, 4]"]),
    (Shapes(size=(204, 204, 512)), "unet", ["--size", "204 px is not a multiple of 8"]),
    (Shapes(size=(200, 200, 512)), "unet", ["h=25 (pixels / 8)", "multiples of 64 px"]),
    (Shapes(size=(96, 96, 512)), "unet", ["h=12", "multiples of 8", "multiples of 64 px within [64, 512]"]),
    (Shapes(size=(256, 256, 1024)), "vae_decoder", ["h=128", "[8, 64]"]),
    (Shapes(frames=(1, 1, 1)), "unet", ["--frames 1:1:1", "F=1", "[2, 32]"]),
    (Shapes(frames=(40, 40, 40)), "vae_decoder_temporal", ["F=40", "within [2, 32]"]),
    (Shapes(batch=(1, 1, 4), frames=(16, 16, 16)), "vae_decoder", ["N=64", "B*F", "<= 32"]),
    (Shapes(batch=(1, 1, 9)), "text_encoder", ["B=18", "[1, 16]", "within [1, 8]"]),
])
def test_shapes_outside_the_export_are_rejected(specs, shapes, component, words):
    with pytest.raises(ValueError) as e:
        profile_dims(specs[component], shapes)
    for w in words:
        assert w in str(e.value)


def test_rejection_comes_before_any_work(export_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # TensorRT would be the next thing touched
    out = tmp_path / "engines"
    with pytest.raises(ValueError, match="N=10"):
        build_all(export_dir, out, Shapes(batch=(1, 1, 5)), "fp16", build=FakeBuild())
    assert not out.exists()
    with pytest.raises(ValueError, match="only fp16 engines"):
        build_all(_write_export(tmp_path / "fp16", component_specs(preset("tiny"), "fp16"), "fp16"), out,
                  Shapes(), "bf16", build=FakeBuild())
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt-cu12"):
        build_all(export_dir, out, Shapes(), "fp16", build=FakeBuild())


def test_build_flags():
    f = engines.build_flags("fp16", "fp32", False)
    assert (f["strongly_typed"], f["fp16"], f["bf16"], f["io_dtype"]) == (False, True, False, "float16")
    f = engines.build_flags("fp16", "fp16", True)
    assert (f["strongly_typed"], f["fp16"], f["static"]) == (True, False, True)  # the graph holds the types
    assert engines.build_flags("bf16", "fp32", False)["bf16"]
    assert not any(engines.build_flags("fp32", "fp32", False)[k] for k in ("fp16", "bf16"))
    with pytest.raises(ValueError, match="fp8"):
        engines.build_flags("fp8", "fp32", False)


# ---------------------------------------------------------------------------------------- sidecars and cache

def test_sidecar_records_what_the_engine_is_for(export_dir, tmp_path):
    out = tmp_path / "engines"
    calls, reasons = _build(export_dir, out)
    assert sorted(calls) == sorted(f"{n}.plan" for n in engines.RUNTIME_COMPONENTS["text"] +
                                   engines.RUNTIME_COMPONENTS["unet"] + engines.RUNTIME_COMPONENTS["vae"])
    assert set(reasons.values()) == {"no engine yet"}
    side = engines.read_sidecar(out, "unet")
    assert side["tensorrt"] == ENV["tensorrt"] and side["gpu"] == ENV["gpu"]
    assert side["onnx_sha256"] == file_sha256(export_dir / "unet.onnx") and side["precision"] == "fp16"
    assert side["profile"]["sample"]["max"] == [8, 4, 8, 64, 64] and side["dims"]["N"] == [2, 2, 8]
    assert side["flags"]["float_io"] == ["sample", "encoder_hidden_states", "noise_pred"]  # timestep stays fp32
    assert side["flags"]["io_dtype"] == "float16" and not side["flags"]["static"]
    assert side["command"].startswith(f"vidrd build-engines --onnx {export_dir.resolve()} --out {out.resolve()}")
    assert side["engine_bytes"] == (out / "unet.plan").stat().st_size
    assert (out / "timing.cache.json").is_file()


def test_up_to_date_engines_are_skipped_and_changes_rebuild(export_dir, tmp_path, specs):
    out = tmp_path / "engines"
    _build(export_dir, out, components=["unet", "text_encoder"])
    calls, reasons = _build(export_dir, out, components=["unet", "text_encoder"])
    assert calls == [] and set(reasons.values()) == {"up to date"}
    for env, why in ((OTHER_GPU, "the GPU changed"), (OTHER_TRT, "the TensorRT version changed"),
                     (ENV, "the TensorRT version changed")):
        calls, reasons = _build(export_dir, out, env=env, components=["unet"])
        assert calls == ["unet.plan"] and reasons["unet"].startswith(why)
    _write_export(export_dir, specs, tag=" re-exported")  # new ONNX files, new manifest
    calls, reasons = _build(export_dir, out, components=["unet"])
    assert calls == ["unet.plan"] and reasons["unet"].startswith("the ONNX file changed")
    assert _build(export_dir, out, precision="bf16", components=["unet"])[1]["unet"].startswith("the precision")
    assert _build(export_dir, out, Shapes(batch=(1, 1, 2)), precision="bf16",
                  components=["unet"])[1]["unet"].startswith("the profile changed")
    (out / "unet.plan").unlink()
    assert _build(export_dir, out, Shapes(batch=(1, 1, 2)), precision="bf16",
                  components=["unet"])[1]["unet"] == "unet.plan is missing"
    assert _build(export_dir, out, Shapes(batch=(1, 1, 2)), precision="bf16", components=["unet"],
                  force=True)[1]["unet"] == "forced"


def test_stale_reason_decisions(export_dir, tmp_path):
    out = tmp_path / "engines"
    _build(export_dir, out, components=["unet"])
    side, plan = engines.read_sidecar(out, "unet"), out / "unet.plan"
    key = {k: side[k] for k in engines.KEY}
    assert engines.stale_reason(side, key, plan) is None
    assert engines.stale_reason(None, key, plan) == "the engine has no sidecar"
    assert engines.stale_reason(None, key, out / "text_encoder.plan") == "no engine yet"
    assert engines.stale_reason({**side, "format": "x"}, key, plan).startswith("the sidecar is not")
    assert engines.stale_reason(side, {**key, "flags": {**key["flags"], "static": True}}, plan).startswith(
        "the flags changed")
    plan.write_bytes(b"truncated")
    assert engines.stale_reason(side, key, plan) == "unet.plan was modified"


def test_timing_cache_is_kept_per_tensorrt_and_gpu(export_dir, tmp_path):
    out = tmp_path / "engines"
    _build(export_dir, out, components=["unet"])
    (out / "timing.cache").write_bytes(b"tactics")
    _build(export_dir, out, components=["unet"], force=True)
    assert (out / "timing.cache").is_file()  # same TensorRT and GPU: reused
    _build(export_dir, out, env=OTHER_GPU, components=["unet"])
    assert not (out / "timing.cache").exists()  # another GPU's timings would mislead the builder


# ------------------------------------------------------------------------------------------------ errors

def test_tensorrt_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable, match=r"pip install tensorrt-cu12.*vidrd\[tensorrt\]"):
        engines.import_tensorrt()


def test_no_cuda_device(monkeypatch):
    with pytest.raises(TensorRTUnavailable, match="CUDA devices only, got device 'cpu'"):
        engines.gpu_info("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TensorRTUnavailable, match="no CUDA device"):
        engines.gpu_info()


def test_engine_for_another_gpu_or_tensorrt(export_dir, tmp_path):
    out = tmp_path / "engines"
    _build(export_dir, out, components=["unet"])
    side = engines.read_sidecar(out, "unet")
    engines.check_compatible(side, ENV)
    with pytest.raises(EngineMismatch) as e:
        engines.check_compatible(side, OTHER_GPU)
    assert "NVIDIA H100 80GB HBM3 (sm 9.0), but this GPU is NVIDIA L4 (sm 8.9)" in str(e.value)
    assert f"`vidrd build-engines --onnx {export_dir.resolve()} --out" in str(e.value)
    with pytest.raises(EngineMismatch, match=r"TensorRT 10\.15\.1\.29, but TensorRT 10\.9\.0\.34 is installed"):
        engines.check_compatible(side, OTHER_TRT)


def test_request_outside_the_profile(export_dir, tmp_path):
    out = tmp_path / "engines"
    _build(export_dir, out, Shapes(batch=(1, 1, 2)), components=["unet", "vae_decoder"])
    unet = engines.read_sidecar(out, "unet")
    engines.check_request(unet, 2, 8, 512, 256, guidance=True)
    with pytest.raises(EngineMismatch) as e:
        engines.check_request(unet, 3, 8, 256, 256, guidance=True)
    msg = str(e.value)
    assert "unet.plan: N=6 (batch 3, frames 8, 256x256 px, guidance)" in msg and "N [2, 4]" in msg
    assert f"vidrd build-engines --onnx {export_dir.resolve()}" in msg and "--components unet" in msg
    with pytest.raises(EngineMismatch, match=r"N=1 .*N \[2, 4\]"):
        engines.check_request(unet, 1, 8, 256, 256, guidance=False)  # built for guidance: N = 2B
    with pytest.raises(EngineMismatch, match=r"F=16 .*F fixed at 8"):
        engines.check_request(unet, 1, 16, 256, 256, guidance=True)
    with pytest.raises(EngineMismatch, match=r"h=33 .* not a multiple of 8, which the exported unet requires"):
        engines.check_request(unet, 1, 8, 264, 256, guidance=True)
    with pytest.raises(EngineMismatch, match=r"N=24 \(batch 3, frames 8"):
        engines.check_request(engines.read_sidecar(out, "vae_decoder"), 3, 8, 256, 256, guidance=True)
    _build(export_dir, out, Shapes(batch=(1, 1, 2), static=True), components=["unet"])
    with pytest.raises(EngineMismatch, match=r"w=40 .*w fixed at 32"):
        engines.check_request(engines.read_sidecar(out, "unet"), 1, 8, 256, 320, guidance=True)


def test_backend_errors_before_tensorrt(export_dir, tmp_path, monkeypatch):
    out = tmp_path / "engines"
    with pytest.raises(ValueError, match="--engines DIR"):
        trt_backend.make("unet", None, torch.float16, "cuda")
    with pytest.raises(ValueError, match="unknown component 'clip'"):
        trt_backend.make("clip", out, torch.float16, "cuda")
    with pytest.raises(FileNotFoundError, match="no engine folder .*`vidrd build-engines"):
        trt_backend.make("unet", out, torch.float16, "cuda")
    _build(export_dir, out, components=["unet", "vae_decoder_temporal"])
    with pytest.raises(FileNotFoundError, match="text_encoder.plan: build it with `vidrd build-engines"):
        trt_backend.make("text", out, torch.float16, "cuda")
    with pytest.raises(EngineMismatch, match="takes torch.float16 .* run with --dtype fp16, or rebuild .* "
                                             "--precision fp32"):
        trt_backend.make("unet", out, torch.float32, "cuda")
    (out / "unet.plan.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no sidecar unet.plan.json"):
        trt_backend.make("unet", out, torch.float16, "cuda")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt-cu12"):
        trt_backend.make("vae", out, torch.float16, "cuda")  # only the temporal decoder: found, then TensorRT


# --------------------------------------------------------------------------------------------------- CLI

def test_cli_build_engines_errors(export_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = str(tmp_path / "engines")
    assert main(["build-engines", "--onnx", str(export_dir), "--out", out, "--precision", "fp16"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    cases = [(["--size", "256:1024"], "h=128"), (["--batch", "x"], "--batch 'x'"),
             (["--components", "unet,clip"], "['clip'] not in the export"), (["--components", ","], "empty list")]
    for extra, words in cases:
        assert main(["build-engines", "--onnx", str(export_dir), "--out", out, "--precision", "fp16", *extra]) == 2
        assert words in capsys.readouterr().err
    assert main(["build-engines", "--onnx", str(tmp_path / "none"), "--out", out, "--precision", "fp16"]) == 2
    assert "make one with `vidrd export --out" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- TensorRT on a GPU

def _need_tensorrt():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt-cu12 on a GPU machine)")
    pytest.importorskip("polygraphy.backend.trt", reason="polygraphy is not installed (pip install 'vidrd[tensorrt]')")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    _need_tensorrt()
    from vidrd.export.onnx_export import export
    from vidrd.ref.weights import random_model

    model = random_model("tiny", 0)
    out = tmp_path_factory.mktemp("tiny_onnx")
    export(model, out, source={"kind": "preset", "preset": "tiny", "seed": 0}, log=lambda *_: None)
    return out, model


@pytest.mark.gpu
def test_tiny_engines_match_onnxruntime(tiny_export, tmp_path):
    from vidrd.runtime.backends import ort as ort_backend

    onnx_dir, _ = tiny_export
    shapes = Shapes(batch=(1, 1, 2), frames=(8, 8, 8), size=(256, 256, 256))
    built = build_all(onnx_dir, tmp_path, shapes, "fp32", log=lambda *_: None)
    assert not any(b.skipped for b in built)
    assert all(b.skipped for b in build_all(onnx_dir, tmp_path, shapes, "fp32", log=lambda *_: None))
    cuda, cpu, g = torch.device("cuda"), torch.device("cpu"), torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 77), generator=g)
    x, ts, ctx = torch.randn(2, 4, 8, 32, 32, generator=g), torch.tensor([999.0, 999.0]), torch.randn(2, 77, 32)
    lat = torch.randn(1, 4, 8, 32, 32, generator=g)
    cases = [("text", (ids,), (2, 77, 32)), ("unet", (x, ts, ctx), tuple(x.shape)),
             ("vae", (lat,), (1, 8, 3, 256, 256))]
    for name, args, out_shape in cases:
        trt_be = trt_backend.make(name, tmp_path, torch.float32, cuda)
        ref, got = torch.empty(out_shape), torch.empty(out_shape, device=cuda)
        extra = (False,) if name == "vae" else ()
        ort_backend.make(name, onnx_dir, cpu)(*args, ref, *extra)
        trt_be(*(a.to(cuda) for a in args), got, *extra)
        torch.cuda.synchronize()
        err = (got.cpu() - ref).abs().max().item()
        assert err < TRT_FP32, f"{name}: TensorRT vs ONNX Runtime max abs error {err}"


@pytest.mark.gpu
def test_runtime_with_the_tensorrt_unet(tiny_export, tmp_path):
    from vidrd.ref.loading import to
    from vidrd.ref.sampler import SamplerSettings
    from vidrd.runtime.loop import Limits, Request
    from vidrd.runtime.options import RuntimeOptions, open_runtime

    onnx_dir, model = tiny_export
    build_all(onnx_dir, tmp_path, Shapes(batch=(1, 1, 1), frames=(8, 8, 8), size=(256, 256, 256), static=True),
              "fp32", components=["unet"], log=lambda *_: None)
    model = to(model, device="cuda")
    limits = Limits(batch=1, frames=8, height=256, width=256, steps=3)
    request = Request(("a boat",), settings=SamplerSettings(steps=3), float_video=True)
    videos = []
    for unet in ("torch", "tensorrt"):
        rt = open_runtime(model, RuntimeOptions(unet_backend=unet, engine_dir=tmp_path, device="cuda"), limits)
        if unet == "tensorrt":
            rt.unet.check_shapes(1, 8, 256, 256, guidance=True)
            with pytest.raises(EngineMismatch, match="N=4"):
                rt.unet.check_shapes(2, 8, 256, 256, guidance=True)
        videos.append(torch.cat([c.video for c in rt.generate(request)], 2))
        rt.close()
    err = (videos[0] - videos[1]).abs().max().item()
    assert err < TRT_RUNTIME_VIDEO, f"runtime video, TensorRT UNet vs torch UNet: max abs error {err}"
