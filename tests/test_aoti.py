"""AOTInductor export (`vidrd export --format aoti`) and the aoti backend: full-range torch.export of every component,
packages compiled on the CPU for one small shape range, the runtime on them against the torch backend."""
import json
import time

import pytest
import torch

from tolerances import AOTI_COMPONENT, ORT_LATENT_REL, ORT_VIDEO
from vidrd.export import aoti_export
from vidrd.export.rewrite import example_inputs, export_module
from vidrd.export.spec import Dim, component_specs, read_specs
from vidrd.ref.sampler import SamplerSettings
from vidrd.ref.weights import random_model
from vidrd.runtime.loop import Limits, Request
from vidrd.runtime.options import RuntimeOptions, open_runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# One request shape, so that the packages compile for small ranges: 1 prompt under guidance (N = 2), 4 frames at
# 128x128 pixels (16x16 latents: not the smallest, 8x8, whose 1x1 deepest level amplifies rounding in a random model
# past the ONNX Runtime bounds). The UNet is static there; text and VAE keep a dynamic batch.
LIMITS = Limits(batch=1, frames=4, height=128, width=128, steps=3, overlap=2)
RANGES = {"text_encoder": {"B": Dim(1, 2, 2)},
          "unet": {"N": Dim(2, 2, 2), "F": Dim(4, 4, 4), "h": Dim(16, 16, 16, 8), "w": Dim(16, 16, 16, 8)},
          "vae_decoder": {"N": Dim(1, 4, 8), "h": Dim(16, 16, 16), "w": Dim(16, 16, 16)}}
SECONDS = {}  # component -> compile seconds, reported by the tests that build the packages


@pytest.fixture(scope="module")
def tiny():
    return random_model("tiny", 0)


@pytest.fixture(scope="module")
def text_vae_packages(tiny, tmp_path_factory):
    """The text encoder and per-frame VAE decoder packaged for LIMITS: about 30 s of compiling on one thread of a
    quiet 2-core CPU (measured 27 s; 60-150 s while other work holds the cores)."""
    out = tmp_path_factory.mktemp("aoti")
    comps = ("text_encoder", "vae_decoder")
    aoti_export.export(tiny, out, components=comps, ranges={k: RANGES[k] for k in comps},
                       source={"kind": "preset", "preset": "tiny", "seed": 0}, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def all_packages(tiny, text_vae_packages):
    """The UNet added to the same folder: inductor's C++ compile of the whole UNet, measured 89 s on a quiet CPU
    (205-231 s under load)."""
    aoti_export.export(tiny, text_vae_packages, components=("unet",), ranges={"unet": RANGES["unet"]},
                       source={"kind": "preset", "preset": "tiny", "seed": 0}, log=lambda *a: None)
    return text_vae_packages


def video(rt, request):
    clips = list(rt.generate(request))
    return torch.cat([c.video for c in clips], 2), torch.stack([c.latents for c in clips])


REQUEST = Request(("a boat",), None, SamplerSettings(height=128, width=128, frames=4, steps=3, clips=2, overlap=2),
                  seed=5, float_video=True)


def full_range_export(tiny, name: str, extra=()):
    """torch.export over a package's default ranges (no compiling): the program equals the module at the check
    shapes and at `extra` dims."""
    spec = component_specs(tiny.config)[name]
    spec, module = aoti_export.narrow(spec, aoti_export.package_ranges(spec)), export_module(tiny, name)
    args = tuple(example_inputs(spec, spec.example, tiny.config).values())
    with torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=aoti_export.dynamic_shapes(spec))
        for dims in (*spec.checks, *extra):
            inputs = tuple(example_inputs(spec, dims, tiny.config).values())
            want, got = module(*inputs), program.module()(*inputs)
            assert (got - want).abs().max() <= AOTI_COMPONENT * max(1.0, want.abs().max().item()), (name, dims)
    assert program.range_constraints, name  # the dims stayed dynamic


@pytest.mark.parametrize("name", ["text_encoder", "vae_decoder", "vae_decoder_temporal"])
def test_components_export_over_their_full_ranges(tiny, name):
    full_range_export(tiny, name)


@pytest.mark.slow
def test_unet_exports_over_its_package_ranges(tiny):
    """About 45 s of tracing on one thread; N >= 2 and h, w >= 16 (package_ranges)."""
    assert aoti_export.package_ranges(component_specs(tiny.config)["unet"])["h"] == Dim(16, 32, 64, 8)
    full_range_export(tiny, "unet", ({"N": 2, "F": 2, "h": 16, "w": 16}, {"N": 3, "F": 5, "h": 24, "w": 64},
                                     {"N": 8, "F": 32, "h": 16, "w": 40}))


def test_narrow_moves_the_example_and_drops_checks(tiny):
    spec = component_specs(tiny.config)["unet"]
    small = aoti_export.narrow(spec, RANGES["unet"])
    assert small.example == {"N": 2, "F": 4, "h": 16, "w": 16} and small.checks == ()
    assert aoti_export.dynamic_shapes(small) == ({}, {}, {})  # static: nothing dynamic left
    with pytest.raises(ValueError, match="no dims"):
        aoti_export.narrow(spec, {"B": Dim(1, 1, 1)})


def test_text_and_vae_packages_bind_beside_the_torch_unet(tiny, text_vae_packages):
    manifest = json.loads((text_vae_packages / "manifest.json").read_text())
    assert manifest["format"] == aoti_export.FORMAT and manifest["device"] == "cpu" and manifest["complete"]
    for name, entry in manifest["components"].items():
        SECONDS[name] = entry["compile_seconds"]
        assert entry["file"] == f"{name}.pt2" and (text_vae_packages / entry["file"]).stat().st_size == entry["bytes"]
    assert read_specs(text_vae_packages)["vae_decoder"].dims["N"] == Dim(1, 4, 8)
    report = aoti_export.check(text_vae_packages, tiny, log=lambda *a: None)
    assert set(report) == {"text_encoder", "vae_decoder"}
    ref, ref_lat = video(open_runtime(tiny, limits=LIMITS), REQUEST)
    rt = open_runtime(tiny, RuntimeOptions(text_backend="aoti", vae_backend="aoti", export_dir=text_vae_packages),
                      LIMITS)
    got, got_lat = video(rt, REQUEST)
    assert (got_lat - ref_lat).abs().max() <= ORT_LATENT_REL * ref_lat.abs().max()
    assert (got - ref).abs().max() <= ORT_VIDEO
    lines = []  # up to date: nothing recompiled
    assert aoti_export.export(tiny, text_vae_packages, components=("text_encoder", "vae_decoder"),
                              ranges={k: RANGES[k] for k in ("text_encoder", "vae_decoder")}, log=lines.append).skipped
    assert "up to date" in lines[0]


@pytest.mark.slow
def test_aoti_runtime_matches_torch(tiny, all_packages):
    """Every component on its package (the UNet static at LIMITS) against the torch backend, 3 steps, 2 clips."""
    manifest = aoti_export.read_manifest(all_packages)
    assert set(manifest["components"]) == {"text_encoder", "unet", "vae_decoder"}
    SECONDS["unet"] = manifest["components"]["unet"]["compile_seconds"]
    ref, ref_lat = video(open_runtime(tiny, limits=LIMITS), REQUEST)
    rt = open_runtime(tiny, RuntimeOptions("aoti", export_dir=all_packages), LIMITS)
    t0 = time.perf_counter()
    got, got_lat = video(rt, REQUEST)
    print(f"aoti compile seconds {SECONDS}; runtime {time.perf_counter() - t0:.2f} s")
    assert (got_lat - ref_lat).abs().max() <= ORT_LATENT_REL * ref_lat.abs().max()
    assert (got - ref).abs().max() <= ORT_VIDEO
    small = Request(("a",), None, SamplerSettings(height=128, width=128, frames=3, steps=2))
    with pytest.raises(ValueError, match="exported unet cannot run this request: dim F=3"):
        next(rt.generate(small))  # outside the packages' ranges: refused before any work
    with pytest.raises(ValueError, match="aoti unet runs in torch.float32 but torch.bfloat16 was asked"):
        open_runtime(tiny, RuntimeOptions(unet_backend="aoti", export_dir=all_packages, dtype="bf16",
                                          allow_slow_dtype=True), LIMITS)


def test_aoti_options_and_folder_errors(tiny, tmp_path):
    from vidrd.export.onnx_export import FORMAT as ONNX_FORMAT
    from vidrd.export.onnx_export import export
    with pytest.raises(ValueError, match="aoti backend needs --onnx DIR"):
        RuntimeOptions("aoti")
    with pytest.raises(ValueError, match="one export format"):
        RuntimeOptions("aoti", vae_backend="onnxruntime", export_dir=tmp_path)
    spec = aoti_export.narrow(component_specs(tiny.config)["text_encoder"], RANGES["text_encoder"])
    manifest = {"format": aoti_export.FORMAT, "complete": True, "device": "cpu",  # what export writes, no package
                "components": {"text_encoder": {"file": "text_encoder.pt2", "spec": {**spec.to_json(),
                                                                                  "file": "text_encoder.pt2"}}}}
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": ONNX_FORMAT}))
    with pytest.raises(ValueError, match=f"it is {ONNX_FORMAT}"):  # an ONNX folder given to the aoti backend
        open_runtime(tiny, RuntimeOptions(text_backend="aoti", export_dir=tmp_path), LIMITS)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="holds AOTInductor packages"):  # and packages to onnxruntime
        open_runtime(tiny, RuntimeOptions(text_backend="onnxruntime", export_dir=tmp_path), LIMITS)
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "device": "cuda"}))
    with pytest.raises(ValueError, match="compiled for cuda, the runtime runs on cpu"):
        open_runtime(tiny, RuntimeOptions(text_backend="aoti", export_dir=tmp_path), LIMITS)
    with pytest.raises(ValueError, match="bf16 is for --format aoti"):
        export(tiny, tmp_path / "onnx", precision="bf16")


def test_gpu_check_has_an_aoti_section():
    import gpu_check
    assert "aoti" in [n for n, _, _ in gpu_check.SECTIONS]
    r = {"status": "ok", "tiny_psnr_db_vs_torch": 55.0, "sd21_unet_compile_s": 120.0,
         "sd21_unet": {"aoti_bf16_ms": 40.0, "eager_bf16_ms": 52.0}}
    assert gpu_check.gist("aoti", r) == "tiny PSNR 55 dB; sd21 UNet 40 vs eager 52 ms (compile 120 s)"
