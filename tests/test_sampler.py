"""The reference sampler against the official pipeline outputs of fixtures/vidrd-tiny (SPEC §3)."""
import json
import warnings
from dataclasses import replace

import pytest
import torch

from tolerances import GOLDEN, GOLDEN_LATENT_REL, NOISE_PRIOR_STATS, TEMPORAL_DECODE_EFFECT
from vidrd.ref.loading import load_official
from vidrd.ref.sampler import SamplerSettings, generate, initial_noise


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_official(tiny_dir / "sd", tiny_dir / "ModelT2V.pth", tiny_dir / "vae_finetuned")


def case(tiny_dir, name):
    """(prompts, negatives, settings, seed) of a fixture case."""
    c = json.loads((tiny_dir / "cases.json").read_text())["cases"][f"pipe.{name}"]
    s = SamplerSettings(height=c["height"], width=c["width"], frames=c["num_frames"], steps=c["num_inference_steps"],
                        clips=c.get("num_generated_clips", 1), overlap=c.get("extend_overlap_frames", 4),
                        noise_recycle=c.get("extend_noise_recycle", 4),
                        denoise_guidance=c.get("extend_denoise_guidance", 0.4), guidance_scale=c["guidance_scale"])
    return c["prompt"], c["negative_prompt"], s, c["seed"]


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ["single_clip", "three_clips", "batch_two"])
def test_pipeline_cases_match_official(tiny_model, tiny_dir, golden, name):
    prompts, negatives, s, seed = case(tiny_dir, name)
    video, latents = generate(tiny_model, prompts, negatives, s, seeded(seed))
    want_v, want_l = golden[f"pipe.{name}.video"], golden[f"pipe.{name}.final_latents"]
    assert video.shape == want_v.shape and video.dtype == torch.float32
    assert (video - want_v).abs().max() <= GOLDEN
    assert latents.shape == want_l.shape
    assert (latents - want_l).abs().max() <= GOLDEN_LATENT_REL * want_l.abs().max()


def test_trim_and_temporal_decode(tiny_model, tiny_dir):
    prompts, negatives, s, _ = case(tiny_dir, "three_clips")
    s = replace(s, steps=3)
    official, lat = generate(tiny_model, prompts, negatives, s, seeded(1))
    trim, lat_t = generate(tiny_model, prompts, negatives, replace(s, assembly="trim"), seeded(1))
    temporal, lat_d = generate(tiny_model, prompts, negatives, replace(s, temporal_decode=True), seeded(1))
    f, o = s.frames, s.overlap
    assert official.shape[2] == 3 * f and temporal.shape[2] == 3 * f
    assert trim.shape[2] == f + 2 * (f - o)
    assert torch.equal(lat, lat_t) and torch.equal(lat, lat_d)  # assembly and decoding do not touch denoising
    # trim drops exactly the first `overlap` frames of every later clip
    assert torch.equal(trim[:, :, :f], official[:, :, :f])
    assert torch.equal(trim[:, :, f:2 * f - o], official[:, :, f + o:2 * f])
    assert torch.equal(trim[:, :, 2 * f - o:], official[:, :, 2 * f + o:])
    assert (temporal - official).abs().max() > TEMPORAL_DECODE_EFFECT  # the temporal VAE layers act


def test_overlap_frames_start_from_reversed_previous_noise(tiny_model):
    """Clip 2's overlap frames equal clip 1's last frames reversed while staged guidance pins them (g = 1)."""
    seen = {}

    class Spy(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet, self.cfg = unet, unet.cfg

        def forward(self, x, t, ctx):
            seen.setdefault(len(seen), x[:1].clone())
            return self.unet(x, t, ctx)

    spy = Spy(tiny_model.unet)
    real, tiny_model.unet = tiny_model.unet, spy
    try:
        generate(tiny_model, ["a"], None, SamplerSettings(height=16, width=16, frames=4, steps=2, clips=2, overlap=2,
                                                          denoise_guidance=1.0, noise_recycle=0.0), seeded(0))
    finally:
        tiny_model.unet = real
    first0, second0 = seen[0], seen[2]  # step 0 inputs of clip 1 and clip 2
    assert torch.equal(second0[:, :, 0], first0[:, :, 3]) and torch.equal(second0[:, :, 1], first0[:, :, 2])
    first1, second1 = seen[1], seen[3]  # step 1: frame 0 pinned (threshold 2), frame 1 too (threshold 1 > 1? no)
    assert torch.equal(second1[:, :, 0], first1[:, :, 3])
    assert not torch.equal(second1[:, :, 1], first1[:, :, 2])


def test_staged_guidance_windows():
    s = SamplerSettings(steps=50, overlap=4, denoise_guidance=0.4)
    assert [sum(s.guided(i, k) for i in range(50)) for k in range(4)] == [20, 15, 10, 5]
    assert not any(SamplerSettings(steps=50, overlap=4, denoise_guidance=0.0).guided(0, k) for k in range(4))


def test_noise_prior_keeps_unit_variance():
    g = torch.Generator().manual_seed(0)
    x = initial_noise((64, 4, 6, 16, 16), g, 2.0, torch.float32, "cpu")
    var = x.var(dim=(0, 1, 3, 4))
    assert torch.allclose(var, torch.ones(6), atol=NOISE_PRIOR_STATS), var
    corr = (x[:, :, 1] * x[:, :, 0]).mean()
    assert abs(corr - 2 / 5 ** 0.5) < NOISE_PRIOR_STATS  # beta = a / sqrt(1 + a^2)
    # a = 0: iid draws, one frame at a time (the official order)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    y = initial_noise((1, 4, 3, 2, 2), g1, 0.0, torch.float32, "cpu")
    frames = [torch.randn((1, 4, 1, 2, 2), generator=g2) for _ in range(3)]
    assert torch.equal(y, torch.cat(frames, dim=2))


@pytest.mark.parametrize("bad, match", [
    (dict(height=60), "height=60"), (dict(width=0), "width=0"), (dict(frames=0), "frames=0"),
    (dict(overlap=8), "overlap=8"), (dict(overlap=-1), "overlap=-1"), (dict(clips=0), "clips=0"),
    (dict(steps=0), "steps=0"), (dict(steps=2000), "steps=2000"), (dict(denoise_guidance=1.5), "denoise_guidance=1.5"),
    (dict(assembly="zip"), "assembly='zip'"), (dict(guidance_scale=float("nan")), "guidance_scale"),
])
def test_bad_settings_fail_before_work(tiny_model, bad, match):
    kw = dict(height=64, width=64, frames=8, steps=2, clips=2, overlap=4)
    with pytest.raises(ValueError, match=match):
        generate(tiny_model, ["a"], None, SamplerSettings(**{**kw, **bad}))


def test_prompt_validation(tiny_model):
    s = SamplerSettings(height=16, width=16, frames=2, steps=1)
    with pytest.raises(ValueError, match="negative_prompts has 1 entries for 2 prompts"):
        generate(tiny_model, ["a", "b"], ["x"], s)
    with pytest.raises(ValueError, match="non-empty list"):
        generate(tiny_model, [], None, s)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        generate(tiny_model, ["fire " * 80 + "ENDWORD"], None, s)
    assert any("truncated" in str(x.message) and "endword" in str(x.message) for x in w)


def test_no_guidance_runs_the_conditional_branch_only(tiny_model):
    calls = []
    real = tiny_model.unet.forward

    def spy(x, t, ctx):
        calls.append(x.shape[0])
        return real(x, t, ctx)

    tiny_model.unet.forward = spy
    try:
        generate(tiny_model, ["a", "b"], None, SamplerSettings(height=16, width=16, frames=2, steps=2,
                                                               guidance_scale=1.0, overlap=1))
        generate(tiny_model, ["a", "b"], None, SamplerSettings(height=16, width=16, frames=2, steps=1,
                                                               guidance_scale=3.0, overlap=1))
    finally:
        del tiny_model.unet.forward
    assert calls == [2, 2, 4]


def test_staged_guidance_keeps_its_noise_levels_under_trailing_spacing():
    """Leading spacing: the official windows (`guided`). Trailing: frame k is pinned at the steps above the first
    timestep the leading schedule of as many steps leaves it free at."""
    from vidrd.ref.config import SchedulerConfig
    from vidrd.ref.ddim import DDIM
    ddim = DDIM(SchedulerConfig())
    s = SamplerSettings(steps=10, clips=2, overlap=4, denoise_guidance=0.4)
    assert s.pinned(ddim) == [sum(s.guided(i, k) for k in range(4)) for i in range(10)] == [4, 3, 2, 1] + [0] * 6
    trailing = replace(s, spacing="trailing")  # timesteps 999, 899, ...; leading frees frames 0..3 at 501..801
    assert trailing.pinned(ddim) == [4, 4, 3, 2, 1] + [0] * 5
    assert replace(trailing, denoise_guidance=0.0).pinned(ddim) == [0] * 10  # never pinned stays never
    assert replace(trailing, denoise_guidance=1.0).pinned(ddim)[-1] == 1  # frame 0 pinned throughout, as leading
