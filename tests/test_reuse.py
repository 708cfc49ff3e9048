"""UNet feature reuse (FeatureCache), the per-step reuse plan (ReuseSettings), and both samplers following it: opt-in,
exact when off, the runtime equal to the reference sampler when on."""
import pytest
import torch

from allocations import outside_backend
from tolerances import (GUIDANCE_REUSE_FRESH_REL, ORT_LATENT_REL, REUSE_EFFECT_MIN_REL, REUSE_NEXT_STEP_REL,
                        REUSE_RUNTIME_LATENT_REL, REUSE_RUNTIME_VIDEO)
from vidrd.ref.reuse import PRESETS, FeatureCache, ReuseSettings, StepPlan, guided_eps_reuse
from vidrd.ref.sampler import SamplerSettings, generate
from vidrd.ref.weights import random_model
from vidrd.runtime.backends import Backend, TorchUNet
from vidrd.runtime.loop import Limits, Request
from vidrd.runtime.options import RuntimeOptions, open_runtime

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
    assert _codes(PRESETS["balanced"].plan(10)) == ("FFFFFFFFFF", "BBBBBBBCCC")
    assert _codes(PRESETS["fast"].plan(10)) == _codes(PRESETS["exact"].plan(10)) == ("FFFFFFFFFF", "BBBBBBBBBB")
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

def test_guidance_reuse_agrees_with_the_reference_guidance_when_fresh():
    g = torch.Generator().manual_seed(0)
    eps_u, eps_c = torch.randn(2, 1, 4, 3, 8, 8, generator=g)  # (B,C,F,h,w) each
    want = eps_u + 7.5 * (eps_c - eps_u)  # vidrd_ref/sampler.py's guidance line
    fresh = guided_eps_reuse(eps_c, eps_c - eps_u, 7.5)
    assert (fresh - want).abs().max() <= GUIDANCE_REUSE_FRESH_REL * want.abs().max()
    assert torch.equal(guided_eps_reuse(eps_c, eps_c - eps_u, 1.0), eps_c)  # no guidance: d does not matter


# ------------------------------------------------------------------------------------- the samplers follow the plan

LIMITS = Limits(batch=2, frames=4, height=32, width=32, steps=8, overlap=2)
BASE = dict(height=32, width=32, frames=4, steps=8, clips=2, overlap=2, guidance_scale=7.5)
REUSE_OPTIONS = [  # each enables one mechanism or a mix; solver and prediction vary
    dict(cache_interval=2), dict(cache_interval=3, cache_depth=2, cache_from=0.2, cache_until=0.9),
    dict(guidance_reuse_after=0.5), dict(guidance_reuse_after=0.25, guidance_refresh=2),
    dict(cache_interval=3, guidance_reuse_after=0.4, solver="dpmpp-2m"),
]


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", 0)


def _reference(model, s, prompts=("a", "b"), seed=3):
    return generate(model, list(prompts), None, s, torch.Generator().manual_seed(seed))


def _runtime(model, s, prompts=("a", "b"), seed=3, rt=None):
    rt = rt or open_runtime(model, limits=LIMITS)
    clips = list(rt.generate(Request(tuple(prompts), None, s, seed, float_video=True)))
    return torch.cat([c.video for c in clips], dim=2), torch.stack([c.latents for c in clips])


def test_settings_carry_the_reuse_fields_off_by_default():
    s = SamplerSettings()
    assert s.reuse() == ReuseSettings() and s.plan() == ReuseSettings().plan(s.steps)
    r = SamplerSettings(steps=10, cache_interval=3, cache_from=0.2, cache_until=0.8, guidance_reuse_after=0.7)
    assert r.reuse() == ReuseSettings(3, 0.2, 0.8, 1, 0.7, 0) and r.plan() == r.reuse().plan(10)
    assert isinstance(SamplerSettings(cache_until=1).cache_until, float)  # fractions become floats, as weights do
    # without guidance there is one branch: guidance reuse plans nothing (and no extra feature stores)
    assert SamplerSettings(steps=10, guidance_scale=1.0, guidance_reuse_after=0.3, cache_interval=2).plan() == \
        ReuseSettings(cache_interval=2).plan(10)


@pytest.mark.parametrize("kw, match", [
    (dict(cache_interval=0), "cache_interval=0 must be an integer >= 1"),
    (dict(cache_depth=True), "cache_depth=True"), (dict(guidance_refresh=-1), "guidance_refresh=-1"),
    (dict(guidance_reuse_after=1.5), "guidance_reuse_after=1.5 must be a fraction"),
    (dict(cache_from=float("nan")), "cache_from=nan"), (dict(cache_from=0.6, cache_until=0.5), "cache_from=0.6"),
])
def test_settings_validate_reuse_fields_naming_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplerSettings(**kw)


def test_cache_depth_beyond_the_unet_fails_before_any_work(model):
    with pytest.raises(ValueError, match="cache_depth=5 exceeds the UNet's 4 up blocks"):
        _reference(model, SamplerSettings(**BASE, cache_interval=2, cache_depth=5))
    with pytest.raises(ValueError, match="cache_depth=5 exceeds"):
        next(open_runtime(model, limits=LIMITS).generate(
            Request(("a",), None, SamplerSettings(**BASE, cache_interval=2, cache_depth=5))))
    SamplerSettings(**BASE, cache_depth=5).check_model(model)  # unused without feature reuse


def test_each_option_changes_the_output_only_when_enabled(model):
    _, want = _reference(model, SamplerSettings(**BASE))
    # reuse fields that enable nothing: the official loop bit for bit (interval 1 ignores the window and depth;
    # guidance reuse is moot without guidance, checked against the unguided default)
    idle = SamplerSettings(**BASE, cache_interval=1, cache_depth=3, cache_from=0.3, cache_until=0.6,
                           guidance_reuse_after=1.0, guidance_refresh=2)
    assert torch.equal(_reference(model, idle)[1], want)
    unguided = {**BASE, "guidance_scale": 1.0}
    assert torch.equal(_reference(model, SamplerSettings(**unguided, guidance_reuse_after=0.3))[1],
                       _reference(model, SamplerSettings(**unguided))[1])
    for kw in REUSE_OPTIONS:
        base = _reference(model, SamplerSettings(**{**BASE, "solver": kw.get("solver", "ddim")}))[1]
        got = _reference(model, SamplerSettings(**{**BASE, **kw}))[1]
        assert ((got - base).norm() / base.norm()).item() > REUSE_EFFECT_MIN_REL, kw


@pytest.mark.parametrize("kw", REUSE_OPTIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_runtime_matches_reference_with_reuse(model, kw):
    s = SamplerSettings(**{**BASE, **kw})
    video, latents = _runtime(model, s)
    ref_video, ref_latents = _reference(model, s)
    assert (latents - ref_latents).abs().max() <= REUSE_RUNTIME_LATENT_REL * ref_latents.abs().max()
    assert (video - ref_video).abs().max() <= REUSE_RUNTIME_VIDEO


def test_runtime_matches_reference_with_reuse_on_a_v_model():
    from dataclasses import replace

    from vidrd.ref.ddim import DDIM
    model = random_model("tiny", 4)
    sched = replace(model.config.scheduler, prediction_type="v_prediction")
    model.config, model.scheduler = replace(model.config, scheduler=sched), DDIM(sched)
    s = SamplerSettings(**BASE, cache_interval=2, guidance_reuse_after=0.5)
    video, latents = _runtime(model, s, prompts=("a",))
    ref_video, ref_latents = _reference(model, s, prompts=("a",))
    assert (latents - ref_latents).abs().max() <= REUSE_RUNTIME_LATENT_REL * ref_latents.abs().max()
    assert (video - ref_video).abs().max() <= REUSE_RUNTIME_VIDEO


class CallLog(torch.nn.Module):
    """The real UNet, recording each call's batch and cache mode (the reference sampler calls model.unet)."""

    def __init__(self, unet, log):
        super().__init__()
        self.unet, self.cfg, self.log = unet, unet.cfg, log

    def forward(self, x, t, ctx, cache=None):
        self.log.append((x.shape[0], ctx.shape[0], "full" if cache is None else cache.mode))
        return self.unet(x, t, ctx) if cache is None else self.unet(x, t, ctx, cache=cache)


class BackendLog(Backend):
    """The runtime's real UNet backend, recording each call's batch and cache mode."""

    def __init__(self, backend, log):
        self.backend, self.log = backend, log
        self.dtype, self.device, self.feature_cache = backend.dtype, backend.device, backend.feature_cache

    def check_shapes(self, *args, **kw):
        self.backend.check_shapes(*args, **kw)

    def __call__(self, sample, timestep, context, out, *cache):
        self.log.append((sample.shape[0], context.shape[0], "full" if not cache else cache[0].mode))
        assert timestep.shape[0] == out.shape[0] == sample.shape[0]
        self.backend(sample, timestep, context, out, *cache)


def test_cond_only_steps_run_a_batch_b_unet(model):
    s = SamplerSettings(**{**BASE, "steps": 6}, cache_interval=2, guidance_reuse_after=0.5)
    plan = s.plan()
    assert [(p.unet, p.guidance) for p in plan] == [("store", "both"), ("reuse", "both"), ("full", "both"),
                                                    ("store", "cond_reuse"), ("reuse", "cond_reuse"),
                                                    ("full", "cond_reuse")]
    want = [(2 * 2 if p.guidance == "both" else 2,) * 2 + (p.unet,) for p in plan] * s.clips  # B = 2 prompts
    ref_log = []
    real = model.unet
    model.unet = CallLog(real, ref_log)
    try:
        _reference(model, s)
    finally:
        model.unet = real
    assert ref_log == want
    rt, rt_log = open_runtime(model, limits=LIMITS), []
    rt.unet = BackendLog(rt.unet, rt_log)
    _runtime(model, s, rt=rt)
    assert rt_log == want


def test_reuse_steps_allocate_nothing_outside_backend_calls(model):
    from torch.profiler import ProfilerActivity, profile, record_function

    class Recorded(BackendLog):
        def __call__(self, *args):
            with record_function("vidrd::backend"):
                self.backend(*args)

    rt = open_runtime(model, limits=LIMITS)
    rt.unet = Recorded(rt.unet, [])
    s = SamplerSettings(**BASE, cache_interval=2, guidance_reuse_after=0.5, guidance_refresh=2)
    job = rt.prepare(["a", "b"], ["", ""], s, Request(("a", "b"), None, s))
    assert job.d_last.data_ptr() == rt.d_last.data_ptr()  # bound to the runtime's buffer before step 0
    with torch.no_grad():
        job.step(0, 0)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for i in range(1, s.steps):
                job.step(0, i)
            job.restart()
            for i in range(s.steps):
                job.step(1, i)
    allocs = outside_backend(prof)
    assert sum(e.name == "vidrd::backend" for e in prof.events()) == 2 * s.steps - 1
    assert allocs == []


def test_runtime_refuses_reuse_its_unet_cannot_run(model):
    class StaticBatch(BackendLog):  # an engine built for the guidance-doubled batch only
        def check_shapes(self, batch, frames, height, width, *, guidance=True, temporal=False):
            if not guidance:
                raise ValueError(f"dim batch={batch} is outside the engine's profile [4, 4]")

    rt = open_runtime(model, limits=LIMITS)
    rt.unet = StaticBatch(rt.unet, [])
    with pytest.raises(ValueError, match=r"guidance_reuse_after=0.5 \(--guidance-reuse-after\) runs the UNet on the "
                       r"conditional half alone \(batch 2\), which this UNet cannot: dim batch=2 is outside"):
        next(rt.generate(Request(("a", "b"), None, SamplerSettings(**BASE, guidance_reuse_after=0.5))))
    next(rt.generate(Request(("a", "b"), None, SamplerSettings(**BASE, cache_interval=2))))  # feature reuse runs
    rt.unet = TorchUNet(model, torch.float32, torch.device("cpu"), compile="default")  # compiled on first call only
    with pytest.raises(ValueError, match=r"cache_interval=2 \(UNet feature reuse, --cache-interval\) needs the "
                       "eager torch UNet"):
        next(rt.generate(Request(("a",), None, SamplerSettings(**BASE, cache_interval=2))))


def test_onnxruntime_unet_runs_guidance_reuse_and_refuses_feature_reuse(model, default_onnx):
    size = dict(height=64, width=64)  # inside the export's ranges
    rt = open_runtime(model, RuntimeOptions(unet_backend="onnxruntime", export_dir=default_onnx),
                      Limits(2, 4, 64, 64, 8, 2))
    with pytest.raises(ValueError, match="cache_interval=3 .* needs the eager torch UNet: exported graphs"):
        next(rt.generate(Request(("a",), None, SamplerSettings(**{**BASE, **size}, cache_interval=3))))
    s = SamplerSettings(**{**BASE, **size}, guidance_reuse_after=0.5)  # the export takes batch B as well as 2B
    _, latents = _runtime(model, s, rt=rt)
    ref_latents = _reference(model, s)[1]
    assert (latents - ref_latents).abs().max() <= ORT_LATENT_REL * ref_latents.abs().max()
