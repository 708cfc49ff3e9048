"""Embedding the runtime in a service: opening one and generating leave the caller's model and torch's process-wide
settings as they were, and a dropped generation never locks the runtime."""
import threading
import time

import pytest
import torch

from vidrd.ref.attention import Attention
from vidrd.ref.sampler import SamplerSettings
from vidrd.ref.weights import random_model
from vidrd.runtime.loop import Limits, Request, Superseded
from vidrd.runtime.options import RuntimeOptions, open_runtime

SMALL = SamplerSettings(height=32, width=32, frames=4, steps=2, clips=3, overlap=2)


def _backends(model) -> set:
    return {m.backend for m in model.modules() if isinstance(m, Attention)}


def test_a_float32_matmul_in_another_thread_is_bit_exact_while_a_bf16_runtime_generates():
    """bf16 with fast ops on 128x128 frames: chunked attention over 256 tokens runs while another thread multiplies
    float32 matrices; that thread's products equal the same products run alone, bit for bit."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    alone = a @ b
    model = random_model("tiny", 0, dtype=torch.bfloat16)
    s = SamplerSettings(height=128, width=128, frames=2, steps=2)
    rt = open_runtime(model, RuntimeOptions(dtype="bf16", fast_ops=True, allow_slow_dtype=True), Limits.of(s, 1))
    done, mismatches, runs = threading.Event(), [], [0]

    def other():
        while not done.is_set():
            if not torch.equal(a @ b, alone):
                mismatches.append(runs[0])
            runs[0] += 1

    t = threading.Thread(target=other)
    t.start()
    try:
        clips = list(rt.generate(Request(("a",), None, s, 1)))
    finally:
        done.set()
        t.join()
        rt.close()
    assert len(clips) == 1 and runs[0] > 0 and mismatches == []


def test_opening_a_runtime_leaves_the_model_and_torch_settings_as_they_were():
    import torch._inductor.config as inductor
    model = random_model("tiny", 0)
    before = (_backends(model.unet), torch.get_num_threads(), inductor.freezing, torch.backends.mkldnn.matmul.fp32_precision)
    for options in (RuntimeOptions(attention="math"), RuntimeOptions(compile="default"),
                    RuntimeOptions(attention="chunked", fast_ops=True)):
        rt = open_runtime(model, options, Limits.of(SMALL, 1))
        if options.compile is None:
            list(rt.generate(Request(("a",), None, SMALL, 1)))
        rt.close()
        after = (_backends(model.unet), torch.get_num_threads(), inductor.freezing,
                 torch.backends.mkldnn.matmul.fp32_precision)
        assert after == before, options
    rt = open_runtime(model, RuntimeOptions(attention="math"), Limits.of(SMALL, 1))
    assert _backends(rt.unet.net) == {"math"} and _backends(model.unet) == {"sdpa"}
    assert rt.unet.net.conv_in.weight is model.unet.conv_in.weight  # a copy that shares the weights
    rt.close()


def test_a_bad_request_raises_when_generate_is_called():
    rt = open_runtime(random_model("tiny", 0), limits=Limits.of(SMALL, 1))
    with pytest.raises(ValueError, match="frames=64 exceeds"):
        rt.generate(Request(("a",), None, SamplerSettings(height=32, width=32, frames=64), 1))  # no next() needed
    with pytest.raises(ValueError, match="empty"):
        rt.generate(Request(("",), None, SMALL, 1))
    rt.close()


def test_a_dropped_generation_never_blocks_the_next():
    model = random_model("tiny", 0)
    rt = open_runtime(model, limits=Limits.of(SMALL, 1))
    t0, alone_step = time.monotonic(), []
    want = [c.frames for c in rt.generate(Request(("b",), None, SMALL, 5),
                                          on_step=lambda c, i: alone_step.append(time.monotonic()))]
    alone = alone_step[0] - t0  # time to the first step with nothing before it
    dropped = rt.generate(Request(("a",), None, SMALL, 1))
    next(dropped)  # one clip out, then the caller forgets it without close() (the reference keeps it alive here)
    t0, first_step = time.monotonic(), []
    got = [c.frames for c in rt.generate(Request(("b",), None, SMALL, 5),
                                         on_step=lambda c, i: first_step.append(time.monotonic()))]
    # it started at once, nothing waited for the dropped one: within a second (or a few times the undisturbed
    # start where the cores are shared with other work)
    assert first_step[0] - t0 < max(1.0, 5 * alone)
    assert len(got) == len(want) and all((x == y).all() for x, y in zip(got, want))  # the same video as alone
    with pytest.raises(Superseded):
        next(dropped)  # its buffers were taken: it says so instead of yielding someone else's frames
    rt.close()


def test_a_generation_computing_in_another_thread_refuses_a_second():
    model = random_model("tiny", 0)
    rt = open_runtime(model, limits=Limits.of(SMALL, 1))
    started, release = threading.Event(), threading.Event()

    def on_step(c, i):
        started.set()
        release.wait(30)

    t = threading.Thread(target=lambda: list(rt.generate(Request(("a",), None, SMALL, 1), on_step=on_step)))
    t.start()
    try:
        assert started.wait(30)
        with pytest.raises(RuntimeError, match="already generating"):
            next(rt.generate(Request(("b",), None, SMALL, 2)))
    finally:
        release.set()
        t.join()
    assert len(list(rt.generate(Request(("b",), None, SMALL, 2)))) == 3  # free again
    rt.close()
