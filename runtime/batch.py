"""Several requests on one runtime at once: one UNet call per step for all of them (continuous batching at clip
granularity).

A Batch holds jobs (each a Request with its own prompts, negatives, seed, guidance scale and number of clips) as
row ranges of the runtime's buffers, which are sized once for `Limits.batch` rows. The rows are laid out as for one
request of all their prompts: under guidance the UNet's input is [uncond rows of every job; cond rows of every job],
so each job's rows are two slices of it. Within a clip every job runs the same step in lockstep: the timesteps and
solver factors are shared, which is why the settings in `key` must match. Per step: each job's staged guidance and
history on its rows (each job is at its own clip), one UNet call, each job's guidance combine with its own scale,
one solver update for all rows. Each job draws from its own CPU generator, so its video does not depend on its
neighbours (up to the rounding of batched matrix products: tests/tolerances.py).

Jobs join and leave between clips. When the members change, the layout is bound again: each continuing job's
history is copied out (History.save), the rows are reassigned, the text context of every row is encoded again and
the histories are copied back. A job dropped during a clip (cancelled, failed) stops being reported at once; its
rows run to the end of the clip and are then freed, so the others are not disturbed.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Callable

import numpy as np
import torch

from vidrd.ref.sampler import SamplerSettings

from .loop import Checkpoint, Clip, Generation, NonFiniteOutput, Request, Runtime, Superseded

# What may differ between the jobs of one batch; every other SamplerSettings field, and whether guidance runs at
# all (its batch doubles), must match (`key`).
PER_JOB = ("guidance_scale", "clips", "noise_prior", "assembly")


def key(s: SamplerSettings) -> tuple:
    """What requests must share to run in one batch: every setting but PER_JOB's, and whether guidance runs."""
    return tuple((f.name, getattr(s, f.name)) for f in fields(s) if f.name not in PER_JOB) + (("cfg", s.cfg),)


def alone(request: Request) -> str | None:
    """Why `request` cannot share a batch (it runs alone, Runtime.generate), or None: per-clip prompts change its
    text context between clips, and diagonal denoising (continuation "fifo") runs rounds with a timestep per frame
    instead of clips in lockstep."""
    if request.clip_prompts:
        return "clip_prompts (a prompt per clip)"
    if request.settings.continuation == "fifo":
        return "continuation='fifo' (diagonal denoising)"
    return None


def mismatch(a: SamplerSettings, b: SamplerSettings) -> str | None:
    """The first setting of `a` that keeps it out of a batch running `b` ("steps=10 (the batch runs 25)"), or None."""
    for (name, va), (_, vb) in zip(key(a), key(b)):
        if va != vb:
            return f"{name}={va!r} (the batch runs {vb!r})"
    return None


@dataclass(eq=False)
class Member:
    """One job of a batch: its request, its generator and where it is (`clip`: the clip it runs next)."""
    request: Request
    prompts: list
    negatives: list
    s: SamplerSettings
    on_step: Callable[[int, int], None] | None = None
    on_preview: Callable[[int, int, np.ndarray], None] | None = None
    tag: object = None  # the caller's (the service's job id)
    clip: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)
    live: bool = True  # False once dropped: its rows run to the end of the clip, nothing is reported
    error: BaseException | None = None  # why it was dropped, or its clip failed
    out: Clip | None = None  # the clip it finished in the last run_clip
    job: Generation | None = None  # its views of the runtime's buffers in the current layout
    rows: tuple = (0, 0)  # (first row, rows) in the current layout
    state: tuple | None = None  # (init_src, overlap) CPU copies of its history while the layout is bound again
    started: bool = False  # its first clip's noise was drawn (or its checkpoint loaded)

    @property
    def b(self) -> int:
        return len(self.prompts)

    @property
    def done(self) -> bool:
        return self.clip >= self.s.clips


class Batch:
    """Up to `jobs` requests on one Runtime (and no more rows than its Limits.batch), stepping together."""

    def __init__(self, rt: Runtime, jobs: int | None = None):
        if jobs is not None and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
            raise ValueError(f"jobs={jobs!r} must be an integer >= 1")
        self.rt, self.jobs = rt, jobs
        self.members: list[Member] = []
        self.lead: Generation | None = None  # every row of the batch, as one request of all the prompts
        self._bound = False  # the layout matches the members
        self._token = object()
        self._router = None

    @property
    def settings(self) -> SamplerSettings | None:
        """The settings the batch runs (its first job's), None when it is empty."""
        return self.members[0].s if self.members else None

    @property
    def rows(self) -> int:
        return sum(m.b for m in self.members)

    def fits(self, s: SamplerSettings) -> bool:
        """Whether a request at `s` may join (same key; room is checked by `check`)."""
        return not self.members or key(s) == key(self.settings)

    def check(self, request: Request) -> tuple[list[str], list[str], SamplerSettings]:
        """Validate `request` alone (Runtime.check) and as a member of this batch: its settings match the batch's
        (`key`), and the jobs and rows fit. ValueError naming the value otherwise."""
        prompts, negatives, s = self.rt.check(request)
        why = alone(request)
        if why is not None:
            raise ValueError(f"a request with {why} runs alone (Runtime.generate), not in a batch of jobs")
        if self.members:
            bad = mismatch(s, self.settings)
            if bad is not None:
                raise ValueError(f"{bad}: requests share a batch only when every setting but "
                                 f"{', '.join(PER_JOB)} matches")
        if self.jobs is not None and len(self.members) >= self.jobs:
            raise ValueError(f"the batch is full ({self.jobs} jobs)")
        total = self.rows + len(prompts)
        if total > self.rt.limits.batch:
            raise ValueError(f"batch={total} prompts in all exceeds the runtime's limit (batch <= "
                             f"{self.rt.limits.batch}); set up the runtime with a larger batch limit")
        for be in (self.rt.text, self.rt.unet, self.rt.vae):
            be.check_shapes(total, s.frames, s.height, s.width, guidance=s.cfg, temporal=s.temporal_decode)
        self.rt.check_reuse(total, s)
        return prompts, negatives, s

    def admit(self, request: Request, on_step=None, on_preview=None, tag=None) -> Member:
        """Add a job between clips (validated now: ValueError, and the batch is unchanged). It starts at its clip 0,
        or after request.resume.clip. on_step(clip, step) after each of its steps (raising drops it: `drop`);
        on_preview(clip, steps done, frames (b,F,H,W,3) uint8) as Runtime.generate's (needs rt.previews)."""
        prompts, negatives, s = self.check(request)
        if on_preview is not None and self.rt.previews is None:
            raise ValueError("on_preview needs a tiny decoder: set Runtime.previews to a preview.Previews")
        m = Member(request, prompts, negatives, s, on_step, on_preview, tag)
        m.generator.manual_seed(request.seed)
        if request.resume is not None:
            r = request.resume
            m.clip, m.state, m.started = r.clip + 1, (r.init_src, r.overlap), True
            m.generator.set_state(r.rng)
        self.members.append(m)
        self._bound = False
        return m

    def drop(self, m: Member, error: BaseException | None = None) -> None:
        """Take a job out: nothing more is reported for it. Between clips its rows go now; during a clip (from an
        on_step callback) they run to the clip's end."""
        m.live, m.error = False, m.error or error
        if m.job is None or not self._computing():
            self._remove([m])

    # ------------------------------------------------------------------------------------------------ a clip

    @torch.no_grad()
    def run_clip(self, after_step: Callable[[int], None] | None = None) -> list[Member]:
        """One clip of every job: the members that ran it, each with `out` (its Clip) or `error`. Those that
        finished their last clip, failed or were dropped have left the batch. after_step(i) runs after every step;
        what it raises stops the whole batch (the batch is emptied, the runtime released)."""
        if not self.members:
            return []
        self._claim()
        try:
            self.begin_clip()
            ran = list(self.members)
            for i in range(self.settings.steps):
                self.step(i)
                for m in ran:
                    if m.live and m.on_step is not None:
                        try:
                            m.on_step(m.clip, i)
                        except Exception as e:  # noqa: BLE001 - a cancel or a failing callback ends that job only
                            self.drop(m, e)
                if after_step is not None:
                    after_step(i)
            self.end_clip()
        except BaseException:
            self._remove(list(self.members))
            self._release()
            raise
        self._pause()
        return ran

    def begin_clip(self) -> None:
        """Bind the layout if the members changed, then each job's initial latents for its next clip."""
        if not self._bound:
            self._bind()
        for m in self.members:
            if not m.started:
                m.job.initial_noise()
                m.started = True
            elif m.clip > 0:
                m.job.restart()
        self._router = None
        if any(m.on_preview is not None for m in self.members):
            snapshot = [(m, m.rows[0], m.rows[0] + m.b, m.clip) for m in self.members]
            self._router = snapshot
            self.rt.previews.begin(self.lead.shape, self._preview)
            self.lead.previews = self.rt.previews
        else:
            self.lead.previews = None

    def step(self, i: int) -> None:
        """Step i of every job's current clip, in place; allocates nothing (the runtime's buffers, views)."""
        for m in self.members:
            m.job.history.guide_and_record(i, m.job.lat, m.clip > 0)
        self.lead.predict(i)  # one UNet call for every row
        for m in self.members:
            m.job.combine(i)  # each job's own guidance scale
        self.lead.update(0, i)  # the solver's factors are the same for every row

    def end_clip(self) -> None:
        """Decode every row at once, then each job's clip (its frames, latents, checkpoint); finished, failed and
        dropped jobs leave."""
        rt, lead = self.rt, self.lead
        if lead.previews is not None:
            lead.previews.flush()
        latents_cpu, _ = lead.handoff()  # (N,C,F,h,w) CPU copy
        out = lead.dec_f32
        rt.vae(lead.dec_in, lead.dec_out, self.settings.temporal_decode)
        if out is not lead.dec_out:
            out.copy_(lead.dec_out)
        finite = torch.isfinite(out).flatten(1).all(1).tolist()  # per row: one job's NaN fails that job only
        out.div_(2).add_(0.5).clamp_(0, 1)
        video = None
        if any(m.request.float_video for m in self.members):
            video = out.permute(0, 2, 1, 3, 4).to("cpu", torch.float32, copy=True)  # (N,3,F,H,W)
        out.mul_(255)
        lead.u8.copy_(out.permute(0, 1, 3, 4, 2))  # (N,F,H,W,3): float -> uint8 truncates
        frames = lead.u8.numpy()
        gone = []
        for m in self.members:
            r0, r1 = m.rows[0], m.rows[0] + m.b
            m.out = None
            if not m.live:
                gone.append(m)
                continue
            if not all(finite[r0:r1]):
                m.error = NonFiniteOutput(
                    f"the VAE decoder ({lead.dec_out.dtype}) produced NaN or inf in clip {m.clip}: the frames would "
                    "be black. The SD VAE overflows in float16; decode in float32 or bfloat16 (--vae-dtype fp32 or "
                    "bf16, or an fp32 export/engine for the VAE)")
                m.live = False
                gone.append(m)
                continue
            first = m.s.overlap if (m.clip > 0 and m.s.assembly == "trim") else 0
            saved = self._checkpoint(m) if m.request.checkpoints else None
            m.out = Clip(m.clip, frames[r0:r1, first:].copy(), latents_cpu[r0:r1].clone(),
                         None if video is None or not m.request.float_video else video[r0:r1, :, first:].clone(),
                         saved)
            m.clip += 1
            if m.done:
                gone.append(m)
        self._remove(gone)

    # ------------------------------------------------------------------------------------------------ internals

    def _checkpoint(self, m: Member) -> Checkpoint:
        """Member m's Checkpoint after its current clip, shaped as its request alone would make it (a single-clip
        request keeps no overlap frames)."""
        init_src, overlap = m.job.history.save()
        if m.s.clips == 1:
            overlap = overlap[:, :, :, :0].clone()  # (T,b,C,0,h,w)
        return Checkpoint(m.clip, init_src, overlap, m.generator.get_state())

    def _bind(self) -> None:
        """Lay the members out on the runtime's rows (in admission order) and bind every view."""
        rt = self.rt
        for m in self.members:  # the continuing jobs' histories, before the rows move
            if m.job is not None and m.state is None:
                m.state = m.job.history.save()
        # a history (overlap frames) when any job has a later clip
        lead_s = replace(self.settings, clips=max(m.s.clips for m in self.members))
        prompts = [p for m in self.members for p in m.prompts]
        negatives = [p for m in self.members for p in m.negatives]
        total = len(prompts)
        rt.reserve(lead_s)
        self.lead = Generation(rt, total, lead_s, Request(tuple(prompts), tuple(negatives), lead_s))
        rt.encode(self.lead, negatives + prompts if lead_s.cfg else prompts)  # [uncond; cond] under guidance
        rt.history.start(self.lead.shape, lead_s, rt.scheduler)
        rt.tables(lead_s)
        r0 = 0
        for m in self.members:
            m.rows = (r0, m.b)
            m.job = Generation(rt, m.b, m.s, m.request, rows=(r0, total))
            m.job.generator = m.generator
            rt.job_gscale[r0].copy_(torch.tensor([m.s.guidance_scale, m.s.guidance_scale - 1.0]))
            if m.state is not None:
                init_src, overlap = m.state
                if overlap.shape[3] != m.job.history.overlap_shape[3]:  # a single-clip checkpoint: nothing to read
                    overlap = torch.zeros(m.job.history.overlap_shape)
                m.job.history.load(init_src, overlap)
                m.state = None
            r0 += m.b
        self._bound = True

    def _remove(self, gone: list[Member]) -> None:
        gone = [m for m in gone if m in self.members]
        if gone:
            self.members = [m for m in self.members if m not in gone]
            for m in gone:
                m.job = None
            self._bound = False
            if not self.members:
                self.lead = None
                self._release()

    def _preview(self, c: int, step: int, frames: np.ndarray) -> None:
        """The tiny decoder's frames (N,F,H,W,3) of every row: each job's rows to its own callback."""
        for m, r0, r1, clip in self._router:
            if m.live and m.on_preview is not None:
                try:
                    m.on_preview(clip, step, frames[r0:r1])
                except Exception as e:  # noqa: BLE001 - one job's preview consumer must not stop the others
                    m.error, m.live = m.error or e, False  # dropped: its rows run to the clip's end

    def _computing(self) -> bool:
        with self.rt._lock:
            return self.rt._owner is self._token and self.rt._computing

    def _claim(self) -> None:
        """Own the runtime's buffers for a clip. A generation that took them since the last clip destroyed the
        continuing jobs' state: Superseded."""
        rt = self.rt
        with rt._lock:
            owner = rt._owner is self._token
            if owner:
                rt._computing = True
                return
        if any(m.job is not None for m in self.members):
            self._remove(list(self.members))
            raise Superseded("another generation started on this runtime between two clips of this batch; its "
                             "buffers are gone")
        rt._claim(self._token)

    def _pause(self) -> None:
        self.rt._pause(self._token)

    def _release(self) -> None:
        self.rt._release(self._token)
