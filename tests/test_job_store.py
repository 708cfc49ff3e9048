"""Resuming: a runtime continued from a clip's Checkpoint gives the clips of an uninterrupted run."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from vidrd.ref.sampler import SamplerSettings
from vidrd.ref.weights import random_model
from vidrd.runtime.loop import Limits, Request
from vidrd.runtime.options import open_runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LIMITS = Limits(batch=2, frames=4, height=32, width=32, steps=4, overlap=2, clips=3)


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", 0)


# ------------------------------------------------------------------------------------------------ runtime resume


@pytest.mark.parametrize("prompts, settings", [
    (("a boat",), {}),
    (("a boat",), {"continuation": "forward"}),
    (("a boat", "wood on fire"), {"continuation": "forward", "assembly": "trim", "solver": "dpmpp-2m"}),
], ids=["official", "forward", "forward-trim-dpmpp-batch2"])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(model, prompts, settings):
    s = SamplerSettings(height=32, width=32, frames=4, overlap=2, steps=3, clips=3, **settings)
    request = Request(prompts, None, s, seed=7, checkpoints=True)
    rt = open_runtime(model, limits=LIMITS)
    full = list(rt.generate(request))
    rt.close()
    assert [c.index for c in full] == [0, 1, 2] and all(c.checkpoint.clip == c.index for c in full)
    rt = open_runtime(model, limits=LIMITS)  # a new runtime, as after a restart
    try:
        for k in (0, 1):
            resumed = list(rt.generate(replace(request, resume=full[k].checkpoint)))
            assert [c.index for c in resumed] == list(range(k + 1, 3))
            for a, b in zip(full[k + 1:], resumed):  # same kernels, shapes and thread: the same arithmetic
                assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)
        assert list(rt.generate(replace(request, resume=full[2].checkpoint))) == []  # nothing left
    finally:
        rt.close()


def test_a_checkpoint_that_does_not_fit_the_request_is_refused(model):
    s = SamplerSettings(height=32, width=32, frames=4, overlap=2, steps=3, clips=3)
    rt = open_runtime(model, limits=LIMITS)
    try:
        ck = next(iter(rt.generate(Request(("a",), None, s, checkpoints=True)))).checkpoint
        with pytest.raises(ValueError, match="resume.overlap"):
            rt.generate(Request(("a",), None, replace(s, steps=2), resume=ck))
        with pytest.raises(ValueError, match="resume.clip=3"):
            rt.generate(Request(("a",), None, s, resume=replace(ck, clip=3)))
    finally:
        rt.close()
