"""The reference long-video sampler: the official VidRD pipeline loop (SPEC §3), readable rather than fast."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields, replace

import torch

from .config import LATENT_FACTOR
from .ddim import SPACINGS
from .dpmpp import DPMSolverPP2M
from .reuse import FeatureCache, ReuseSettings, StepPlan, guided_eps_reuse, setting
from .text import dropped_words, tokenize

ASSEMBLIES = ("official", "trim")
# Upper bound of guidance_scale, noise_recycle and noise_prior: far above any useful value (official: 10, 4, 0), and
# low enough that guidance times the UNet's output stays finite in float32 and bf16 (1e300 overflowed mid-job).
MAX_WEIGHT = 1000.0
CONTINUATIONS = ("official", "forward", "fifo")
RECYCLE_ORDERS = ("index", "shifted")
SOLVERS = ("ddim", "dpmpp-2m")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class GenerationSettings:
    """What to generate and how to sample it, apart from the reuse options (vidrd.ref.reuse.ReuseSettings)."""
    height: int = setting(256, "frame height in pixels, a multiple of 8")
    width: int = setting(256, "frame width in pixels, a multiple of 8")
    frames: int = setting(8, "frames per clip")
    steps: int = setting(50, "denoising steps per clip")
    clips: int = setting(1, "clips in total, 1 = no extension")
    overlap: int = setting(4, "frames shared with the previous clip")
    noise_recycle: float = setting(4.0, "weight of the previous clip's reversed noise in a new clip's noise")
    denoise_guidance: float = setting(0.4, "fraction of steps during which overlap frames are pinned (staged "
                                       "guidance)")
    guidance_scale: float = setting(10.0, "classifier-free guidance scale (<= 1: no guidance)")
    noise_prior: float = setting(0.0, "progressive noise prior (frame correlation); unit variance per frame")
    temporal_decode: bool = setting(False, "decode with the temporal VAE layers (paper) instead of per frame "
                                     "(official code)")
    assembly: str = setting("official", "official: every clip whole; trim: later clips without their overlap "
                             "frames", ASSEMBLIES)
    continuation: str = setting("official", "official: a new clip replays the previous clip's end backwards (the "
                                 "paper's reversed noise and overlap); forward: it continues in the same frame order "
                                 "(use with --assembly trim); fifo: diagonal denoising, a queue of frames at "
                                 "increasing noise levels, one frame out per steps // frames UNet calls (FIFO-"
                                 "Diffusion; torch UNet only)", CONTINUATIONS)
    recycle_order: str = setting("index", "forward continuation: the previous clip's noise a later clip's frame j "
                                  "recycles: index (frame j's) or shifted (frame (j + F - O) mod F's: the noise "
                                  "moves on with the clip, as its overlap frames do)", RECYCLE_ORDERS)
    solver: str = setting("ddim", "ddim (official) or dpmpp-2m (DPM-Solver++(2M): similar quality in fewer steps)",
                           SOLVERS)
    spacing: str = setting("leading", "timestep spacing: leading (official: the first step at t = 1000 - 1000/steps + "
                            "1) or trailing (the first step at t = 999, the initial noise's level: better colour in "
                            "few steps)", SPACINGS)
    prompt_blend: float = setting(0.0, "a prompt per clip: the fraction of a new prompt's first steps over which its "
                                   "text context moves linearly from the previous clip's prompt to its own (0: a "
                                   "switch at the clip boundary)")


@dataclass(frozen=True)
class SamplerSettings(ReuseSettings, GenerationSettings):
    """Every setting of one generation, with the official defaults (configs/example.yaml + evaluator, SPEC §3.1):
    GenerationSettings' fields, then ReuseSettings' (whose defaults reuse nothing: the official loop).

    The one description of a generation: `vidrd generate`'s flags, the service's request fields and the Ray
    deployment's job specs are made from these fields (name, default, help, choices), so a new setting is a new
    field in one of the two and its use in the samplers. Construction validates (ValueError naming the first bad
    setting).
    """

    def __post_init__(self):
        """Raise ValueError naming the first bad setting; weights become floats. Nothing expensive has run yet."""
        for name in ("height", "width"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0 or v % LATENT_FACTOR:
                raise ValueError(f"{name}={v!r} must be a positive multiple of {LATENT_FACTOR} (the VAE's latent "
                                 "factor)")
        for name in ("frames", "steps", "clips"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if not _is_int(self.overlap) or self.overlap < 0 or (self.clips > 1 and self.overlap >= self.frames):
            # a single clip never reads the overlap, so only later clips require overlap < frames
            raise ValueError(f"overlap={self.overlap!r} must be an integer with 0 <= overlap < frames={self.frames}")
        if not (_is_number(self.denoise_guidance) and 0.0 <= self.denoise_guidance <= 1.0):
            raise ValueError(f"denoise_guidance={self.denoise_guidance!r} must be between 0 and 1")
        if not (_is_number(self.prompt_blend) and 0.0 <= self.prompt_blend <= 1.0):
            raise ValueError(f"prompt_blend={self.prompt_blend!r} must be between 0 and 1")
        for name in ("noise_recycle", "noise_prior", "guidance_scale"):
            v = getattr(self, name)
            if not (_is_number(v) and 0 <= v <= MAX_WEIGHT):  # also refuses NaN and inf
                raise ValueError(f"{name}={v!r} must be a number between 0 and {MAX_WEIGHT:g}")
        if self.recycle_order == "shifted" and self.continuation != "forward":
            raise ValueError(f"recycle_order={self.recycle_order!r} needs continuation='forward' (the official "
                             "continuation recycles the reversed noise)")
        if self.continuation == "fifo":
            self.check_fifo()
        if not isinstance(self.temporal_decode, bool):
            raise ValueError(f"temporal_decode={self.temporal_decode!r} must be True or False")
        self.reuse().validate()  # messages name the value: cache_interval=0 must be ...
        for f in fields(self):
            choices, v = f.metadata["choices"], getattr(self, f.name)
            if choices is not None and v not in choices:
                raise ValueError(f"{f.name}={v!r} must be one of {choices}")
            if isinstance(f.default, float):
                object.__setattr__(self, f.name, float(v))

    def check_fifo(self) -> None:
        """ValueError naming the setting that diagonal denoising (vidrd_ref/fifo.py) cannot take."""
        if self.steps < self.frames:
            raise ValueError(f"steps={self.steps} must be at least frames={self.frames} with continuation='fifo' (the "
                             "queue's frames are steps // frames levels apart)")
        if self.solver != "ddim":
            raise ValueError(f"solver={self.solver!r} does not run with continuation='fifo' (its frames are at "
                             "different steps; a multistep history is per step): use solver 'ddim'")
        if any(p.unet != "full" or p.guidance != "both" for p in self.plan()):
            raise ValueError(f"cache_interval={self.cache_interval}, guidance_reuse_after={self.guidance_reuse_after}"
                             ": feature and guidance reuse are per step of a clip, not of the diagonal queue; leave "
                             "them off with continuation='fifo'")

    def check_model(self, model) -> None:
        """ValueError unless `model`'s scheduler has at least `steps` training timesteps and, with feature reuse,
        its UNet has `cache_depth` up blocks."""
        model.scheduler.check_steps(self.steps, self.spacing)  # "steps=N ..." when the schedule has no room
        n = len(model.config.unet.up_block_types)
        if self.cache_interval > 1 and self.cache_depth > n:
            raise ValueError(f"cache_depth={self.cache_depth} exceeds the UNet's {n} up blocks")

    def prompt_weights(self) -> list[float]:
        """Per step of a clip whose prompt differs from the previous clip's: the weight of its own prompt's context
        in lerp(previous, own, w): (i + 1) / (n + 1) for the first n = round(prompt_blend * steps) steps, then 1."""
        n = round(self.prompt_blend * self.steps)
        return [(i + 1) / (n + 1) if i < n else 1.0 for i in range(self.steps)]

    def reuse(self) -> ReuseSettings:
        """The feature- and guidance-reuse part of these settings."""
        return ReuseSettings(**{f.name: getattr(self, f.name) for f in fields(ReuseSettings)})

    def plan(self) -> list[StepPlan]:
        """What each step of every clip runs (the same plan per clip): all "full" + "both" at the defaults. Without
        guidance there is one branch only, so guidance reuse is moot and plans nothing."""
        r = self.reuse()
        if not self.cfg:
            r = replace(r, guidance_reuse_after=1.0, guidance_refresh=0)
        return r.plan(self.steps)

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance runs only when guidance_scale > 1 (official do_classifier_free_guidance)."""
        return self.guidance_scale > 1.0

    def output_frames(self) -> int:
        trimmed = self.overlap if self.assembly == "trim" else 0
        return self.frames + (self.clips - 1) * (self.frames - trimmed)

    def source_frames(self) -> list[int]:
        """For each frame j of a later clip, the previous clip's frame it reuses (its noise, and for j < overlap its
        latents during staged guidance).

        official: F-1-j for every j, the frame-level reversal of SPEC §3.5 (new clips start by replaying the previous
        clip's end backwards). forward: F-O+j for the overlap frames, so a new clip starts where the previous one ends
        in the same order, and j itself for the others (their noise recycled without reversal). forward with
        recycle_order "shifted": (j + F - O) mod F for every j, the previous clip's noise moved on by the clip's
        stride F - O as its overlap frames are; the frames past the previous clip's end (j >= O) wrap round to its
        first frames' noise (a rolling window over F noise frames: no two frames of a clip share a source).
        """
        f, o = self.frames, min(self.overlap, self.frames)  # only a single clip may have overlap >= frames
        if self.continuation == "official":
            return list(range(f - 1, -1, -1))
        if self.recycle_order == "shifted":
            return [(j + f - o) % f for j in range(f)]
        return [f - o + j for j in range(o)] + list(range(o, f))

    def guided(self, i: int, k: int) -> bool:
        """Staged guidance, official rule: overlap frame k is pinned at step i while i < (O-k)*(T/O)*g (python float
        order)."""
        return i < (self.overlap - k) * (self.steps / self.overlap) * self.denoise_guidance

    def pinned(self, scheduler) -> list[int]:
        """Staged guidance per step: at step i overlap frames 0..K_i-1 are pinned (K_i; a window shrinks with the
        frame index). Leading spacing: the official rule (`guided`). Another spacing keeps the official windows'
        noise levels: frame k is pinned at the steps whose timestep lies above the first timestep the leading
        schedule of as many steps leaves it free at (trailing, 10 steps, g=0.4: frame 0 at 999..599, where leading
        pins 901..601 and frees it at 501)."""
        o, t = self.overlap, self.steps
        if self.spacing == "leading":
            return [sum(self.guided(i, k) for k in range(o)) for i in range(t)]
        lead, own = scheduler.levels(t), scheduler.timesteps(t, self.spacing).tolist()
        free = []  # per frame: the first leading timestep it is not pinned at (never pinned: above every timestep)
        for k in range(o):
            n = sum(self.guided(i, k) for i in range(t))  # the official window: steps 0..n-1
            free.append(math.inf if n == 0 else lead[n] if n < t else -1)
        return [sum(ts > f for f in free) for ts in own]


def check_text(name: str, text: str) -> None:
    """ValueError unless `text` is valid Unicode text: a lone surrogate (JSON "\\ud800", or a non-UTF-8 byte in a
    command-line argument) cannot be tokenized, written to JSON or printed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name}={shorten(repr(text))} is not valid text: character {e.start} is {text[e.start]!r}, a lone "
                         "surrogate (invalid UTF-8)") from None


SEED_MIN, SEED_MAX = 0, 2**63 - 1  # every seed torch.Generator.manual_seed takes as given, in every front end


def check_seed(seed, name: str = "seed") -> None:
    """ValueError unless `seed` is an integer in [0, 2^63 - 1] (one range for the CLI, the service and the API)."""
    if not _is_int(seed) or not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"{name}={shorten(repr(seed))} must be an integer between {SEED_MIN} and {SEED_MAX}")


def check_prompt(name: str, text: str) -> None:
    """ValueError unless `text` is a usable prompt: valid text (check_text) with at least one non-space character."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{name}={shorten(repr(text))} is empty; give a prompt with some words")
    check_text(name, text)


def shorten(text: str, most: int = 80) -> str:
    """`text` cut to at most `most` characters (an ellipsis and the count of the rest), for messages that quote
    user input."""
    return text if len(text) <= most else f"{text[:most]}... ({len(text) - most} more characters)"


def check_prompts(tokenizer, prompts, negative_prompts, *, warn: bool = True) -> tuple[list[str], list[str]]:
    """Validated prompt lists; negatives default to '' (official pipeline); warns about truncated prompts."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts={prompts!r} must be a non-empty list of strings")
    if negative_prompts is None:
        negative_prompts = [""] * len(prompts)
    elif isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * len(prompts)
    negative_prompts = list(negative_prompts)
    if len(negative_prompts) != len(prompts) or not all(isinstance(p, str) for p in negative_prompts):
        raise ValueError(f"negative_prompts has {len(negative_prompts)} entries for {len(prompts)} prompts; "
                         "give one string per prompt")
    for i, p in enumerate(prompts):
        check_prompt(f"prompts[{i}]", p)
    for i, p in enumerate(negative_prompts):
        check_text(f"negative_prompts[{i}]", p)
    for p in prompts + negative_prompts if warn else ():
        lost = dropped_words(tokenizer, p)
        if lost:
            warnings.warn(f"prompt longer than 77 tokens was truncated; dropped: {shorten(repr(lost))}", stacklevel=3)
    return prompts, negative_prompts


def check_clip_prompts(tokenizer, prompts: list[str], clip_prompts, clips: int, *, warn: bool = True) -> list[str]:
    """The prompt of every clip (len clips) of a one-prompt request with per-clip prompts: clip k+1 follows
    clip_prompts[k-1], the last one holds for the clips after it; [] without them (None or empty). ValueError naming
    the bad value: a batch of prompts, a prompt that is not text or is empty, more prompts than clips."""
    if clip_prompts is None:
        return []
    if isinstance(clip_prompts, str) or not all(isinstance(p, str) for p in clip_prompts):
        raise ValueError(f"clip_prompts={shorten(repr(clip_prompts))} must be a list of strings, the prompts of "
                         "clips 2, 3, ...")
    clip_prompts = list(clip_prompts)
    if not clip_prompts:
        return []
    if len(prompts) != 1:
        raise ValueError(f"clip_prompts needs a single prompt, not a batch of {len(prompts)} (prompts): per-clip "
                         "prompts describe one video")
    for i, p in enumerate(clip_prompts):
        check_prompt(f"clip_prompts[{i}]", p)
    if 1 + len(clip_prompts) > clips:
        raise ValueError(f"clip_prompts has {len(clip_prompts)} prompts, so {1 + len(clip_prompts)} with the first, "
                         f"for clips={clips}; give at most clips - 1 = {clips - 1}, or more clips")
    for p in clip_prompts if warn else ():
        lost = dropped_words(tokenizer, p)
        if lost:
            warnings.warn(f"prompt longer than 77 tokens was truncated; dropped: {shorten(repr(lost))}", stacklevel=3)
    return [prompts[0], *clip_prompts] + [clip_prompts[-1]] * (clips - 1 - len(clip_prompts))


@torch.no_grad()
def encode_prompts(model, prompts: list[str], negative_prompts: list[str], cfg: bool) -> torch.Tensor:
    """Text embeddings once per call: [uncond; cond] (2B,77,D) under guidance, else cond (B,77,D)."""
    texts = negative_prompts + prompts if cfg else prompts
    ids = tokenize(model.tokenizer, texts).to(model.text_encoder.text_model.embeddings.position_ids.device)
    return model.text_encoder(ids)


def initial_noise(shape, generator, noise_prior: float, dtype, device) -> torch.Tensor:
    """Official randn_progressive: one (B,C,1,h,w) draw per frame, in frame order. -> (B,C,F,h,w).

    frame_k = beta * frame_{k-1} + N(0, s^2) with beta = a/sqrt(1+a^2). The official helper passes the variance
    1/(1+a^2) as the std (SPEC §4.7), so frames lose unit variance for a > 0; we use s = 1/sqrt(1+a^2), which keeps
    every frame at unit variance. At the default a = 0 both are the same iid N(0,1) draws.
    """
    b, c, f, h, w = shape
    a = noise_prior
    beta, std = a / math.sqrt(1 + a * a), 1 / math.sqrt(1 + a * a)
    frames = [torch.randn((b, c, 1, h, w), generator=generator, dtype=torch.float32)]
    for _ in range(1, f):
        frames.append(beta * frames[-1] + std * torch.randn((b, c, 1, h, w), generator=generator, dtype=torch.float32))
    return torch.cat(frames, dim=2).to(device=device, dtype=dtype)


@torch.no_grad()
def decode(model, latents: torch.Tensor, temporal: bool) -> torch.Tensor:
    """Official decode_latents: latents (B,C,F,h,w) -> video (B,3,F,H,W) float32 in [0,1]."""
    b, c, f, h, w = latents.shape
    z = (latents / model.vae.cfg.scaling_factor).transpose(1, 2).reshape(b * f, c, h, w)  # ((B F),C,h,w)
    x = model.vae.decode(z.to(model.vae.post_quant_conv.weight.dtype), num_frames=f if temporal else 1)
    x = x.view(b, f, *x.shape[1:]).transpose(1, 2)  # (B,3,F,H,W)
    return (x / 2 + 0.5).clamp(0, 1).float()


@torch.no_grad()
def generate(model, prompts, negative_prompts=None, settings: SamplerSettings = SamplerSettings(), generator=None, *,
             callback=None, warn: bool = True, clip_prompts=None):
    """Long video by reuse and diffuse. -> video (B,3,frames_out,H,W) in [0,1], latents (clips,B,C,F,h,w).

    Mirrors the official SDVideoPipeline.__call__ (SPEC §3.5) step for step, including its random draws, so one
    seed gives the official video. `callback(clip, step)` is called after every denoising step; warn=False: the
    caller has warned about truncated prompts already. With reuse settings
    each step follows `settings.plan()`: "store"/"reuse" steps run the UNet with a FeatureCache, and
    "cond_reuse" steps run it on the conditional half only, guided by the last measured eps_c - eps_u.
    clip_prompts: the prompts of clips 2, 3, ... of a one-prompt request (check_clip_prompts); each distinct prompt is
    encoded once, and a clip denoises with its own prompt's context from its first step (its overlap frames pinned
    to the previous clip's as usual).
    """
    s = settings
    s.check_model(model)
    prompts, negative_prompts = check_prompts(model.tokenizer, prompts, negative_prompts, warn=warn)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator on {generator.device}: the official noise order needs a CPU torch.Generator")

    per_clip = check_clip_prompts(model.tokenizer, prompts, clip_prompts, s.clips, warn=warn)
    weights = s.prompt_weights()  # per step of a clip with a new prompt: its own context's weight
    ctx = encode_prompts(model, prompts, negative_prompts, s.cfg)  # (2B or B,77,D)
    contexts = {p: ctx if p == prompts[0] else encode_prompts(model, [p], negative_prompts, s.cfg)
                for p in dict.fromkeys(per_clip)}  # distinct prompt -> (2 or 1,77,D)
    if s.continuation == "fifo":  # diagonal denoising: its own loop (imported here: fifo.py builds on this module)
        from .fifo import generate as generate_fifo
        return generate_fifo(model, [contexts[p] for p in per_clip] if per_clip else [ctx] * s.clips, s, generator,
                             callback)
    dtype, device = ctx.dtype, ctx.device
    b, f, o, r = len(prompts), s.frames, s.overlap, s.noise_recycle
    shape = (b, model.unet.cfg.in_channels, f, s.height // LATENT_FACTOR, s.width // LATENT_FACTOR)  # (B,C,F,h,w)
    timesteps = model.scheduler.timesteps(s.steps, s.spacing).tolist()
    multistep = DPMSolverPP2M(model.config.scheduler, s.steps, s.spacing) if s.solver == "dpmpp-2m" else None
    ab = [model.scheduler.alphas(t, s.steps, s.spacing) for t in timesteps]  # (alpha_bar_t, alpha_bar_prev) per step

    latents = initial_noise(shape, generator, s.noise_prior, dtype, device)
    src = torch.tensor(s.source_frames(), device=device)  # (F,) previous-clip frame reused by each frame
    plan = s.plan()  # per step of every clip: unet full/store/reuse, guidance both/cond_reuse
    pinned = s.pinned(model.scheduler)  # per step: overlap frames 0..pinned[i]-1 follow the previous clip
    cache = FeatureCache(depth=s.cache_depth)
    hist: dict[int, torch.Tensor] = {}
    videos, finals = [], []
    for c in range(s.clips):
        cache.feature, d_last = None, None  # each clip measures its own features and guidance difference
        if per_clip:
            ctx = contexts[per_clip[c]]
        turn = bool(per_clip) and c > 0 and per_clip[c] != per_clip[c - 1]  # a new prompt: blended in (prompt_blend)
        if c > 0:
            latents = torch.empty_like(latents)  # the previous clip's final latents stay as returned
            # (a) overlap frames restart from the previous clip's reversed initial latents
            latents[:, :, :o] = hist[0][:, :, :o]
            # (b) noise recycle: the other frames mix that reversed noise with fresh noise (variance preserving);
            # the fresh draw covers the whole clip although only frames o.. are used (RNG parity, SPEC §4.20)
            fresh = torch.randn(shape, generator=generator, dtype=torch.float32) / math.sqrt(1 + r * r)
            mixed = r / math.sqrt(1 + r * r) * hist[0][:, :, o:] + fresh[:, :, o:].to(device)
            latents[:, :, o:] = mixed.to(dtype)
        for i, t in enumerate(timesteps):
            if turn:
                own, w = contexts[per_clip[c]], weights[i]
                ctx = own if w == 1 else torch.lerp(contexts[per_clip[c - 1]], own, w)  # (2 or 1,77,D)
            if c > 0:
                for k in range(pinned[i]):  # staged guidance: pin overlap frame k to the previous clip, same step
                    latents[:, :, k] = hist[i][:, :, k]
            hist[i] = latents.index_select(2, src)  # official: frame-reversed; after the overrides, before the UNet
            step_cache = cache.for_step(plan[i].unet)  # None on "full" steps: the plain call, as without reuse
            kw = {} if step_cache is None else {"cache": step_cache}
            if s.cfg and plan[i].guidance == "cond_reuse":  # the conditional branch only: batch B, context ctx[B:]
                eps = guided_eps_reuse(model.unet(latents, t, ctx[b:], **kw), d_last, s.guidance_scale)
            else:
                x_in = torch.cat([latents, latents]) if s.cfg else latents  # (2B or B,C,F,h,w)
                eps = model.unet(x_in, t, ctx, **kw)
                if s.cfg:
                    eps_u, eps_c = eps.chunk(2)
                    d_last = eps_c - eps_u  # (B,C,F,h,w) kept for later cond_reuse steps
                    eps = eps_u + s.guidance_scale * d_last
            if multistep is None:
                latents = model.scheduler.update(eps, latents, *ab[i])
            else:  # its history restarts at i = 0 of every clip
                latents = multistep.step(eps, i, latents)
            if callback is not None:
                callback(c, i)
        finals.append(latents)
        video = decode(model, latents, s.temporal_decode)  # (B,3,F,H,W)
        videos.append(video if c == 0 or s.assembly == "official" else video[:, :, o:])
    return torch.cat(videos, dim=2), torch.stack(finals)
