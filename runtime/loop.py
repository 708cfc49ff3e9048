"""The lean runtime's loop: set up once (buffers for the largest request), then stream clips of reuse-and-diffuse
videos. `vidrd.runtime.options.open_runtime` builds a Runtime from RuntimeOptions.

Same seed, same video as the reference sampler (vidrd.ref.sampler): the same random draws in the same order and,
in float32 on the same backend, the same arithmetic, also with the opt-in reuse settings (each step
follows SamplerSettings.plan()). Every tensor the denoising loop touches is allocated in `Runtime.__init__` (the
guidance-reuse buffer in `Runtime.prepare`, the first time a request needs it); a step only copies, computes in place
and calls the backends.
"""
from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from vidrd.ref.config import LATENT_FACTOR
from vidrd.ref.dpmpp import DPMSolverPP2M
from vidrd.ref.reuse import FeatureCache
from vidrd.ref.sampler import SamplerSettings, check_clip_prompts, check_prompts, check_seed
from vidrd.ref.text import tokenize

from .backends import Backend
from .fifo import Diagonal, FifoBuffers
from .history import History
from .memory import check_memory


@dataclass(frozen=True)
class Limits:
    """The largest request a runtime serves (its buffers are sized from these) and a service accepts."""
    batch: int = 1
    frames: int = 8
    height: int = 256
    width: int = 256
    steps: int = 50
    overlap: int = 4
    clips: int | None = None  # no buffer grows with the clips: None = any number
    video_prompts: int = 4  # distinct prompts of one video (Request.clip_prompts): a text context each

    def __post_init__(self):
        if not (isinstance(self.video_prompts, int) and self.video_prompts >= 1):
            raise ValueError(f"video_prompts={self.video_prompts!r} must be an integer >= 1 (distinct prompts of "
                             "one video: the first prompt and its clip prompts)")

    @classmethod
    def of(cls, settings: SamplerSettings, batch: int, video_prompts: int = 1) -> "Limits":
        """Buffers for exactly one request shape: `batch` prompts at `settings`, `video_prompts` distinct prompts
        in one video (per-clip prompts)."""
        s = settings
        return cls(batch, s.frames, s.height, s.width, s.steps, max(s.overlap, 1), video_prompts=video_prompts)

    def check(self, settings: SamplerSettings, batch: int, video_prompts: int = 1) -> None:
        """ValueError "name=value exceeds the limit (name <= most)" when `batch` prompts at `settings` (with
        `video_prompts` distinct prompts in a video) go over a limit. The overlap counts only with more than one
        clip: a single clip reads no history."""
        s = settings
        for name, value, most in (("batch", batch, self.batch), ("frames", s.frames, self.frames),
                                  ("height", s.height, self.height), ("width", s.width, self.width),
                                  ("steps", s.steps, self.steps), ("clips", s.clips, self.clips),
                                  ("overlap", s.overlap if s.clips > 1 else 0, self.overlap),
                                  ("video_prompts", video_prompts, self.video_prompts)):
            if most is not None and value > most:
                raise ValueError(f"{name}={value} exceeds the limit ({name} <= {most})")


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """Where a generation continues after clip `clip`: what the next clip reads of it (History) and the request's
    RNG state, CPU copies taken at the clip boundary. With the same request, resuming from it gives the clips an
    uninterrupted run gives (the text context and tables are recomputed from the request)."""
    clip: int
    init_src: torch.Tensor  # (B,C,F,h,w) float32
    overlap: torch.Tensor  # (T,B,C,O,h,w) float32 (O = 0 for a single clip)
    rng: torch.Tensor  # torch.Generator.get_state() of the request's CPU generator, uint8


@dataclass(frozen=True)
class Request:
    """One generation: prompts, optional negatives (default ''), sampler settings, seed."""
    prompts: tuple
    negative_prompts: tuple | None = None
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    seed: int = 42
    float_video: bool = False  # also return each clip as float32 in [0,1] (for checks against the reference)
    checkpoints: bool = False  # also return each clip's Checkpoint (Clip.checkpoint), to resume from later
    resume: Checkpoint | None = field(default=None, compare=False)  # yield clips resume.clip + 1, ... only
    # the prompts of clips 2, 3, ... of a one-prompt request; the last one holds for the clips after it
    clip_prompts: tuple | None = None


@dataclass
class Clip:
    """One decoded clip: frames (B,F',H,W,3) uint8 (F' = F, or F-O for trimmed later clips), latents (B,C,F,h,w)."""
    index: int
    frames: np.ndarray
    latents: torch.Tensor
    video: torch.Tensor | None = None  # (B,3,F',H,W) float32 when the request asked for it
    checkpoint: Checkpoint | None = None  # when the request asked for it


class Cancelled(Exception):
    """Raised by an on_step callback to stop a generation after the current step."""


class Superseded(RuntimeError):
    """A generation resumed after another one took over the runtime's buffers."""


class NonFiniteOutput(RuntimeError):
    """The VAE decoder wrote NaN or inf (the SD VAE overflows in float16): the clip would be silently black."""


class Generation:
    """One request's views of the runtime's buffers and its denoising state (built before step 0).

    `rows=(r0, total)` makes it one job of a batch of jobs (batch.py): the runtime's buffers hold `total` rows, laid
    out as for one request of `total` prompts ([uncond; cond] under guidance), and this job's views are its rows
    r0..r0+b of them. Without `rows` it is the whole request (r0 = 0, total = b)."""

    def __init__(self, rt: "Runtime", b: int, s: SamplerSettings, request: Request, rows: tuple | None = None):
        cfg = rt.model.config
        c, f, d = cfg.unet.in_channels, s.frames, cfg.text.hidden_size
        h, w = s.height // LATENT_FACTOR, s.width // LATENT_FACTOR
        r0, total = rows or (0, b)
        assert 0 <= r0 and r0 + b <= total <= rt.limits.batch, (r0, b, total, rt.limits.batch)
        nb = 2 * total if s.cfg else total  # rows of the UNet's input

        def own(flat, *shape):  # this job's rows of a (total, *shape) view of a flat buffer
            return flat[: total * math.prod(shape)].view(total, *shape)[r0:r0 + b]

        self.rt, self.s, self.request, self.b = rt, s, request, b
        self.shape = (b, c, f, h, w)
        self.lat = own(rt.latents, c, f, h, w)
        # the UNet's input and output (NB,C,F,h,w), NB = 2 total under guidance; eps_u, eps_c: this job's rows of
        # the unconditional and conditional halves (eps_c: the only branch without guidance)
        self.x_in = rt.x_in[: nb * c * f * h * w].view(nb, c, f, h, w)
        self.eps = rt.eps[: nb * c * f * h * w].view(nb, c, f, h, w)
        self.eps_u = self.eps[r0:r0 + b] if s.cfg else None
        self.eps_c = self.eps[total + r0: total + r0 + b] if s.cfg else self.eps[r0:r0 + b]
        self.guided, self.scratch = own(rt.guided, c, f, h, w), own(rt.scratch, c, f, h, w)
        # DPM-Solver++(2M): the previous step's data prediction; DDIM with v prediction: a second temporary
        self.prev_x0 = own(rt.prev_x0, c, f, h, w)
        self.ts, self.ids, self.ctx = rt.timestep[:nb], rt.ids[:nb], rt.ctx[: nb * 77 * d].view(nb, 77, d)
        self.ctx_unet = rt.ctx_unet[: nb * 77 * d].view(nb, 77, d)
        self.noise_cpu, self.noise = own(rt.noise_cpu, c, f, h, w), own(rt.noise, c, f, h, w)
        self.noise_frame = rt.noise_frame[: b * c * h * w].view(b, c, 1, h, w)  # scratch of initial_noise
        self.plan = s.plan()  # per step of every clip: unet full/store/reuse, guidance both/cond_reuse
        # feature reuse: the cache holds a reference to the UNet's own deep feature, no buffer of ours
        self.cache = FeatureCache(depth=s.cache_depth) if any(p.unet != "full" for p in self.plan) else None
        # guidance reuse: eps_c - eps_u of the last step that ran both branches (B,C,F,h,w) float32
        self.d_last = own(rt.d_last, c, f, h, w) if any(p.guidance == "cond_reuse" for p in self.plan) else None
        # guidance scale and scale - 1, float32 scalars: the runtime's, or this job's entry of the batch's table
        self.gscale, self.gscale_m1 = (rt.gscale, rt.gscale_m1) if rows is None else rt.job_gscale[r0].unbind()
        self.history = rt.history if rows is None else rt.history.rows(r0, r0 + b)
        self.dec_in = own(rt.dec_in, c, f, h, w)
        self.dec_out = own(rt.dec_out, f, 3, s.height, s.width)
        self.dec_f32 = own(rt.dec_f32, f, 3, s.height, s.width)
        self.u8 = own(rt.frames_u8, f, s.height, s.width, 3)
        self.generator = torch.Generator().manual_seed(request.seed)
        self.previews = None  # preview.Previews when the caller asked for previews (Runtime.generate)
        self.clip_ctx: list | None = None  # per-clip prompts: each clip's context, a view of ctx_unet or ctx_more
        self.blend: tuple | None = None  # (previous, own) contexts while a new prompt is blended in (prompt_blend)
        self.diagonal: Diagonal | None = None  # continuation "fifo": its rounds replace the clips' steps (fifo.py)

    def initial_noise(self) -> None:
        """Official randn_progressive: one (B,C,1,h,w) draw per frame in frame order (unit variance, see sampler)."""
        lat, nf, a = self.lat, self.noise_frame, self.s.noise_prior
        beta, std = a / (1 + a * a) ** 0.5, 1 / (1 + a * a) ** 0.5
        prev = self.noise_cpu[:, :, :1]  # scratch (B,C,1,h,w)
        for k in range(lat.shape[2]):
            torch.randn(nf.shape, generator=self.generator, out=nf)
            if k > 0 and a != 0:  # beta * frame_{k-1} + std * draw, in the reference's order
                nf.mul_(std)
                torch.mul(lat[:, :, k - 1:k].to("cpu"), beta, out=prev)
                nf.add_(prev)
            lat[:, :, k:k + 1].copy_(nf)

    def checkpoint(self, c: int) -> Checkpoint:
        """After clip c's last step (before the next clip's restart): copies of the history and RNG state."""
        init_src, overlap = self.history.save()
        return Checkpoint(c, init_src, overlap, self.generator.get_state())

    def restart(self) -> None:
        """A later clip: one fresh draw of the whole clip, then the reuse-and-diffuse restart (history.py)."""
        torch.randn(self.shape, generator=self.generator, out=self.noise_cpu)
        if self.noise is not self.noise_cpu:
            self.noise.copy_(self.noise_cpu)
        self.history.restart(self.lat, self.noise)

    def use_clip_prompt(self, c: int) -> None:
        """Before clip c's first step: with per-clip prompts the UNet reads clip c's context (a view, no copy); a
        new prompt is blended in over its first steps under prompt_blend (blend_prompt)."""
        self.blend = None
        if self.clip_ctx is not None:
            self.ctx_unet = self.clip_ctx[c]
            if c > 0 and self.clip_ctx[c] is not self.clip_ctx[c - 1] and self.weights[0] < 1:
                self.blend = (self.clip_ctx[c - 1], self.clip_ctx[c])

    def blend_prompt(self, i: int) -> None:
        """Step i of a clip with a new prompt: the UNet reads lerp(previous, own, w_i) from ctx_blend, as the
        reference computes it, then its own context once w_i = 1."""
        w = self.weights[i]
        if w < 1:
            torch.lerp(*self.blend, w, out=self.ctx_blend)  # (2 or 1,77,D)
            self.ctx_unet = self.ctx_blend
            self.rt.unet.new_context()  # the same buffer with new values: drop the cross-attention keys of the last
        else:
            self.ctx_unet, self.blend = self.blend[1], None

    def denoise(self, c: int):
        """Clip c's steps, yielding each step's index once it is done (continuation "fifo": Diagonal.clip)."""
        for i in range(self.s.steps):
            self.step(c, i)
            yield i

    def step(self, c: int, i: int) -> None:
        """Step i of clip c, in place: staged guidance and history, UNet call, guidance combine, DDIM (eta = 0)."""
        if self.blend is not None:
            self.blend_prompt(i)
        self.history.guide_and_record(i, self.lat, c > 0)
        self.predict(i)
        self.combine(i)
        self.update(c, i)

    def predict(self, i: int) -> None:
        """Step i's UNet call on every row of x_in: eps (both halves under guidance, the conditional half alone on
        a guidance-reuse step)."""
        b, lat, x_in, plan = self.b, self.lat, self.x_in, self.plan[i]
        self.ts.copy_(self.rt.ts_table[i, : self.ts.shape[0]])
        if self.cache is not None and i == 0:
            self.cache.feature = None  # each clip stores its own features first
        if self.s.cfg and plan.guidance == "cond_reuse":  # the conditional half only
            x_in[b:].copy_(lat)
            self.unet(plan, x_in[b:], self.ts[b:], self.ctx_unet[b:], self.eps[b:])  # (B,C,F,h,w)
        else:
            x_in[:b].copy_(lat)
            if self.s.cfg:
                x_in[b:].copy_(lat)
            self.unet(plan, x_in, self.ts, self.ctx_unet, self.eps)

    def combine(self, i: int) -> None:
        """Step i's guidance combine of this request's rows of eps into `guided`, with its own guidance scale."""
        g, eps_u, eps_c = self.guided, self.eps_u, self.eps_c
        if self.s.cfg and self.plan[i].guidance == "cond_reuse":  # eps_c + (scale - 1) d_last
            torch.mul(self.d_last, self.gscale_m1, out=g)  # as vidrd.ref.reuse.guided_eps_reuse computes it
            g.add_(eps_c)
        elif self.s.cfg:  # eps_u + scale * (eps_c - eps_u), as the reference computes it
            g.copy_(eps_c)
            g.sub_(eps_u)
            if self.d_last is not None:  # the guidance difference later cond_reuse steps take
                self.d_last.copy_(g)
            g.mul_(self.gscale)
            g.add_(eps_u)
        else:
            g.copy_(eps_c)

    def update(self, c: int, i: int) -> None:
        """Step i's solver update of the latents from the guided prediction, in place (eta = 0)."""
        lat, g, tmp, coef = self.lat, self.guided, self.scratch, self.rt.coef[i]
        if self.s.solver == "dpmpp-2m":
            self.multistep_update(i)
            self.keep_x0(c, i, self.scratch)
        elif self.rt.v_prediction:
            self.ddim_v_update(i)
            self.keep_x0(c, i, self.scratch)
        else:
            torch.mul(g, coef[0], out=tmp)  # x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t)
            lat.sub_(tmp)
            lat.div_(coef[1])
            self.keep_x0(c, i, lat)
            lat.mul_(coef[2])  # x_prev = sqrt(a_prev) x0 + sqrt(1-a_prev) eps
            torch.mul(g, coef[3], out=tmp)
            lat.add_(tmp)

    def keep_x0(self, c: int, i: int, x0: torch.Tensor) -> None:
        """When a preview is due, copy the step's predicted clean latents x0 (B,C,F,h,w) for preview.Previews."""
        if self.previews is not None and self.previews.due(i):
            self.previews.capture(c, i, x0)

    def unet(self, plan, sample, timestep, context, out) -> None:
        """The UNet backend call of a step: the plain call on "full" steps, with the feature cache otherwise."""
        if plan.unet == "full":
            self.rt.unet(sample, timestep, context, out)
        else:
            self.rt.unet(sample, timestep, context, out, self.cache.for_step(plan.unet))

    def ddim_v_update(self, i: int) -> None:
        """DDIM (eta = 0) from a guided v prediction, in place, term by term as vidrd.ref.ddim.DDIM.step."""
        lat, v, x0, tmp, coef = self.lat, self.guided, self.scratch, self.prev_x0, self.rt.coef[i]
        torch.mul(lat, coef[1], out=x0)  # x0 = sqrt(a_t) x - sqrt(1-a_t) v
        torch.mul(v, coef[0], out=tmp)
        x0.sub_(tmp)
        torch.mul(lat, coef[0], out=tmp)  # eps = sqrt(a_t) v + sqrt(1-a_t) x, into v's buffer
        v.mul_(coef[1])
        v.add_(tmp)
        torch.mul(x0, coef[2], out=lat)  # x_prev = sqrt(a_prev) x0 + sqrt(1-a_prev) eps
        torch.mul(v, coef[3], out=tmp)
        lat.add_(tmp)

    def multistep_update(self, i: int) -> None:
        """DPM-Solver++(2M) from the guided noise prediction, in place (vidrd.ref.dpmpp)."""
        lat, g, x0, prev, m = self.lat, self.guided, self.scratch, self.prev_x0, self.rt.mcoef[i]
        if self.rt.v_prediction:
            torch.mul(lat, m[1], out=x0)  # x0 = alpha_i x - sigma_i v
            g.mul_(m[0])
            x0.sub_(g)
        else:
            torch.mul(g, m[0], out=x0)  # sigma_i eps
            torch.sub(lat, x0, out=x0)
            x0.div_(m[1])  # x0 = (x - sigma_i eps) / alpha_i
        if i == 0:  # a new trajectory (every clip restarts at step 0): c_prev is 0, keep the product finite
            prev.copy_(x0)
        lat.mul_(m[2])  # the reference's c_x x + c_x0 x0 + c_prev x0_prev, term by term (no fused multiply-add)
        torch.mul(x0, m[3], out=g)  # the guided prediction is no longer needed
        lat.add_(g)
        torch.mul(prev, m[4], out=g)
        lat.add_(g)
        prev.copy_(x0)

    def handoff(self, latents: torch.Tensor | None = None):
        """After a clip's last step: `latents` (default the clip's; fifo: its window) / scaling factor into the VAE
        input; a CPU copy of them."""
        lat = self.lat if latents is None else latents  # (B,C,F,h,w)
        torch.div(lat, self.rt.model.vae.cfg.scaling_factor, out=self.scratch)
        self.dec_in.copy_(self.scratch)
        ready = None
        if self.rt._decode_stream is not None:
            ready = torch.cuda.Event()
            ready.record()
        return lat.to("cpu", copy=True), ready


def _check_setup(be: Backend, lim: Limits) -> None:
    """A backend with fixed shape ranges (engine profiles, export ranges) must serve the largest request: with
    guidance (text and UNet see N = 2B) or, for engines built without guidance (N = B), without it. Each request is
    checked again with its own guidance setting (Runtime.check)."""
    try:
        be.check_shapes(lim.batch, lim.frames, lim.height, lim.width, guidance=True)
    except ValueError as with_guidance:
        try:
            be.check_shapes(lim.batch, lim.frames, lim.height, lim.width, guidance=False)
        except ValueError:
            raise with_guidance from None


class Runtime:
    """A model's text, UNet and VAE backends plus every buffer the loop needs, for requests up to `limits`."""

    def __init__(self, model, text, unet, vae, limits: Limits = Limits(), device="cpu"):
        self.model, self.text, self.unet, self.vae = model, text, unet, vae
        self.limits, self.device = limits, torch.device(device)
        self.scheduler, self.tokenizer = model.scheduler, model.tokenizer
        prediction = model.config.scheduler.prediction_type
        assert prediction in ("epsilon", "v_prediction"), prediction  # SchedulerConfig admits only these
        self.v_prediction = prediction == "v_prediction"  # the UNet predicts v = sqrt(a) eps - sqrt(1-a) x0
        lim, cfg = limits, model.config
        if lim.height % LATENT_FACTOR or lim.width % LATENT_FACTOR:
            raise ValueError(f"limits height={lim.height}, width={lim.width} must be multiples of {LATENT_FACTOR}")
        check_memory(cfg, lim, text.dtype, unet.dtype, vae.dtype, self.device)  # before the first allocation
        c, h, w = cfg.unet.in_channels, lim.height // LATENT_FACTOR, lim.width // LATENT_FACTOR
        b, f, d = lim.batch, lim.frames, cfg.text.hidden_size
        n = b * c * f * h * w  # one clip of latents
        dev, fp32 = self.device, torch.float32

        def buf(numel, dtype=fp32, device=dev):
            return torch.empty(numel, dtype=dtype, device=device)

        self.ids = torch.zeros(2 * b, 77, dtype=torch.int64, device=dev)  # (2B,77)
        self.ctx = buf(2 * b * 77 * d, text.dtype)  # (2B,77,D) [uncond; cond] as the text backend writes it
        # the UNet's copy of the context when it runs in another dtype than the text encoder
        self.ctx_unet = self.ctx if unet.dtype == text.dtype else buf(2 * b * 77 * d, unet.dtype)
        # (P-1,2,77,D) the contexts of a video's other distinct prompts (per-clip prompts: batch 1), P = video_prompts
        self.ctx_more = buf((lim.video_prompts - 1) * 2 * 77 * d, unet.dtype)
        self.ctx_blend = buf(2 * 77 * d, unet.dtype)  # (2,77,D) a new prompt's context blended in (prompt_blend)
        self.latents = buf(n)  # (B,C,F,h,w) float32 whatever the backend dtype
        self.x_in = buf(2 * n, unet.dtype)  # (2B,C,F,h,w) the guidance-doubled UNet input
        self.eps = buf(2 * n, unet.dtype)  # (2B,C,F,h,w) UNet output
        self.guided = buf(n)  # (B,C,F,h,w) guidance-combined noise prediction
        self.scratch = buf(n)  # (B,C,F,h,w) DDIM temporary
        self.timestep = buf(2 * b)  # (2B,) float32
        self.ts_table = torch.empty(lim.steps, 2 * b, device=dev)  # (T,2B) timestep of every step
        self.coef = torch.empty(lim.steps, 4, device=dev)  # (T,4) DDIM factors of every step
        self.mcoef = torch.empty(lim.steps, 5, device=dev)  # (T,5) DPM-Solver++(2M) factors of every step
        self.prev_x0 = buf(n)  # (B,C,F,h,w) DPM-Solver++(2M): previous data prediction; DDIM-v: a temporary
        self.gscale = torch.empty((), device=dev)  # guidance scale
        self.gscale_m1 = torch.empty((), device=dev)  # guidance scale - 1 (guidance reuse)
        self.job_gscale = torch.empty(b, 2, device=dev)  # (B,2) a batch of jobs: scale, scale - 1 at a job's 1st row
        self.d_last: torch.Tensor | None = None  # (B,C,F,h,w) guidance reuse's eps_c - eps_u: made by prepare
        self.fifo: FifoBuffers | None = None  # continuation "fifo"'s buffers: made by prepare, the first time
        self.history = History(n, b * c * lim.overlap * h * w, lim.steps, f, dev)
        self.noise_cpu = buf(n, device="cpu")  # (B,C,F,h,w) random draws come from a CPU generator (parity)
        self.noise_frame = buf(b * c * h * w, device="cpu")  # (B,C,1,h,w) one frame of the initial noise
        self.noise = self.noise_cpu if dev.type == "cpu" else buf(n)
        self.dec_in = buf(n, vae.dtype)  # (B,C,F,h,w) latents / scaling factor, for the VAE
        self.dec_out = buf(b * f * 3 * lim.height * lim.width, vae.dtype)  # (B,F,3,H,W)
        # (B,F,3,H,W) float32 for the [0,1] and *255 arithmetic: in float16, x*255 rounds (steps of 1/8 above 128)
        # before the truncating uint8 cast and moves values across an integer
        self.dec_f32 = self.dec_out if vae.dtype == fp32 else buf(b * f * 3 * lim.height * lim.width)
        self.frames_u8 = torch.empty(b * f * lim.height * lim.width * 3, dtype=torch.uint8)  # (B,F,H,W,3) host
        for be in (text, unet, vae):  # engines with fixed profiles say now if the largest request cannot run
            assert isinstance(be, Backend), f"{type(be).__name__} does not implement runtime.backends.Backend"
            _check_setup(be, lim)
        self._lock = threading.Lock()  # guards the owner: which generation may use the buffers
        self._owner, self._computing = None, False
        self._inflight: Future | None = None  # the last clip submitted to the decode thread
        # On a GPU the VAE decodes a clip on its own thread and CUDA stream while the next clip denoises. On the CPU
        # both would share the same cores (and OpenMP pools spin against each other), so decoding is inline there.
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="vidrd-decode") if dev.type == "cuda" else None
        self._decode_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.previews = None  # preview.Previews (sized from the same limits), set by a caller that wants previews

    # ------------------------------------------------------------------------------------------------ checks

    def check(self, request: Request) -> tuple[list[str], list[str], SamplerSettings]:
        """Validate a request against the sampler rules and this runtime's buffers, before any work."""
        s = request.settings
        check_seed(request.seed)
        prompts, negatives = check_prompts(self.tokenizer, list(request.prompts),
                                           None if request.negative_prompts is None else list(request.negative_prompts))
        per_clip = check_clip_prompts(self.tokenizer, prompts, request.clip_prompts, s.clips)
        # limits, then the schedule: the order the service checks them in (api.to_spec), so both give one message
        try:
            self.limits.check(s, len(prompts), max(1, len(set(per_clip))))
        except ValueError as e:
            raise ValueError(f"{e} of this runtime (its buffers are sized from its limits); set up the runtime with "
                             "larger limits") from None
        s.check_model(self.model)
        for be in (self.text, self.unet, self.vae):  # exported graphs and engines: the request must fit their ranges
            be.check_shapes(len(prompts), s.frames, s.height, s.width, guidance=s.cfg, temporal=s.temporal_decode)
        self.check_reuse(len(prompts), s)
        if s.continuation == "fifo":
            self.check_fifo(request)
        if request.resume is not None:
            self.check_resume(request.resume, len(prompts), s)
        return prompts, negatives, s

    def check_resume(self, r: Checkpoint, batch: int, s: SamplerSettings) -> None:
        """ValueError unless checkpoint `r` fits a request of `batch` prompts at `s` (its clip, shapes, RNG)."""
        c, h, w = self.model.config.unet.in_channels, s.height // LATENT_FACTOR, s.width // LATENT_FACTOR
        o = s.overlap if s.clips > 1 else 0
        want = {"init_src": (batch, c, s.frames, h, w), "overlap": (s.steps, batch, c, o, h, w)}
        if not (isinstance(r.clip, int) and 0 <= r.clip < s.clips):
            raise ValueError(f"resume.clip={r.clip!r} must be a clip of the request (0..{s.clips - 1})")
        for name, shape in want.items():
            t = getattr(r, name)
            if tuple(t.shape) != shape or t.dtype != torch.float32:
                raise ValueError(f"resume.{name} is {t.dtype} {tuple(t.shape)}; this request needs float32 {shape}")
        if r.rng.dtype != torch.uint8 or r.rng.shape != torch.Generator().get_state().shape:
            raise ValueError(f"resume.rng is {r.rng.dtype} {tuple(r.rng.shape)}, not a CPU generator's state")

    def check_fifo(self, request: Request) -> None:
        """Diagonal denoising needs a UNet that takes a timestep per frame, and its queue spans clips, so it has no
        clip-boundary checkpoint to resume from. ValueError naming what is refused."""
        if not self.unet.frame_timesteps:
            raise ValueError("continuation='fifo' runs the UNet with a timestep per frame, which exported graphs "
                             f"({type(self.unet).__name__}: onnxruntime, tensorrt, aoti) do not take: use the torch "
                             "UNet (--unet-backend torch) or another continuation")
        if request.checkpoints or request.resume is not None:
            raise ValueError("continuation='fifo' has no clip-boundary checkpoints (its queue of frames spans "
                             "clips), so it cannot be checkpointed or resumed: use another continuation")

    def check_reuse(self, batch: int, s: SamplerSettings) -> None:
        """The UNet backend must run what the request's reuse plan asks: a FeatureCache for feature reuse, and the
        conditional half alone (batch B, not 2B) for guidance reuse. ValueError naming the setting otherwise."""
        plan = s.plan()
        if any(p.unet != "full" for p in plan) and not self.unet.feature_cache:
            raise ValueError(f"cache_interval={s.cache_interval} (UNet feature reuse, --cache-interval) needs the "
                             "eager torch UNet: exported graphs (onnxruntime, tensorrt) and --compile take no feature "
                             "cache; use cache_interval 1 or the torch UNet without --compile")
        if s.cfg and any(p.guidance == "cond_reuse" for p in plan):
            try:  # the conditional branch alone is a call without guidance's doubled batch
                self.unet.check_shapes(batch, s.frames, s.height, s.width, guidance=False)
            except ValueError as e:
                raise ValueError(f"guidance_reuse_after={s.guidance_reuse_after} (--guidance-reuse-after) runs the "
                                 f"UNet on the conditional half alone (batch {batch}), which this UNet cannot: {e}; "
                                 "use guidance_reuse_after 1") from None

    # -------------------------------------------------------------------------------------------- generation

    def generate(self, request: Request, on_step: Callable[[int, int], None] | None = None,
                 on_preview: Callable[[int, int, np.ndarray], None] | None = None) -> Iterator[Clip]:
        """Validate `request` now (ValueError before any generator exists), then return an iterator that yields each
        clip as soon as it is decoded. Closing it, or on_step raising Cancelled, stops it. on_preview(clip, steps
        done, frames (B,F,H,W,3) uint8) gets the tiny decoder's frames of x0 every `previews.every` steps, on the
        preview thread (needs `self.previews`).

        One generation at a time owns the buffers. A generation waiting at a yield (its caller paused, or dropped it
        without close()) is superseded by the next one: resuming it raises Superseded. A generation that is
        computing (in another thread) makes the next one raise RuntimeError."""
        prompts, negatives, s = self.check(request)
        if on_preview is not None and self.previews is None:
            raise ValueError("on_preview needs a tiny decoder: set Runtime.previews to a preview.Previews")
        return self._stream(prompts, negatives, s, request, on_step, on_preview)

    def _stream(self, prompts, negatives, s, request, on_step, on_preview=None):
        token = object()
        self._claim(token)
        try:
            job = self.prepare(prompts, negatives, s, request)
            if on_preview is not None:
                self.previews.begin(job.shape, on_preview)
                job.previews = self.previews
            clips = self._run(job, on_step)
            for clip in clips:
                self._pause(token)
                yield clip
                self._resume(token, clips)
        finally:
            self._release(token)

    def _claim(self, token) -> None:
        with self._lock:
            if self._computing:
                raise RuntimeError("this runtime is already generating; one request at a time per runtime")
            self._owner, self._computing = token, True
        if self._inflight is not None:  # a superseded generation's clip may still be decoding into our buffers
            self._inflight.exception()
            self._inflight = None

    def _pause(self, token) -> None:
        with self._lock:
            if self._owner is token:
                self._computing = False

    def _resume(self, token, clips) -> None:
        with self._lock:
            if self._owner is token:
                self._computing = True
                return
        clips.close()
        raise Superseded("another generation started on this runtime while this one waited; its buffers are gone")

    def _release(self, token) -> None:
        with self._lock:
            if self._owner is token:
                self._owner, self._computing = None, False

    @torch.no_grad()
    def prepare(self, prompts, negatives, s: SamplerSettings, request: Request) -> Generation:
        """Before step 0: bind views, encode the prompts, fill the per-step tables, draw the initial noise."""
        self.reserve(s)
        job = Generation(self, len(prompts), s, request)
        per_clip = check_clip_prompts(self.tokenizer, prompts, request.clip_prompts, s.clips, warn=False)
        more = [p for p in dict.fromkeys(per_clip) if p != prompts[0]]  # each distinct prompt encoded once
        nb, d = job.ctx.shape[0], job.ctx.shape[2]
        bank = [self.ctx_more[j * nb * 77 * d:(j + 1) * nb * 77 * d].view(nb, 77, d) for j in range(len(more))]
        for p, ctx in zip(more, bank):  # before the first prompt's: ctx_unet may be ctx itself
            job.ids.copy_(tokenize(self.tokenizer, negatives + [p] if s.cfg else [p]))
            self.text(job.ids, job.ctx)
            ctx.copy_(job.ctx)  # (2 or 1,77,D)
        if per_clip:
            job.clip_ctx = [job.ctx_unet if p == prompts[0] else bank[more.index(p)] for p in per_clip]
            job.weights, job.ctx_blend = s.prompt_weights(), self.ctx_blend[: nb * 77 * d].view(nb, 77, d)
        self.encode(job, negatives + prompts if s.cfg else prompts)  # [uncond; cond] under guidance
        self.history.start(job.shape, s, self.scheduler)
        self.tables(s)
        self.gscale.fill_(s.guidance_scale)
        self.gscale_m1.fill_(s.guidance_scale - 1.0)  # rounded to float32 once, as the reference's python scalar
        if s.continuation == "fifo":  # its buffers once, then its tables (it rewrites the first rows of ts/coef)
            if self.fifo is None:
                self.fifo = FifoBuffers(self)
            job.diagonal = Diagonal(self, job, self.fifo)
        if request.resume is None:
            job.initial_noise()
        else:  # the next clip restarts from these (Generation.restart)
            self.history.load(request.resume.init_src, request.resume.overlap)
            job.generator.set_state(request.resume.rng)
        return job

    def reserve(self, s: SamplerSettings) -> None:
        """Buffers only some requests need, made the first time one does (before its step 0)."""
        if self.d_last is None and any(p.guidance == "cond_reuse" for p in s.plan()):
            self.d_last = torch.empty_like(self.latents)  # (B,C,F,h,w) of the limits: once, for guidance reuse

    def encode(self, job: Generation, texts: list[str]) -> None:
        """The text backend's context of `texts` (one per row of the UNet's input) into job.ctx and ctx_unet."""
        job.ids.copy_(tokenize(self.tokenizer, texts))
        self.text(job.ids, job.ctx)
        if job.ctx_unet is not job.ctx:
            job.ctx_unet.copy_(job.ctx)
        self.unet.new_context()

    def tables(self, s: SamplerSettings) -> None:
        """The per-step tables of `s`'s schedule: timesteps, DDIM and DPM-Solver++(2M) factors."""
        timesteps = self.scheduler.timesteps(s.steps, s.spacing).tolist()
        rows = []
        for t in timesteps:  # DDIM factors, from the same python floats as the reference's step
            a, ap = self.scheduler.alphas(int(t), s.steps, s.spacing)
            rows.append([(1 - a) ** 0.5, a ** 0.5, ap ** 0.5, (1 - ap) ** 0.5])
        self.coef[: s.steps].copy_(torch.tensor(rows, dtype=torch.float32))
        if s.solver == "dpmpp-2m":  # x0 = (x - sigma eps) / alpha; x' = c_x x + c_x0 x0 + c_prev x0_prev
            dpm = DPMSolverPP2M(self.model.config.scheduler, s.steps, s.spacing)
            mrows = []
            for i in range(s.steps):
                c_x, c_x0, c_prev, alpha = dpm.coefficients(i)
                mrows.append([dpm.sigma[i], alpha, c_x, c_x0, c_prev])
            self.mcoef[: s.steps].copy_(torch.tensor(mrows, dtype=torch.float32))
        table = torch.tensor(timesteps, dtype=torch.float32)[:, None]  # (T,1)
        self.ts_table[: s.steps].copy_(table.expand(-1, 2 * self.limits.batch))

    def _run(self, job: Generation, on_step):
        s, pending = job.s, None
        first = 0 if job.request.resume is None else job.request.resume.clip + 1
        try:
            for c in range(first, s.clips):
                if c > 0 and job.diagonal is None:
                    job.restart()
                job.use_clip_prompt(c)
                for i in job.denoise(c) if job.diagonal is None else job.diagonal.clip(c):
                    if on_step is not None:
                        on_step(c, i)
                    if pending is not None and pending.done():
                        yield pending.result()
                        pending = None
                if pending is not None:  # the previous clip's decode must finish before dec_in is reused
                    yield pending.result()
                handoff = job.handoff(None if job.diagonal is None else job.diagonal.window)
                saved = job.checkpoint(c) if job.request.checkpoints else None
                if self._decoder is not None:
                    pending = self._inflight = self._decoder.submit(self._decode, job, c, *handoff, saved)
                else:
                    clip = self._decode(job, c, *handoff, saved)  # first: a failed decode leaves no unset Future
                    pending = Future()
                    pending.set_result(clip)
            if pending is not None:  # None: resumed after the last clip, nothing left
                yield pending.result()
            pending = None
        finally:
            if pending is not None:  # cancelled: let the decode finish so the buffers are free for the next request
                pending.exception()
            if job.previews is not None:  # the last preview arrives before the generation ends
                job.previews.flush()

    def _decode(self, job: Generation, c: int, latents_cpu, ready, saved: Checkpoint | None = None) -> Clip:
        """VAE backend, then [0,1] and uint8 (truncating, as the official save); runs on the decode thread."""
        s, ctx = job.s, contextlib.nullcontext()
        if self._decode_stream is not None:
            self._decode_stream.wait_event(ready)
            ctx = torch.cuda.stream(self._decode_stream)
        with ctx, torch.no_grad():
            out = job.dec_f32
            self.vae(job.dec_in, job.dec_out, s.temporal_decode)
            if out is not job.dec_out:
                out.copy_(job.dec_out)
            if not bool(torch.isfinite(out).all()):
                raise NonFiniteOutput(
                    f"the VAE decoder ({job.dec_out.dtype}) produced NaN or inf in clip {c}: the frames would be "
                    "black. The SD VAE overflows in float16; decode in float32 or bfloat16 (--vae-dtype fp32 or bf16"
                    ", or an fp32 export/engine for the VAE)")
            out.div_(2).add_(0.5).clamp_(0, 1)
            video = None
            if job.request.float_video:
                video = out.permute(0, 2, 1, 3, 4).to("cpu", torch.float32, copy=True)  # (B,3,F,H,W)
            out.mul_(255)
            job.u8.copy_(out.permute(0, 1, 3, 4, 2))  # (B,F,H,W,3): float -> uint8 truncates
        first = s.overlap if (c > 0 and s.assembly == "trim") else 0
        frames = job.u8[:, first:].numpy().copy()
        return Clip(c, frames, latents_cpu, None if video is None else video[:, :, first:], saved)

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)

