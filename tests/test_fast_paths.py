"""Exact savings: cross-attention keys and values once per request, the same output as computing them every step."""
import pytest
import torch

from vidrd.ref.attention import Attention, CrossKV
from vidrd.ref.sampler import SamplerSettings
from vidrd.ref.weights import random_model
from vidrd.runtime.loop import Limits, Request
from vidrd.runtime.options import open_runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cross_kv_gives_the_same_unet_output():
    model = random_model("tiny", 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 4, 4, generator=g)  # (B,C,F,h,w)
    ctx = torch.randn(2, 77, model.config.text.hidden_size, generator=g)  # (B,L,D)
    with torch.no_grad():
        assert torch.equal(model.unet(x, 500, CrossKV(model.unet, ctx)), model.unet(x, 500, ctx))


def test_runtime_computes_cross_attention_keys_once_per_request():
    model = random_model("tiny", 0)
    calls = []
    crosses = [m for m in model.unet.modules() if isinstance(m, Attention) and m.cross]
    hooks = [m.to_k.register_forward_hook(lambda *a: calls.append(1)) for m in crosses]
    try:
        rt = open_runtime(model, limits=Limits(batch=1, frames=4, height=16, width=16, steps=3, overlap=1))
        s = SamplerSettings(height=16, width=16, frames=4, steps=3, clips=2, overlap=1)
        list(rt.generate(Request(("a",), None, s, seed=0)))
        assert len(calls) == len(crosses)  # 6 UNet calls, one key projection per layer
        list(rt.generate(Request(("b",), None, s, seed=0)))
        assert len(calls) == 2 * len(crosses)  # a new request, a new context
    finally:
        for h in hooks:
            h.remove()


def test_guidance_reuse_computes_the_conditional_keys_once_per_request():
    """Steps that run the conditional half alone take a CrossKV of that half: made once, not at every switch."""
    model = random_model("tiny", 0)
    calls = []
    crosses = [m for m in model.unet.modules() if isinstance(m, Attention) and m.cross]
    hooks = [m.to_k.register_forward_hook(lambda *a: calls.append(1)) for m in crosses]
    try:
        rt = open_runtime(model, limits=Limits(batch=2, frames=4, height=16, width=16, steps=8, overlap=1))
        # late steps alternate both branches and the conditional half: B C B C
        s = SamplerSettings(height=16, width=16, frames=4, steps=8, clips=2, overlap=1, guidance_reuse_after=0.5,
                            guidance_refresh=2)
        assert [p.guidance for p in s.plan()][4:] == ["cond_reuse", "both", "cond_reuse", "both"]
        list(rt.generate(Request(("a", "b"), None, s, seed=0)))
        assert len(calls) == 2 * len(crosses)  # the whole context and its conditional half, once each
        list(rt.generate(Request(("c", "d"), None, s, seed=0)))
        assert len(calls) == 4 * len(crosses) and len(rt.unet.cross_kv) == 2  # the first request's were dropped
    finally:
        for h in hooks:
            h.remove()
