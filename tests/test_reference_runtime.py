"""ReferenceRuntime: the reference sampler behind the runtime's generate(request), clip for clip."""
import numpy as np
import pytest
import torch

from tolerances import assert_uint8_close
from vidrd.ref.attention import Attention
from vidrd.ref.sampler import SamplerSettings, generate
from vidrd.ref.weights import random_model
from vidrd.runtime.loop import Cancelled, Limits, Request
from vidrd.runtime.options import RuntimeOptions, open_runtime
from vidrd.runtime.reference import ReferenceRuntime
from vidrd.runtime.video_io import to_uint8

PROMPTS, NEGATIVES, SEED = ("a boat", "a red car"), ("watermark", "watermark"), 3
SETTINGS = {a: SamplerSettings(height=32, width=32, frames=4, steps=2, clips=3, overlap=2, assembly=a)
            for a in ("official", "trim")}


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", 0)


def request(assembly, **kw):
    return Request(PROMPTS, NEGATIVES, SETTINGS[assembly], SEED, **kw)


def reference_frames(model, s):
    """The reference sampler's video -> uint8 frames (B,T,H,W,3), as `vidrd generate --backend reference` wrote them
    before it streamed clips."""
    video, latents = generate(model, list(PROMPTS), list(NEGATIVES), s, torch.Generator().manual_seed(SEED))
    return np.stack([to_uint8(v) for v in video]), video, latents


def attention_of(module) -> set:
    return {m.backend for m in module.modules() if isinstance(m, Attention)}


@pytest.mark.parametrize("assembly", ["official", "trim"])
def test_clips_are_the_reference_samplers_video(model, assembly):
    s = SETTINGS[assembly]
    rt = open_runtime(model, RuntimeOptions("reference"), Limits.of(s, 2))
    assert isinstance(rt, ReferenceRuntime)
    clips = list(rt.generate(request(assembly, float_video=True)))
    rt.close()
    want, video, latents = reference_frames(model, s)
    later = s.frames - (s.overlap if assembly == "trim" else 0)
    assert [c.index for c in clips] == [0, 1, 2]
    assert [c.frames.shape for c in clips] == [(2, 4, 32, 32, 3)] + [(2, later, 32, 32, 3)] * 2
    assert all(c.frames.dtype == np.uint8 for c in clips)
    # the same arithmetic in the same process: equal, not close
    assert np.array_equal(np.concatenate([c.frames for c in clips], axis=1), want)
    assert torch.equal(torch.cat([c.video for c in clips], dim=2), video)
    assert torch.equal(torch.stack([c.latents for c in clips]), latents)


@pytest.mark.parametrize("assembly", ["official", "trim"])
def test_clips_match_the_torch_runtimes(model, assembly):
    s = SETTINGS[assembly]
    got, want = [], []
    for backend, out in (("reference", got), ("torch", want)):
        rt = open_runtime(model, RuntimeOptions(backend), Limits.of(s, 2))
        out += [c.frames for c in rt.generate(request(assembly))]
        rt.close()
    assert [g.shape for g in got] == [w.shape for w in want]
    assert_uint8_close(np.concatenate(got, axis=1), np.concatenate(want, axis=1))


@pytest.mark.parametrize("bad, needle", [
    (dict(prompts=("a", "b", "c")), "batch=3 exceeds the limit"),
    (dict(prompts=("",)), "empty"),
    (dict(seed=-1), "seed=-1"),
    (dict(settings=SamplerSettings(height=32, width=32, frames=4, steps=3)), "steps=3 exceeds the limit"),
])
def test_a_bad_request_raises_when_generate_is_called(model, bad, needle):
    rt = ReferenceRuntime(model, RuntimeOptions("reference"), Limits.of(SETTINGS["official"], 2))
    with pytest.raises(ValueError, match=needle):
        rt.generate(Request(**{"prompts": PROMPTS, "settings": SETTINGS["official"], **bad}))  # no next()


def test_the_callers_model_keeps_its_attention(model):
    before = attention_of(model.unet)
    rt = open_runtime(model, RuntimeOptions("reference", attention="math"), Limits.of(SETTINGS["official"], 2))
    assert attention_of(rt.model.unet) == {"math"} and before == {"sdpa"}
    assert rt.model.unet.conv_in.weight is model.unet.conv_in.weight  # a copy that shares the weights
    list(rt.generate(request("official")))
    assert attention_of(model.unet) == before


def test_on_step_runs_after_every_step_and_can_cancel(model):
    s = SETTINGS["trim"]
    rt = ReferenceRuntime(model, RuntimeOptions("reference"), Limits.of(s, 2))
    steps = []
    list(rt.generate(request("trim"), on_step=lambda c, i: steps.append((c, i))))
    assert steps == [(c, i) for c in range(s.clips) for i in range(s.steps)]

    def cancel(c, i):
        raise Cancelled

    with pytest.raises(Cancelled):
        list(rt.generate(request("trim"), on_step=cancel))
