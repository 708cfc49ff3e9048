"""UNet feature reuse (FeatureCache) and the per-step reuse plan (ReuseSettings): opt-in, exact when off."""
import pytest
import torch

from tolerances import GUIDANCE_REUSE_FRESH_REL, REUSE_NEXT_STEP_REL
from vidrd.ref.reuse import PRESETS, FeatureCache, ReuseSettings, StepPlan, guided_eps, guided_eps_reuse
from vidrd.ref.weights import random_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def unet():
    return random_model("tiny", 0).unet  # 4 down and 4 up blocks, layers_per_block 2


def _inputs(unet, hw=(8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, *hw, generator=g)  # (B,C,F,h,w)
    ctx = torch.randn(2, 77, unet.cfg.cross_attention_dim, generator=g)  # (B,L,D)
    return x, ctx


@torch.no_grad()
def test_no_cache_and_store_are_the_full_forward(unet):
    x, ctx = _inputs(unet)
    want = unet(x, 500, ctx).clone()  # without the argument, as before the cache existed
    assert torch.equal(unet(x, 500, ctx, cache=None), want)
    cache = FeatureCache("store")
    assert torch.equal(unet(x, 500, ctx, cache=cache), want)
    assert cache.feature.shape == (2, 64, 3, 8, 8)  # (B,C,F,h,w): up block 2's output, upsampled to full size


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("hw", [(8, 8), (6, 5)])  # 6x5: explicit up-sampling sizes
@torch.no_grad()
def test_reuse_right_after_store_is_the_full_output(unet, depth, hw):
    # same inputs, same kernels and shapes in one thread: the recomputed shallow path is the same arithmetic
    x, ctx = _inputs(unet, hw)
    want = unet(x, 500, ctx)
    cache = FeatureCache("store", depth)
    unet(x, 500, ctx, cache=cache)
    cache.mode = "reuse"
    assert torch.equal(unet(x, 500, ctx, cache=cache), want)


@torch.no_grad()
def test_reuse_runs_only_the_shallow_path(unet):
    x, ctx = _inputs(unet)
    cache = FeatureCache("store")
    unet(x, 500, ctx, cache=cache)
    ran = set()
    parts = {"conv_in": unet.conv_in, "down0.layers": unet.down_blocks[0].resnets[1],
             "down0.downsampler": unet.down_blocks[0].downsamplers[0], "down1": unet.down_blocks[1].resnets[0],
             "mid": unet.mid_block, "up2": unet.up_blocks[2].resnets[0], "up3": unet.up_blocks[3].resnets[2],
             "conv_out": unet.conv_out}  # blocks run layer by layer (Block3D.layer): hook their modules
    hooks = [m.register_forward_hook(lambda *a, k=k: ran.add(k)) for k, m in parts.items()]
    try:
        unet(x, 500, ctx, cache=cache.for_step("reuse"))
    finally:
        for h in hooks:
            h.remove()
    assert ran == {"conv_in", "down0.layers", "up3", "conv_out"}


@torch.no_grad()
def test_reuse_on_the_next_step_is_close_to_full(unet):
    x, ctx = _inputs(unet)
    x2 = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))  # the next step's latents
    cache = FeatureCache("store")
    before = unet(x, 500, ctx, cache=cache)
    full = unet(x2, 480, ctx)
    reused = unet(x2, 480, ctx, cache=cache.for_step("reuse"))
    err = (reused - full).abs().max() / full.abs().max()
    assert 0 < err < REUSE_NEXT_STEP_REL, err
    assert (reused - full).norm() < (before - full).norm()  # better than reusing the whole output


@torch.no_grad()
def test_cache_errors_name_the_bad_value(unet):
    x, ctx = _inputs(unet)
    with pytest.raises(ValueError, match="'store' forward"):
        unet(x, 500, ctx, cache=FeatureCache("reuse"))
    for depth in (0, 5):
        with pytest.raises(ValueError, match=f"cache.depth={depth}"):
            unet(x, 500, ctx, cache=FeatureCache("store", depth))
    with pytest.raises(ValueError, match="cache.mode='keep'"):
        unet(x, 500, ctx, cache=FeatureCache("keep"))
    cache = FeatureCache("store")
    unet(x, 500, ctx, cache=cache)
    with pytest.raises(ValueError, match=r"\(2, 64, 3, 8, 8\) does not fit this call \(batch 1"):
        unet(x[:1], 500, ctx[:1], cache=cache.for_step("reuse"))
    with pytest.raises(ValueError, match="unet mode 'half'"):
        cache.for_step("half")


def test_for_step():
    cache = FeatureCache()
    assert cache.for_step("full") is None
    assert cache.for_step("reuse") is cache and cache.mode == "reuse"
    assert cache.for_step("store") is cache and cache.mode == "store"


# ---------------------------------------------------------------------------------------------------------- plans

def _codes(plan):
    """A plan as one string per field: unet F/S/R, guidance B/C."""
    return "".join(p.unet[0].upper() for p in plan), "".join("B" if p.guidance == "both" else "C" for p in plan)


@pytest.mark.parametrize("steps", [1, 2, 25, 50])
def test_default_plan_is_exact(steps):
    assert ReuseSettings().plan(steps) == [StepPlan("full", "both")] * steps
    assert PRESETS["exact"].plan(steps) == [StepPlan("full", "both")] * steps


def test_plan_interval_window():
    assert _codes(ReuseSettings(cache_interval=2).plan(7)) == ("SRSRSRF", "BBBBBBB")  # the last store: unread
    assert _codes(ReuseSettings(cache_interval=3, cache_from=0.2, cache_until=0.8).plan(10)) == \
        ("FFSRRSRRFF", "BBBBBBBBBB")  # the window is steps 2..7
    assert _codes(ReuseSettings(cache_interval=4, cache_depth=2).plan(8)) == ("SRRRSRRR", "BBBBBBBB")


def test_plan_guidance_reuse():
    assert _codes(ReuseSettings(guidance_reuse_after=0.7).plan(10)) == ("FFFFFFFFFF", "BBBBBBBCCC")
    assert _codes(ReuseSettings(guidance_reuse_after=0.0).plan(4)) == ("FFFF", "BCCC")  # step 0 measures d
    assert _codes(ReuseSettings(guidance_reuse_after=0.3, guidance_refresh=3).plan(10)) == \
        ("FFFFFFFFFF", "BBBCCBCCBC")  # every 3rd late step re-measures d


def test_plan_stores_again_when_the_batch_changes():
    # a feature of the 2B-row both-branch call cannot serve a B-row cond_reuse call: step 4 stores again, and the
    # store at step 3, which nothing reads, is a plain full step
    assert _codes(ReuseSettings(cache_interval=3, guidance_reuse_after=0.4).plan(10)) == \
        ("SRRFSRRSRR", "BBBBCCCCCC")
    # refreshing d every other late step alternates the batch, so no late step can reuse features
    assert _codes(ReuseSettings(cache_interval=2, guidance_reuse_after=0.25, guidance_refresh=2).plan(8)) == \
        ("SRFFFFFF", "BBCBCBCB")


def test_presets():
    assert _codes(PRESETS["balanced"].plan(10)) == ("FFSRSRFSRF", "BBBBBBBCCC")
    assert _codes(PRESETS["fast"].plan(10)) == ("FSRRFSRRSR", "BBBBBCCCCC")
    for s in PRESETS.values():
        s.validate()
    assert set(PRESETS) == {"exact", "balanced", "fast"}


def test_fractions_round_half_up():
    # 0.3 * 10 is 3.0000000000000004 in floats: still step 3
    assert _codes(ReuseSettings(guidance_reuse_after=0.3).plan(10))[1] == "BBBCCCCCCC"
    assert _codes(ReuseSettings(guidance_reuse_after=0.5).plan(5))[1] == "BBBCC"  # 2.5 -> step 3


@pytest.mark.parametrize("kw, match", [
    ({"cache_interval": 0}, "cache_interval=0"), ({"cache_interval": 2.0}, "cache_interval=2.0"),
    ({"cache_interval": True}, "cache_interval=True"), ({"cache_depth": 0}, "cache_depth=0"),
    ({"guidance_refresh": -1}, "guidance_refresh=-1"), ({"cache_from": -0.1}, "cache_from=-0.1"),
    ({"cache_until": 1.5}, "cache_until=1.5"), ({"guidance_reuse_after": float("nan")}, "guidance_reuse_after=nan"),
    ({"cache_from": "0.2"}, "cache_from='0.2'"), ({"cache_from": 0.6, "cache_until": 0.5}, "cache_from=0.6"),
])
def test_bad_settings_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        ReuseSettings(**kw).validate()
    with pytest.raises(ValueError, match=match):
        ReuseSettings(**kw).plan(10)


@pytest.mark.parametrize("steps", [0, -3, 2.0, None])
def test_bad_steps_raise(steps):
    with pytest.raises(ValueError, match=f"steps={steps!r}"):
        ReuseSettings().plan(steps)


# -------------------------------------------------------------------------------------------------------- guidance

def test_guided_eps_is_the_reference_formula_and_the_reuse_variant_agrees_when_fresh():
    g = torch.Generator().manual_seed(0)
    eps_u, eps_c = torch.randn(2, 1, 4, 3, 8, 8, generator=g)  # (B,C,F,h,w) each
    want = eps_u + 7.5 * (eps_c - eps_u)  # vidrd_ref/sampler.py's guidance line
    assert torch.equal(guided_eps(eps_u, eps_c, 7.5), want)
    fresh = guided_eps_reuse(eps_c, eps_c - eps_u, 7.5)
    assert (fresh - want).abs().max() <= GUIDANCE_REUSE_FRESH_REL * want.abs().max()
    assert torch.equal(guided_eps_reuse(eps_c, eps_c - eps_u, 1.0), eps_c)  # no guidance: d does not matter
