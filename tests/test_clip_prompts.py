"""A prompt per clip (Request.clip_prompts): the runtime makes the reference sampler's video, each distinct prompt is
encoded once into buffers made at setup, the step allocates nothing, resuming gives the uninterrupted clips, and bad
requests are refused before any work, naming the value."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from allocations import Recorded, outside_backend
from tolerances import RUNTIME_LATENT_REL, RUNTIME_VIDEO, assert_uint8_close
from vidrd.ref.sampler import SamplerSettings, generate
from vidrd.ref.weights import random_model
from vidrd.runtime.backends import Backend
from vidrd.runtime.loop import Limits, Request
from vidrd.runtime.options import RuntimeOptions, open_runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LIMITS = Limits(batch=2, frames=4, height=32, width=32, steps=3, overlap=2, video_prompts=3)
STORY = ("a boat", ("wood on fire", "a red car"))  # the first prompt, then clips 2 and 3


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", 0)


def settings(**kw):
    return SamplerSettings(**{"height": 32, "width": 32, "frames": 4, "steps": 3, "clips": 3, "overlap": 2, **kw})


def reference(model, request):
    video, latents = generate(model, list(request.prompts), None, request.settings,
                              torch.Generator().manual_seed(request.seed), clip_prompts=request.clip_prompts)
    return video, latents


def run(rt, request):
    clips = list(rt.generate(request))
    return torch.cat([c.video for c in clips], dim=2), torch.stack([c.latents for c in clips]), clips


@pytest.mark.parametrize("kw", [{}, {"continuation": "forward", "assembly": "trim"},
                                {"solver": "dpmpp-2m", "guidance_scale": 1.0},
                                {"continuation": "forward", "assembly": "trim", "prompt_blend": 0.7},
                                {"prompt_blend": 1.0, "guidance_scale": 1.0}],
                         ids=["official", "forward-trim", "dpmpp-no-guidance", "forward-blend", "blend-no-guidance"])
def test_runtime_matches_the_reference_sampler_with_a_prompt_per_clip(model, kw):
    request = Request((STORY[0],), None, settings(**kw), seed=5, float_video=True, clip_prompts=STORY[1])
    rt = open_runtime(model, limits=LIMITS)
    video, latents, _ = run(rt, request)
    rt.close()
    ref_video, ref_latents = reference(model, request)
    assert (latents - ref_latents).abs().max() <= RUNTIME_LATENT_REL * ref_latents.abs().max()
    assert (video - ref_video).abs().max() <= RUNTIME_VIDEO
    # --backend reference streams the same clips
    rt = open_runtime(model, RuntimeOptions("reference"), LIMITS)
    _, ref_rt_latents, _ = run(rt, request)
    assert torch.equal(ref_rt_latents, ref_latents)


def test_later_prompts_change_only_later_clips_and_a_repeated_prompt_changes_nothing(model):
    s = settings()
    rt = open_runtime(model, limits=LIMITS)
    plain = run(rt, Request((STORY[0],), None, s, seed=5, float_video=True))[1]
    same = run(rt, Request((STORY[0],), None, s, seed=5, float_video=True, clip_prompts=(STORY[0],)))[1]
    story = run(rt, Request((STORY[0],), None, s, seed=5, float_video=True, clip_prompts=STORY[1]))[1]
    held = run(rt, Request((STORY[0],), None, s, seed=5, float_video=True, clip_prompts=STORY[1][:1]))[1]
    assert torch.equal(same, plain)  # the same arithmetic on the same buffers
    assert torch.equal(story[0], plain[0]) and not torch.equal(story[1], plain[1])
    assert torch.equal(held[:2], story[:2]) and not torch.equal(held[2], story[2])  # the last prompt holds for clip 3


class Counted(Backend):
    """The real text backend, counting the prompts it encodes."""

    def __init__(self, backend):
        self.backend, self.dtype, self.device, self.texts = backend, backend.dtype, backend.device, 0

    def __call__(self, ids, out):
        self.texts += 1
        self.backend(ids, out)


def test_each_distinct_prompt_is_encoded_once(model):
    rt = open_runtime(model, limits=LIMITS)
    rt.text = Counted(rt.text)
    list(rt.generate(Request(("a boat",), None, settings(clips=4), clip_prompts=("a car", "a boat", "a car"))))
    assert rt.text.texts == 2


@pytest.mark.parametrize("blend", [0.0, 0.7])
def test_clips_with_their_own_prompts_allocate_nothing_outside_backend_calls(model, blend):
    rt = open_runtime(model, limits=LIMITS)
    rt.unet = Recorded(rt.unet)
    s = settings(steps=3, clips=3, prompt_blend=blend)
    request = Request((STORY[0],), None, s, clip_prompts=STORY[1])
    job = rt.prepare(*rt.check(request), request)
    with torch.no_grad():
        job.use_clip_prompt(0)
        job.step(0, 0)  # warm-up outside the measurement
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for i in range(1, 3):
                job.step(0, i)
            for c in (1, 2):  # as Runtime._run begins a clip
                job.restart()
                job.use_clip_prompt(c)
                for i in range(3):
                    job.step(c, i)
    assert sum(e.name == "vidrd::backend" for e in prof.events()) == 8  # the measurement saw the steps
    assert outside_backend(prof) == []
    assert job.ctx_unet.data_ptr() != job.clip_ctx[0].data_ptr()  # clip 3 read its own prompt's context


def test_resume_with_a_prompt_per_clip_equals_the_uninterrupted_run(model):
    s = settings(continuation="forward", assembly="trim")
    request = Request((STORY[0],), None, s, seed=7, checkpoints=True, clip_prompts=STORY[1])
    rt = open_runtime(model, limits=LIMITS)
    full = list(rt.generate(request))
    rt = open_runtime(model, limits=LIMITS)  # a new runtime, as after a restart
    for k in (0, 1):
        resumed = list(rt.generate(replace(request, resume=full[k].checkpoint)))
        assert [c.index for c in resumed] == list(range(k + 1, 3))
        for a, b in zip(full[k + 1:], resumed):  # same kernels, shapes and thread: the same arithmetic
            assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)


@pytest.mark.parametrize("bad, needle", [
    (dict(prompts=("a", "b")), "clip_prompts needs a single prompt, not a batch of 2"),
    (dict(clip_prompts=("a car", " ")), r"clip_prompts\[1\]=' ' is empty"),
    (dict(clip_prompts=("a", "b", "c")), "clip_prompts has 3 prompts, so 4 with the first, for clips=3"),
    (dict(clip_prompts="a car"), "clip_prompts='a car' must be a list of strings"),
    (dict(negative_prompts=("", "")), "negative_prompts has 2 entries for 1 prompts"),
    (dict(settings=settings(clips=5), clip_prompts=("b", "c", "d")), r"video_prompts=4 exceeds the limit"),
])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_bad_request_is_refused_when_generate_is_called(model, bad, needle, backend):
    rt = open_runtime(model, RuntimeOptions(backend), LIMITS)
    request = Request(**{"prompts": ("a boat",), "settings": settings(), "clip_prompts": ("a car",), **bad})
    with pytest.raises(ValueError, match=needle):
        rt.generate(request)  # no next(): refused before any work


def test_limits_refuse_a_bad_prompt_count():
    with pytest.raises(ValueError, match="video_prompts=0 must be an integer >= 1"):
        Limits(video_prompts=0)
    with pytest.raises(ValueError, match="prompt_blend=1.5 must be between 0 and 1"):
        settings(prompt_blend=1.5)


def test_a_blend_changes_the_first_steps_of_a_new_prompt_only(model):
    assert settings(steps=10, prompt_blend=0.3).prompt_weights() == [0.25, 0.5, 0.75] + [1.0] * 7
    assert settings(steps=10).prompt_weights() == [1.0] * 10
    rt = open_runtime(model, limits=LIMITS)
    switch = run(rt, Request((STORY[0],), None, settings(), seed=5, float_video=True, clip_prompts=STORY[1]))[1]
    blend = run(rt, Request((STORY[0],), None, settings(prompt_blend=0.7), seed=5, float_video=True,
                            clip_prompts=STORY[1]))[1]
    same = run(rt, Request((STORY[0],), None, settings(prompt_blend=0.7), seed=5, float_video=True,
                           clip_prompts=(STORY[0],)))[1]
    plain = run(rt, Request((STORY[0],), None, settings(), seed=5, float_video=True))[1]
    assert torch.equal(blend[0], switch[0]) and not torch.equal(blend[1], switch[1])
    assert torch.equal(same, plain)  # nothing to blend when the prompt stays


def test_batch_runs_are_unchanged_by_the_prompt_bank(model):
    s = settings()
    request = Request(("a boat", "a car"), None, s, seed=2)
    got = [c.frames for c in open_runtime(model, limits=LIMITS).generate(request)]
    want = [c.frames for c in open_runtime(model, limits=replace(LIMITS, video_prompts=1)).generate(request)]
    assert_uint8_close(np.concatenate(got, axis=1), np.concatenate(want, axis=1))


# ------------------------------------------------------------------------------------------------ vidrd generate

CLI = ["--height", "64", "--width", "48", "--frames", "4", "--steps", "2", "--overlap", "2", "--no-progress",
       "--preset", "tiny"]


def test_generate_then_makes_the_reference_samplers_story(tmp_path, capsys):
    from vidrd.runtime.cli import main
    from vidrd.runtime.video_io import read_video, to_uint8
    out = tmp_path / "frames"  # PNG frames: lossless
    assert main(["generate", STORY[0], "--then", STORY[1][0], "--then", STORY[1][1], "-o", str(out), *CLI]) == 0
    got = read_video(out)
    assert got.shape == (3 * 4, 64, 48, 3)  # --clips 1 + 2 --then, clips whole
    s = SamplerSettings(height=64, width=48, frames=4, steps=2, clips=3, overlap=2)
    video, _ = generate(random_model(), [STORY[0]], ["watermark"], s, torch.Generator().manual_seed(42),
                        clip_prompts=STORY[1])
    assert_uint8_close(got, to_uint8(video[0]))


@pytest.mark.parametrize("args, needle", [
    (["--prompt", "b", "--then", "c"], "--then needs a single prompt, not a batch of 2"),
    (["--then", " "], "--then 1=' ' is empty"),
    (["--then", "b", "--then", "c", "--clips", "2"], "--clips 2 is fewer than the 3 prompts"),
])
def test_generate_refuses_bad_clip_prompts_before_any_work(tmp_path, capsys, args, needle):
    from vidrd.runtime.cli import main
    out = tmp_path / "v.mp4"
    assert main(["generate", "a", "-o", str(out), *CLI, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vidrd generate: error: ") and needle in err, err
    assert not list(tmp_path.iterdir())
