"""continuation="fifo" (diagonal denoising): the UNet's timestep per frame, the reference schedule, the runtime
against the reference, no allocation in its rounds, and what it refuses."""
import pytest
import torch
from allocations import Recorded, outside_backend
from tolerances import RUNTIME_VIDEO
from torch.profiler import ProfilerActivity, profile

from vidrd.ref import fifo
from vidrd.ref.sampler import SamplerSettings, generate
from vidrd.ref.weights import random_model
from vidrd.runtime.loop import Limits, Request
from vidrd.runtime.options import open_runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LIMITS = Limits(batch=1, frames=4, height=32, width=32, steps=9, overlap=2)


def _unet_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 4, 4, 4, generator=g)  # (B,C,F,h,w)
    ctx = torch.randn(2, 77, 32, generator=g)  # (B,L,D) tiny's text width
    return x, ctx


def test_unet_timestep_per_frame():
    """In float64, so that the tiny model's amplified rounding (the time embedding's GEMM on B F rows instead of B)
    stays far below the bound."""
    unet = random_model("tiny", 1).unet.double()
    x, ctx = (t.double() for t in _unet_inputs(0))
    with torch.no_grad():
        shared = unet(x, torch.tensor([500, 300]), ctx)
        per_frame = unet(x, torch.tensor([[500] * 4, [300] * 4]), ctx)  # (B,F), the same level in every frame
        torch.testing.assert_close(per_frame, shared, rtol=0, atol=1e-9)
        diagonal = unet(x, torch.tensor([[10, 300, 600, 900]] * 2), ctx)
    assert (diagonal - shared).abs().max() > 1e-2  # the per-frame levels reach the network
    with pytest.raises(ValueError, match=r"timestep of shape \(2, 3\) must be"):
        unet(x, torch.zeros(2, 3), ctx)


def test_schedule_walks_the_diagonal():
    s = SamplerSettings(frames=4, steps=9, overlap=2, clips=3, assembly="trim", continuation="fifo")
    assert fifo.substeps(s) == 2  # 9 // 4: 8 levels
    assert fifo.frame_steps(s, 0) == [6, 4, 2, 0] and fifo.frame_steps(s, 1) == [7, 5, 3, 1]
    assert fifo.clip_sizes(s) == [4, 2, 2] and sum(fifo.clip_sizes(s)) == s.output_frames()


def _run(s, seed=4, **request):
    rt = open_runtime(random_model("tiny", 3), limits=LIMITS)
    calls = []
    clips = list(rt.generate(Request(("a",), None, s, seed=seed, float_video=True, **request),
                             on_step=lambda c, i: calls.append((c, i))))
    return clips, calls


@pytest.mark.parametrize("kw", [dict(assembly="trim", clips=3, guidance_scale=5.0),
                                dict(assembly="official", clips=2, guidance_scale=1.0),
                                dict(assembly="trim", clips=2, guidance_scale=5.0, spacing="trailing")])
def test_runtime_matches_reference(kw):
    s = SamplerSettings(height=32, width=32, frames=4, steps=9, overlap=2, continuation="fifo", **kw)
    clips, calls = _run(s)
    video = torch.cat([c.video for c in clips], dim=2)
    ref, windows = generate(random_model("tiny", 3), ["a"], None, s, torch.Generator().manual_seed(4))
    assert video.shape == ref.shape == (1, 3, s.output_frames(), 32, 32)
    assert (video - ref).abs().max() <= RUNTIME_VIDEO
    for clip, window in zip(clips, windows):
        torch.testing.assert_close(clip.latents, window, rtol=0, atol=1e-5)
    n = fifo.substeps(s)  # UNet calls: the warm-up's (F-1) n, then n per output frame
    assert len(calls) == (s.frames - 1) * n + s.output_frames() * n == sum(fifo.clip_calls(s))
    for c in range(s.clips):  # progress as in the other modes: steps 0..T-1 of each clip, increasing
        steps = [i for k, i in calls if k == c]
        assert steps == sorted(steps) and steps[0] >= 0 and steps[-1] == s.steps - 1


def test_trimmed_clips_continue_the_window():
    """Under trim a later clip's decoded window starts with the previous window's last O latents."""
    s = SamplerSettings(height=32, width=32, frames=4, steps=9, overlap=2, clips=3, assembly="trim",
                        guidance_scale=5.0, continuation="fifo")
    clips, _ = _run(s)
    for a, b in zip(clips, clips[1:]):
        assert torch.equal(b.latents[:, :, :2], a.latents[:, :, 2:])
        assert b.frames.shape[1] == 2


def test_rounds_allocate_nothing_outside_backend_calls():
    rt = open_runtime(random_model("tiny", 0), limits=LIMITS)
    rt.unet = Recorded(rt.unet)
    s = SamplerSettings(height=32, width=32, frames=4, steps=9, overlap=2, clips=3, assembly="trim",
                        continuation="fifo")
    job = rt.prepare(["a"], [""], s, Request(("a",), None, s))
    with torch.no_grad():
        first = job.diagonal.clip(0)
        next(first)  # the first call outside the measurement
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            n = sum(1 for _ in first)  # the rest of the warm-up and clip 0's rounds
            n += sum(1 for _ in job.diagonal.clip(1))
    assert n == 5 + 4 * 2 + 2 * 2 and sum(e.name == "vidrd::backend" for e in prof.events()) == n
    assert outside_backend(prof) == []


def test_refusals():
    with pytest.raises(ValueError, match="steps=3 must be at least frames=4 with continuation='fifo'"):
        SamplerSettings(frames=4, steps=3, continuation="fifo")
    with pytest.raises(ValueError, match="solver='dpmpp-2m' does not run with continuation='fifo'"):
        SamplerSettings(solver="dpmpp-2m", continuation="fifo")
    with pytest.raises(ValueError, match="cache_interval=2.*continuation='fifo'"):
        SamplerSettings(cache_interval=2, continuation="fifo")
    s = SamplerSettings(height=32, width=32, frames=4, steps=9, overlap=2, clips=2, continuation="fifo")
    rt = open_runtime(random_model("tiny", 0), limits=LIMITS)
    with pytest.raises(ValueError, match="cannot be checkpointed or resumed"):
        rt.generate(Request(("a",), None, s, checkpoints=True))
    rt.unet.frame_timesteps = False  # what an exported graph's backend says (Backend's default)
    with pytest.raises(ValueError, match="continuation='fifo' runs the UNet with a timestep per frame"):
        rt.generate(Request(("a",), None, s))


def test_presets_keep_ddim_and_a_level_per_frame():
    from vidrd.runtime.quality import resolve
    r = resolve("balanced", SamplerSettings(steps=25, frames=8, continuation="fifo"))
    assert (r.settings.solver, r.settings.steps, r.settings.guidance_reuse_after) == ("ddim", 15, 1.0)
    r = resolve("fast", SamplerSettings(steps=10, frames=8, continuation="fifo"))
    assert r.settings.steps == 8 and "at least frames=8" in r.why["steps"]
