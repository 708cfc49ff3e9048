"""The lean runtime against the reference sampler: parity, no allocation in the loop, streaming, cancelling, limits."""
import json

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from allocations import Recorded, outside_backend
from tolerances import (BF16_LATENT_REL_NORM, BF16_VAE_VIDEO, GOLDEN, ORT_LATENT_REL, ORT_VIDEO, RUNTIME_LATENT_REL,
                        RUNTIME_VIDEO, V_VS_EPSILON_MIN_REL, VAE_CHANNELS_LAST_VIDEO, assert_uint8_close)
from vidrd.ref.loading import load_official
from vidrd.ref.sampler import SamplerSettings, generate
from vidrd.ref.weights import random_model
from vidrd.runtime.loop import Cancelled, Limits, Request
from vidrd.runtime.options import RuntimeOptions, open_runtime

LIMITS = Limits(batch=2, frames=8, height=64, width=64, steps=10, overlap=4)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_official(tiny_dir / "sd", tiny_dir / "ModelT2V.pth", tiny_dir / "vae_finetuned")


def case(tiny_dir, name):
    c = json.loads((tiny_dir / "cases.json").read_text())["cases"][f"pipe.{name}"]
    s = SamplerSettings(height=c["height"], width=c["width"], frames=c["num_frames"], steps=c["num_inference_steps"],
                        clips=c.get("num_generated_clips", 1), overlap=c.get("extend_overlap_frames", 4),
                        noise_recycle=c.get("extend_noise_recycle", 4),
                        denoise_guidance=c.get("extend_denoise_guidance", 0.4), guidance_scale=c["guidance_scale"])
    neg = None if c["negative_prompt"] is None else tuple(c["negative_prompt"])
    return Request(tuple(c["prompt"]), neg, s, c["seed"], float_video=True)


def run(rt, request):
    clips = list(rt.generate(request))
    video = torch.cat([c.video for c in clips], dim=2)
    return video, torch.stack([c.latents for c in clips]), clips


def reference(model, request):
    negatives = None if request.negative_prompts is None else list(request.negative_prompts)
    generator = torch.Generator().manual_seed(request.seed)
    return generate(model, list(request.prompts), negatives, request.settings, generator)


@pytest.mark.parametrize("name", ["single_clip", "three_clips", "batch_two"])
def test_torch_fp32_matches_reference_and_goldens(tiny_model, tiny_dir, golden, name):
    rt = open_runtime(tiny_model, limits=LIMITS)
    request = case(tiny_dir, name)
    video, latents, clips = run(rt, request)
    ref_video, ref_latents = reference(tiny_model, request)
    scale = ref_latents.abs().max()
    assert (latents - ref_latents).abs().max() <= RUNTIME_LATENT_REL * scale
    assert (video - ref_video).abs().max() <= RUNTIME_VIDEO
    assert (video - golden[f"pipe.{name}.video"]).abs().max() <= GOLDEN
    # the uint8 frames are the official truncating conversion of the video
    frames = np.concatenate([c.frames for c in clips], axis=1)  # (B,T,H,W,3)
    want = (ref_video.permute(0, 2, 3, 4, 1) * 255).to(torch.uint8).numpy()
    assert_uint8_close(frames, want)


def test_trim_temporal_decode_and_noise_prior_match_reference():
    model = random_model("tiny", 1)
    rt = open_runtime(model, limits=LIMITS)
    s = SamplerSettings(height=48, width=64, frames=6, steps=3, clips=3, overlap=3, noise_recycle=2.0,
                        denoise_guidance=0.7, guidance_scale=1.0, noise_prior=0.5, temporal_decode=True,
                        assembly="trim")
    request = Request(("a", "b"), None, s, seed=11, float_video=True)
    video, latents, clips = run(rt, request)
    ref_video, ref_latents = reference(model, request)
    assert video.shape == ref_video.shape == (2, 3, 6 + 2 * 3, 48, 64)
    assert (latents - ref_latents).abs().max() <= RUNTIME_LATENT_REL * ref_latents.abs().max()
    assert (video - ref_video).abs().max() <= RUNTIME_VIDEO


def test_onnxruntime_matches_reference(tiny_model, tiny_dir, tmp_path_factory):
    from vidrd.export.onnx_export import export
    out = tmp_path_factory.mktemp("fixture_onnx")
    export(tiny_model, out, components=("text_encoder", "unet", "vae_decoder"), log=lambda *a: None)
    rt = open_runtime(tiny_model, RuntimeOptions("onnxruntime", export_dir=out), LIMITS)
    assert rt.unet.graph.provider == "CPUExecutionProvider"
    for name in ("three_clips", "batch_two"):
        request = case(tiny_dir, name)
        video, latents, _ = run(rt, request)
        ref_video, ref_latents = reference(tiny_model, request)
        assert (latents - ref_latents).abs().max() <= ORT_LATENT_REL * ref_latents.abs().max()
        assert (video - ref_video).abs().max() <= ORT_VIDEO
    small = Request(("a",), None, SamplerSettings(height=32, width=32, frames=4, steps=2))
    with pytest.raises(ValueError, match="exported unet cannot run this request: dim h=4"):
        next(rt.generate(small))  # outside the export's ranges: refused before any work
    with pytest.raises(ValueError, match="onnxruntime unet runs in torch.float32 but torch.bfloat16 was asked"):
        open_runtime(tiny_model, RuntimeOptions(unet_backend="onnxruntime", export_dir=out, dtype="bf16"), LIMITS)


def test_temporal_vae_on_onnxruntime_matches_reference(default_onnx):
    """The temporal VAE decoder (vae_decoder_temporal.onnx, loaded on first use) beside the torch UNet."""
    model = random_model("tiny", 0)
    rt = open_runtime(model, RuntimeOptions(vae_backend="onnxruntime", export_dir=default_onnx), LIMITS)
    s = SamplerSettings(height=64, width=64, frames=4, steps=2, clips=2, overlap=2, temporal_decode=True)
    request = Request(("a boat",), None, s, seed=3, float_video=True)
    video, latents, _ = run(rt, request)
    ref_video, ref_latents = reference(model, request)
    assert rt.vae.temporal is not None  # the temporal graph ran, not the per-frame one
    assert (latents - ref_latents).abs().max() <= RUNTIME_LATENT_REL * ref_latents.abs().max()  # torch UNet
    assert (video - ref_video).abs().max() <= ORT_VIDEO


def v_model(seed: int):
    """The random tiny model read as a v-prediction model (its UNet's output taken as v, not epsilon)."""
    from dataclasses import replace

    from vidrd.ref.ddim import DDIM
    model = random_model("tiny", seed)
    sched = replace(model.config.scheduler, prediction_type="v_prediction")
    model.config, model.scheduler = replace(model.config, scheduler=sched), DDIM(sched)
    return model


@pytest.mark.parametrize("solver, guidance", [("ddim", 7.5), ("ddim", 1.0), ("dpmpp-2m", 7.5)])
def test_v_prediction_matches_reference(solver, guidance):
    """DDIM and DPM-Solver++(2M) updates from a v prediction: the runtime against the reference sampler."""
    model = v_model(4)
    s = SamplerSettings(height=32, width=32, frames=4, steps=4, clips=2, overlap=2, guidance_scale=guidance,
                        solver=solver)
    request = Request(("a", "b"), None, s, seed=6, float_video=True)
    video, latents, _ = run(open_runtime(model, limits=LIMITS), request)
    ref_video, ref_latents = reference(model, request)
    eps_latents = reference(random_model("tiny", 4), request)[1]
    assert (ref_latents - eps_latents).abs().max() > V_VS_EPSILON_MIN_REL * eps_latents.abs().max()
    assert (latents - ref_latents).abs().max() <= RUNTIME_LATENT_REL * ref_latents.abs().max()
    assert (video - ref_video).abs().max() <= RUNTIME_VIDEO


def test_step_loop_allocates_nothing_outside_backend_calls():
    model = random_model("tiny", 0)
    rt = open_runtime(model, limits=LIMITS)
    rt.unet = Recorded(rt.unet)
    s = SamplerSettings(height=64, width=64, frames=8, steps=6, clips=2, overlap=4, noise_recycle=4.0)
    job = rt.prepare(["a"], [""], s, Request(("a",), None, s))
    with torch.no_grad():
        job.step(0, 0)  # warm-up outside the measurement
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for i in range(1, 6):
                job.step(0, i)
            job.restart()
            for i in range(6):
                job.step(1, i)
    allocs = outside_backend(prof)
    assert sum(e.name == "vidrd::backend" for e in prof.events()) == 11  # the measurement saw the steps
    assert allocs == []


def test_streaming_first_clip_before_last_is_denoised_and_cancel():
    model = random_model("tiny", 0)
    rt = open_runtime(model, limits=LIMITS)
    s = SamplerSettings(height=32, width=32, frames=4, steps=3, clips=3, overlap=2)
    events = []
    gen = rt.generate(Request(("a",), None, s, seed=5), on_step=lambda c, i: events.append(("step", c, i)))
    first = next(gen)
    events.append(("clip", first.index))
    assert first.index == 0 and first.frames.shape == (1, 4, 32, 32, 3) and first.frames.dtype == np.uint8
    assert ("step", 2, 2) not in events  # the last clip is not denoised yet
    gen.close()  # cancel
    done = len(events)
    assert events[-1][0] == "clip" and done < 1 + 3 * 3
    # nothing the next request needs was freed: it runs, and equals a fresh runtime's output
    again = [c.frames for c in rt.generate(Request(("a",), None, s, seed=5))]
    fresh = [c.frames for c in open_runtime(model, limits=LIMITS).generate(Request(("a",), None, s, seed=5))]
    assert len(again) == 3 and all(np.array_equal(a, b) for a, b in zip(again, fresh))
    assert np.array_equal(again[0], first.frames)


def test_on_step_cancel_stops_within_a_step():
    rt = open_runtime(random_model("tiny", 0), limits=LIMITS)
    s = SamplerSettings(height=32, width=32, frames=4, steps=5, clips=2, overlap=2)
    seen = []

    def stop_at_three(c, i):
        seen.append((c, i))
        if len(seen) == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        list(rt.generate(Request(("a",), None, s), on_step=stop_at_three))
    assert len(seen) == 3
    assert len(list(rt.generate(Request(("a",), None, s)))) == 2  # the runtime is free again


@pytest.mark.parametrize("change, match", [
    (dict(frames=9), "frames=9 exceeds"), (dict(height=72), "height=72 exceeds"), (dict(steps=11), "steps=11"),
    (dict(overlap=5, clips=2), "overlap=5 exceeds"), (dict(overlap=8, clips=2), "overlap=8 must"),
])
def test_requests_larger_than_the_buffers_fail_clearly(change, match):
    rt = open_runtime(random_model("tiny", 0), limits=LIMITS)
    with pytest.raises(ValueError, match=match):  # the settings' own rules (overlap < frames) or the buffers'
        s = SamplerSettings(**{**dict(height=64, width=64, frames=8, steps=2, clips=1, overlap=2), **change})
        next(rt.generate(Request(("a",), None, s)))
    with pytest.raises(ValueError, match="batch=3 exceeds"):
        next(rt.generate(Request(("a", "b", "c"), None, SamplerSettings(height=64, width=64, steps=2))))


def test_single_clip_ignores_overlap_beyond_the_buffers():
    rt = open_runtime(random_model("tiny", 0), limits=Limits(1, 4, 32, 32, 2, overlap=1))
    clips = list(rt.generate(Request(("a",), None, SamplerSettings(height=32, width=32, frames=4, steps=2))))
    assert len(clips) == 1 and clips[0].frames.shape == (1, 4, 32, 32, 3)


def test_backend_choice_errors_and_mixed_dtypes():
    model = random_model("tiny", 0)
    with pytest.raises(ValueError, match="needs --onnx"):
        open_runtime(model, RuntimeOptions("onnxruntime"), LIMITS)
    with pytest.raises(ValueError, match="unknown backend"):
        open_runtime(model, RuntimeOptions("jax"), LIMITS)
    with pytest.raises(ValueError, match="needs --engines"):
        open_runtime(model, RuntimeOptions(unet_backend="tensorrt"), LIMITS)
    # a bfloat16 VAE beside the float32 UNet: its own converted copy, the model itself untouched
    rt = open_runtime(model, RuntimeOptions(vae_dtype="bf16"), LIMITS)
    assert rt.vae.dtype == torch.bfloat16 and rt.dec_in.dtype == torch.bfloat16 and model.vae.post_quant_conv.weight.dtype == torch.float32
    s = SamplerSettings(height=32, width=32, frames=4, steps=2, clips=2, overlap=2)
    request = Request(("a",), None, s, seed=2, float_video=True)
    video, latents, _ = run(rt, request)
    ref_video, ref_latents = reference(model, request)
    assert (latents - ref_latents).abs().max() <= RUNTIME_LATENT_REL * ref_latents.abs().max()  # UNet untouched
    assert 0 < (video - ref_video).abs().max() < BF16_VAE_VIDEO


@pytest.mark.parametrize("temporal", [False, True], ids=["per-frame", "temporal"])
def test_vae_channels_last_is_close_to_the_default_layout(temporal):
    """--vae-channels-last: the same latents (the UNet untouched), a video within VAE_CHANNELS_LAST_VIDEO of the
    default layout's; Conv2d weights converted once in the backend's own copy of the decoder (the model's VAE, which
    the reference sampler shares, unchanged; Conv3d weights shared as they are); the latents' scratch sized at setup."""
    model = random_model("tiny", 0)
    before = {k: (v.data_ptr(), v.stride()) for k, v in model.vae.state_dict().items()}
    s = SamplerSettings(height=32, width=48, frames=4, steps=2, clips=2, overlap=2, temporal_decode=temporal)
    request = Request(("a", "b"), None, s, seed=4, float_video=True)
    video, latents, _ = run(open_runtime(model, limits=LIMITS), request)
    rt = open_runtime(model, RuntimeOptions(vae_channels_last=True), LIMITS)
    vae = rt.vae.vae
    assert vae is not model.vae and vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in vae.decoder.modules()
               if isinstance(m, torch.nn.Conv2d))
    conv3d = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv3d)]
    assert conv3d and all(m.weight.is_contiguous() for m in conv3d)
    assert vae.decoder.mid_block.resnets[0].norm1.weight is model.vae.decoder.mid_block.resnets[0].norm1.weight
    assert vae.encoder is not model.vae.encoder and vae.encoder.conv_in.weight is model.vae.encoder.conv_in.weight
    scratch = rt.vae.scratch
    assert scratch.numel() == LIMITS.batch * LIMITS.frames * 4 * (LIMITS.height // 8) * (LIMITS.width // 8)
    cl_video, cl_latents, _ = run(rt, request)
    assert rt.vae.scratch is scratch  # no new buffer per call
    assert torch.equal(cl_latents, latents)
    assert (cl_video - video).abs().max() <= VAE_CHANNELS_LAST_VIDEO
    assert {k: (v.data_ptr(), v.stride()) for k, v in model.vae.state_dict().items()} == before
    # the model's own VAE still gives the default layout's video, bit for bit
    again, _, _ = run(open_runtime(model, limits=LIMITS), request)
    assert torch.equal(again, video)


@pytest.mark.parametrize("options, what", [
    (dict(vae_backend="onnxruntime", export_dir="x"), "the onnxruntime VAE decoder"),
    (dict(backend="onnxruntime", export_dir="x"), "the onnxruntime VAE decoder"),
    (dict(vae_backend="tensorrt", engine_dir="x"), "the tensorrt VAE decoder"),
    (dict(backend="reference"), "--backend reference"),
])
def test_vae_channels_last_refused_off_the_torch_vae(options, what):
    with pytest.raises(ValueError, match=f"^--vae-channels-last applies to the torch VAE decoder, not {what}"):
        RuntimeOptions(**options, vae_channels_last=True)
    RuntimeOptions(**options, vae_channels_last=False)  # off: nothing to refuse
    RuntimeOptions(unet_backend="onnxruntime", export_dir="x", vae_channels_last=True)  # the VAE is torch's
    with pytest.raises(ValueError, match="must be True or False"):
        RuntimeOptions(vae_channels_last="yes")
    from vidrd.runtime import backends
    with pytest.raises(ValueError, match=r"channels_last \(--vae-channels-last\) applies to the torch VAE decoder, "
                       "not the onnxruntime vae"):
        backends.make("onnxruntime", "vae", None, torch.float32, torch.device("cpu"), export_dir="x",
                      channels_last=True)


@pytest.mark.slow  # bf16 convolutions are ~100x slower than fp32 on CPUs without AVX512-BF16 (this CI's)
def test_bf16_runtime_runs_with_float32_latents():
    """bfloat16 networks, float32 latents and DDIM; without guidance the result stays near float32's.

    (With guidance 10 on random weights the guidance difference amplifies bf16 rounding: see BENCHMARKS.md.)
    """
    model = random_model("tiny", 0)
    s = SamplerSettings(height=32, width=32, frames=4, steps=2, clips=1, guidance_scale=1.0)
    request = Request(("a",), None, s, seed=2, float_video=True)
    v32, l32, _ = run(open_runtime(model, limits=LIMITS), request)
    v16, l16, _ = run(open_runtime(model, RuntimeOptions(dtype="bf16"), LIMITS), request)
    assert l16.dtype == torch.float32
    assert 0 < ((l16 - l32).norm() / l32.norm()).item() < BF16_LATENT_REL_NORM
