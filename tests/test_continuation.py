"""continuation="forward": later clips continue the previous clip in its own frame order (reference and runtime)."""
import pytest
import torch
from tolerances import RECYCLE_1000, RUNTIME_VIDEO

from vidrd.ref.sampler import SamplerSettings, generate
from vidrd.ref.weights import random_model
from vidrd.runtime.loop import Limits, Request
from vidrd.runtime.options import open_runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Spy(torch.nn.Module):
    """Records the UNet's input at every call (first prompt only)."""

    def __init__(self, unet, seen):
        super().__init__()
        self.unet, self.cfg, self.seen = unet, unet.cfg, seen

    def forward(self, x, t, ctx):
        self.seen.append(x[:1].clone())
        return self.unet(x, t, ctx)


def _inputs(model, **kw):
    seen = []
    real, model.unet = model.unet, Spy(model.unet, seen)
    try:
        generate(model, ["a"], None, SamplerSettings(height=16, width=16, frames=4, steps=2, clips=2, overlap=2,
                                                     guidance_scale=1.0, **kw), torch.Generator().manual_seed(0))
    finally:
        model.unet = real
    return seen


def test_source_frames():
    s = SamplerSettings(frames=8, overlap=3)
    assert s.source_frames() == [7, 6, 5, 4, 3, 2, 1, 0]
    assert SamplerSettings(frames=8, overlap=3, continuation="forward").source_frames() == [5, 6, 7, 3, 4, 5, 6, 7]


def test_forward_overlap_frames_keep_the_previous_order():
    model = random_model("tiny", 2)
    seen = _inputs(model, denoise_guidance=1.0, noise_recycle=0.0, continuation="forward")
    first0, second0 = seen[0], seen[2]  # step 0 inputs of clip 1 and clip 2
    assert torch.equal(second0[:, :, 0], first0[:, :, 2]) and torch.equal(second0[:, :, 1], first0[:, :, 3])
    first1, second1 = seen[1], seen[3]  # step 1: only frame 0 is still pinned (window 2 steps, frame 1: 1 step)
    assert torch.equal(second1[:, :, 0], first1[:, :, 2])
    assert not torch.equal(second1[:, :, 1], first1[:, :, 3])


def test_forward_recycles_noise_without_reversal():
    """With recycle weight 1000 the fresh noise is ~1e-3: frame j >= O restarts from frame j's initial noise."""
    model = random_model("tiny", 2)
    fwd = _inputs(model, denoise_guidance=0.0, noise_recycle=1000.0, continuation="forward")
    torch.testing.assert_close(fwd[2][:, :, 2:], fwd[0][:, :, 2:], rtol=0, atol=RECYCLE_1000)
    off = _inputs(model, denoise_guidance=0.0, noise_recycle=1000.0)
    torch.testing.assert_close(off[2][:, :, 2:], off[0][:, :, [1, 0]], rtol=0, atol=RECYCLE_1000)


@pytest.mark.parametrize("assembly", ["official", "trim"])
def test_runtime_forward_matches_reference(assembly):
    model = random_model("tiny", 3)
    s = SamplerSettings(height=32, width=32, frames=4, steps=3, clips=3, overlap=2, denoise_guidance=0.7,
                        guidance_scale=5.0, assembly=assembly, continuation="forward")
    rt = open_runtime(model, limits=Limits(batch=1, frames=4, height=32, width=32, steps=3, overlap=2))
    clips = list(rt.generate(Request(("a",), None, s, seed=4, float_video=True)))
    video = torch.cat([c.video for c in clips], dim=2)
    ref, _ = generate(model, ["a"], None, s, torch.Generator().manual_seed(4))
    assert video.shape == ref.shape
    assert (video - ref).abs().max() <= RUNTIME_VIDEO


def test_shifted_source_frames():
    s = SamplerSettings(frames=8, overlap=3, continuation="forward", recycle_order="shifted")
    assert s.source_frames() == [5, 6, 7, 0, 1, 2, 3, 4]
    assert SamplerSettings(frames=8, overlap=4, continuation="forward", recycle_order="shifted").source_frames() == [
        4, 5, 6, 7, 0, 1, 2, 3]


def test_shifted_recycles_the_noise_moved_on_by_the_stride():
    """Frames 0..O-1 restart from frames F-O.. of the previous clip's initial noise, frames O.. from frames 0.."""
    model = random_model("tiny", 2)
    seen = _inputs(model, denoise_guidance=0.0, noise_recycle=1000.0, continuation="forward", recycle_order="shifted")
    assert torch.equal(seen[2][:, :, :2], seen[0][:, :, 2:])  # F=4, O=2: overlap frames copied
    torch.testing.assert_close(seen[2][:, :, 2:], seen[0][:, :, :2], rtol=0, atol=RECYCLE_1000)


@pytest.mark.parametrize("recycle_order", ["index", "shifted"])
def test_runtime_shifted_matches_reference(recycle_order):
    model = random_model("tiny", 3)
    s = SamplerSettings(height=32, width=32, frames=4, steps=3, clips=3, overlap=1, denoise_guidance=0.7,
                        guidance_scale=5.0, assembly="trim", continuation="forward", recycle_order=recycle_order)
    rt = open_runtime(model, limits=Limits(batch=1, frames=4, height=32, width=32, steps=3, overlap=2))
    video = torch.cat([c.video for c in rt.generate(Request(("a",), None, s, seed=4, float_video=True))], dim=2)
    ref, _ = generate(model, ["a"], None, s, torch.Generator().manual_seed(4))
    assert video.shape == ref.shape
    assert (video - ref).abs().max() <= RUNTIME_VIDEO


def test_shifted_needs_forward():
    with pytest.raises(ValueError, match="recycle_order='shifted' needs continuation='forward'"):
        SamplerSettings(recycle_order="shifted")
    with pytest.raises(ValueError, match="recycle_order='backward'"):
        SamplerSettings(continuation="forward", recycle_order="backward")


def test_bad_continuation_is_refused():
    with pytest.raises(ValueError, match="continuation='backward'"):
        SamplerSettings(continuation="backward")


def test_a_single_clip_with_overlap_past_its_frames_runs_forward():
    """One clip reads no history, so overlap >= frames is allowed there, in every continuation mode."""
    model = random_model("tiny", 2)
    for mode in ("official", "forward"):
        s = SamplerSettings(height=32, width=32, frames=2, overlap=4, steps=1, clips=1, continuation=mode)
        assert len(s.source_frames()) == 2
        video = generate(model, ["a"], settings=s, generator=torch.Generator().manual_seed(0))[0]  # (B,3,F,H,W)
        assert video.shape[2] == 2
