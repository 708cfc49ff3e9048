"""Several requests in one UNet batch (runtime/batch.py): each job's video equals the same request run alone, jobs
join and leave between clips, a dropped job disturbs no other, incompatible requests are refused, and the step
allocates nothing with a full batch."""
from dataclasses import replace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from allocations import Recorded, outside_backend
from tolerances import BATCHED_LATENT_REL, BATCHED_VIDEO
from vidrd.ref.sampler import SamplerSettings
from vidrd.ref.weights import load_dir, random_model
from vidrd.runtime.batch import PER_JOB, Batch, key
from vidrd.runtime.loop import Cancelled, Limits, Request
from vidrd.runtime.options import open_runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LIMITS = Limits(batch=4, frames=8, height=64, width=64, steps=3, overlap=4)


@pytest.fixture(scope="module")
def shapes_model():
    """The trained embedded model: the tiny random one amplifies float rounding ~1e4-fold (tests/tolerances.py), so
    runs that sum in another order (batched matrices) are compared on this one."""
    from vidrd.runtime.shapes import MODEL_DIR
    return load_dir(MODEL_DIR)


def alone(model, request):
    """(latents (K,b,C,F,h,w), video (b,3,T,H,W)) of `request` on a runtime of its own."""
    clips = list(open_runtime(model, limits=LIMITS).generate(request))
    return torch.stack([c.latents for c in clips]), torch.cat([c.video for c in clips], dim=2)


def drain(batch, joins=()):
    """Run `batch` until it is empty; joins: (after clip k, request) pairs admitted at that clip boundary. Returns
    {member: [clips]} and the members in admission order."""
    got, order, k = {}, list(batch.members), 0
    while batch.members:
        for m in batch.run_clip():
            if m.out is not None:
                got.setdefault(m, []).append(m.out)
        for after, request in joins:
            if after == k:
                order.append(batch.admit(request))
        k += 1
    return got, order


def assert_alone(model, request, clips):
    want_lat, want_video = alone(model, request)
    assert [c.index for c in clips] == list(range(request.settings.clips))
    lat = torch.stack([c.latents for c in clips])
    video = torch.cat([c.video for c in clips], dim=2)
    assert lat.shape == want_lat.shape and video.shape == want_video.shape
    assert (lat - want_lat).abs().max() <= BATCHED_LATENT_REL * want_lat.abs().max()
    assert (video - want_video).abs().max() <= BATCHED_VIDEO


@pytest.mark.parametrize("solver, continuation, assembly", [("ddim", "official", "official"),
                                                            ("dpmpp-2m", "forward", "trim")])
def test_each_job_equals_its_request_alone_and_a_job_joins_at_a_clip_boundary(shapes_model, solver, continuation,
                                                                               assembly):
    """Three jobs with their own prompts, negatives, seeds, guidance scales, clips and noise prior; the third joins
    after the first clip; the second leaves after its last (second) clip while the others go on."""
    s = SamplerSettings(height=64, width=64, frames=8, steps=3, clips=3, overlap=4, solver=solver,
                        continuation=continuation, assembly=assembly)
    a = Request(("a red circle moving right on a black background",), ("",), s, seed=3, float_video=True)
    b = Request(("a blue square moving down on a black background",), ("",),
                replace(s, guidance_scale=5.0, clips=2), seed=4, float_video=True)
    c = Request(("a green triangle", "a yellow circle"), ("", "noise"), replace(s, noise_prior=0.5), seed=5,
                float_video=True)
    batch = Batch(open_runtime(shapes_model, limits=LIMITS))
    batch.admit(a)
    batch.admit(b)
    got, members = drain(batch, joins=[(0, c)])
    assert [len(got[m]) for m in members] == [3, 2, 3] and batch.lead is None
    for request, m in zip((a, b, c), members):
        assert_alone(shapes_model, request, got[m])


def test_guidance_reuse_and_feature_reuse_jobs_equal_their_requests_alone(shapes_model):
    s = SamplerSettings(height=64, width=64, frames=8, steps=3, clips=2, overlap=4, guidance_reuse_after=0.5,
                        cache_interval=2, cache_from=0.0, cache_until=1.0)
    a = Request(("a red circle moving right on a black background",), ("",), s, seed=1, float_video=True)
    b = Request(("a blue square moving down on a black background",), ("",), replace(s, guidance_scale=7.0), seed=2,
                float_video=True)
    batch = Batch(open_runtime(shapes_model, limits=LIMITS))
    members = [batch.admit(a), batch.admit(b)]
    got, _ = drain(batch)
    for request, m in zip((a, b), members):
        assert_alone(shapes_model, request, got[m])


def test_a_cancelled_job_leaves_after_its_step_and_the_others_are_undisturbed(shapes_model):
    s = SamplerSettings(height=64, width=64, frames=8, steps=3, clips=2, overlap=4)
    a = Request(("a red circle moving right on a black background",), ("",), s, seed=3, float_video=True)
    b = Request(("a blue square moving down on a black background",), ("",), s, seed=4, float_video=True)
    seen = []

    def cancel_at_second_step(c, i):
        seen.append((c, i))
        if (c, i) == (0, 1):
            raise Cancelled("stop")

    batch = Batch(open_runtime(shapes_model, limits=LIMITS))
    kept, cancelled = batch.admit(a), batch.admit(b, on_step=cancel_at_second_step)
    ran = batch.run_clip()
    assert seen == [(0, 0), (0, 1)]  # no step reported after the cancel
    assert isinstance(cancelled.error, Cancelled) and cancelled.out is None and cancelled in ran
    assert batch.members == [kept]  # its rows ran to the clip's end and are free now
    clips = [kept.out]
    while batch.members:
        clips += [m.out for m in batch.run_clip()]
    assert_alone(shapes_model, a, clips)


def test_a_failing_job_fails_alone():
    """A job whose callback fails is dropped with its error; a job whose request is invalid never enters."""
    rt = open_runtime(random_model("tiny", 0), limits=LIMITS)
    s = SamplerSettings(height=32, width=32, frames=4, steps=2, clips=2, overlap=2)

    def broken(c, i):
        raise OSError("its storage is gone")

    batch = Batch(rt)
    ok, bad = batch.admit(Request(("a",), None, s, seed=1)), batch.admit(Request(("b",), None, s, seed=2),
                                                                          on_step=broken)
    with pytest.raises(ValueError, match="is empty"):
        batch.admit(Request(("  ",), None, s))
    with pytest.raises(ValueError, match="seed="):
        batch.admit(Request(("c",), None, s, seed=-1))
    assert batch.members == [ok, bad]
    batch.run_clip()
    assert isinstance(bad.error, OSError) and batch.members == [ok] and ok.error is None
    assert [m.out.index for m in batch.run_clip()] == [1] and not batch.members
    assert len(list(rt.generate(Request(("a",), None, s)))) == 2  # the batch released the runtime


def test_incompatible_requests_never_share_a_batch():
    rt = open_runtime(random_model("tiny", 0), limits=LIMITS)
    s = SamplerSettings(height=32, width=32, frames=4, steps=2, clips=2, overlap=2)
    batch = Batch(rt, jobs=2)
    batch.admit(Request(("a",), None, s))
    for other, name in ((replace(s, steps=3), "steps=3"), (replace(s, height=40), "height=40"),
                        (replace(s, solver="dpmpp-2m"), "solver='dpmpp-2m'"),
                        (replace(s, guidance_scale=1.0), "cfg=False"), (replace(s, overlap=1), "overlap=1")):
        assert not batch.fits(other)
        with pytest.raises(ValueError, match=f"{name} .the batch runs"):
            batch.admit(Request(("b",), None, other))
    for name, value in (("guidance_scale", 3.0), ("clips", 3), ("noise_prior", 0.2), ("assembly", "trim")):
        assert name in PER_JOB and key(replace(s, **{name: value})) == key(s)
    batch.admit(Request(("b",), None, replace(s, guidance_scale=3.0, clips=3)))
    with pytest.raises(ValueError, match=r"the batch is full \(2 jobs\)"):
        batch.admit(Request(("c",), None, s))
    assert len(batch.members) == 2
    with pytest.raises(ValueError, match=r"clip_prompts \(a prompt per clip\) runs alone"):
        Batch(rt).admit(Request(("a",), None, replace(s, clips=2), clip_prompts=("b",)))
    fifo = SamplerSettings(height=32, width=32, frames=4, steps=4, clips=2, overlap=2, continuation="fifo")
    with pytest.raises(ValueError, match=r"continuation='fifo' \(diagonal denoising\) runs alone"):
        Batch(open_runtime(random_model("tiny", 0), limits=replace(LIMITS, steps=4))).admit(Request(("a",), None, fifo))
    rows = Batch(rt)
    rows.admit(Request(("a",) * 3, None, s))
    with pytest.raises(ValueError, match=r"batch=5 prompts in all exceeds the runtime's limit \(batch <= 4\)"):
        rows.admit(Request(("a",) * 2, None, s))


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m"])
def test_step_allocates_nothing_with_a_full_batch(solver):
    rt = open_runtime(random_model("tiny", 0), limits=LIMITS)
    rt.unet = Recorded(rt.unet)
    s = SamplerSettings(height=64, width=64, frames=8, steps=3, clips=2, overlap=4, solver=solver)
    batch = Batch(rt)
    for k, b in enumerate((1, 2, 1)):  # 4 prompts: every row of the limits
        batch.admit(Request(("a",) * b, None, replace(s, guidance_scale=5.0 + k), seed=k))
    assert batch.rows == LIMITS.batch
    with torch.no_grad():
        batch.begin_clip()
        batch.step(0)  # warm-up outside the measurement
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for i in range(1, 3):
                batch.step(i)
        batch.end_clip()
        batch.begin_clip()  # clip 1: every job restarts from its history
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as later:
            for i in range(3):
                batch.step(i)
    assert sum(e.name == "vidrd::backend" for e in prof.events()) == 2  # one UNet call per step for all jobs
    assert outside_backend(prof) == [] and outside_backend(later) == []


def test_each_job_gets_previews_of_its_own_rows():
    """With a tiny decoder every job's on_preview gets its rows of the batch's preview (its clip, the step), as
    Runtime.generate hands a lone request's."""
    from vidrd.runtime import preview
    model = random_model("tiny", 0)
    rt = open_runtime(model, limits=LIMITS)
    dec = preview.TinyDecoder(model.config.vae.latent_channels).eval()
    rt.previews = preview.Previews(dec, rt.limits, model.config.vae.scaling_factor, every=1, drop=False)
    s = SamplerSettings(height=32, width=32, frames=4, steps=2, clips=2, overlap=2)
    seen = {k: [] for k in "ab"}
    batch = Batch(rt)
    batch.admit(Request(("a",), None, s, seed=1), on_preview=lambda c, i, f: seen["a"].append((c, i, f.shape)))
    batch.admit(Request(("b", "c"), None, replace(s, clips=1), seed=2),
                on_preview=lambda c, i, f: seen["b"].append((c, i, f.shape)))
    while batch.members:
        assert all(m.error is None for m in batch.run_clip())
    rt.previews.close()
    assert seen["a"] == [(0, 1, (1, 4, 32, 32, 3)), (0, 2, (1, 4, 32, 32, 3)), (1, 1, (1, 4, 32, 32, 3)),
                         (1, 2, (1, 4, 32, 32, 3))]
    assert seen["b"] == [(0, 1, (2, 4, 32, 32, 3)), (0, 2, (2, 4, 32, 32, 3))]


def test_batching_benchmark_runs_jobs_k_at_a_time_with_the_frames_of_k1():
    """runtime/bench/batched.py (the GPU check's `batch` section, on the CPU here): 3 jobs at K = 1 and 2, newcomers
    joining between clips; each job's frames within a level of its K = 1 frames (the trained model)."""
    import gpu_check
    from vidrd.runtime.bench import batched

    rows = batched.run("embedded", 3, [2], steps=2, clips=2)
    assert [r["batch_jobs"] for r in rows] == [1, 2] and all(r["jobs"] == 3 for r in rows)
    one, two = rows
    assert one["batch_sizes"] == {1: 6} and two["batch_sizes"] == {2: 4, 1: 2}  # the third job joins after clip 2
    assert one["frames_max_levels"] == 0 and two["frames_max_levels"] <= 1, two
    assert two["vs_k1"] == pytest.approx(one["wall_s"] / two["wall_s"], rel=1e-2)
    assert all(r["p50_s"] <= r["p95_s"] <= r["wall_s"] and r["first_clip_p50_s"] <= r["p50_s"] for r in rows)
    assert "batch" in [n for n, _, _ in gpu_check.SECTIONS]
    cell = gpu_check.gist("batch", {"status": "ok", "batched": rows})
    assert cell == f"embedded: K={max(rows, key=lambda r: r['vs_k1'])['batch_jobs']} " \
                   f"{max(r['vs_k1'] for r in rows):.2f}x jobs/s of K=1, frames within " \
                   f"{max(rows, key=lambda r: r['vs_k1'])['frames_max_levels']} levels"
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        batched.setup("nope", "cpu", "fp32")
