"""Diagonal denoising, continuation="fifo" of the reference sampler (FIFO-Diffusion, Kim et al. 2024, arXiv
2405.11473 §3): a queue of F frames at increasing noise levels; each round denoises every frame of the queue by the
same number of levels in one UNet call per level (a timestep per frame), the front frame leaves clean and a frame of
fresh noise enters at the back. Memory stays one clip's, and every round emits one frame.

The schedule (F frames, T requested steps): n = T // F sub-steps per round, L = n F DDIM levels (the L-step schedule,
so a frame is denoised in L <= T steps). Queue slot k (0 = front, the oldest frame) starts a round at step
(F-1-k) n of that schedule and ends it at step (F-k) n, where slot k-1 starts: so after the round the queue shifts by
one slot, slot 0 has passed the last step (clean) and the new frame starts at step 0 (pure noise).

Warm-up: the first clip is denoised the usual way (all frames at the same step) for (F-1) n steps; frame k joins the
queue as it is before step (F-1-k) n, so the queue starts on one coherent video, on the diagonal. Each of its frames
then finishes in the rounds, so the output starts with the first clip's frames.

Output: one frame per round, `SamplerSettings.output_frames()` frames in all, grouped into clips as the assembly
groups them (clip 1: F frames; later clips: F, or F - O under assembly "trim"). Clip c decodes the last F frames
emitted by its end (with "trim" the first O of them belong to clip c-1 and are dropped after decoding, as in the
other modes), so every clip decodes F frames. With per-clip prompts the rounds that emit clip c's new frames use its
prompt. The overlap, noise recycle and staged guidance do not apply; the UNet calls are (F-1) n + R n for R output
frames (3 clips of 8 frames, overlap 4, trim, 25 steps: 21 + 48 = 69, against 75 for the other modes).
"""
from __future__ import annotations

import torch

from .config import LATENT_FACTOR
from .sampler import SamplerSettings, decode, initial_noise


def substeps(s: SamplerSettings) -> int:
    """Sub-steps per round, n = T // F (SamplerSettings refuses T < F with fifo)."""
    return s.steps // s.frames


def clip_sizes(s: SamplerSettings) -> list[int]:
    """New frames in each clip of the output: F, then F - O (assembly "trim") or F."""
    later = s.frames - (s.overlap if s.assembly == "trim" else 0)
    return [s.frames] + [later] * (s.clips - 1)


def clip_calls(s: SamplerSettings) -> list[int]:
    """UNet calls of each clip: the warm-up's (F-1) n and n per new frame for clip 1, n per new frame after it."""
    n = substeps(s)
    return [(s.frames - 1) * n * (c == 0) + size * n for c, size in enumerate(clip_sizes(s))]


def progress(call: int, calls: int, steps: int) -> int:
    """The step (0..steps-1) that a clip's call-th of `calls` UNet calls reports to callbacks, so that progress reads
    as in the other modes (steps per clip; the last call reports steps-1); increasing, values may repeat."""
    return ((call + 1) * steps - 1) // calls


def frame_steps(s: SamplerSettings, u: int) -> list[int]:
    """Step of the L-step schedule at which each queue slot k (0 = front) runs sub-step u of a round: (F-1-k) n + u."""
    n, f = substeps(s), s.frames
    return [(f - 1 - k) * n + u for k in range(f)]


def ddim_factors(scheduler, s: SamplerSettings, u: int) -> torch.Tensor:
    """DDIM factors of sub-step u per queue slot, from python floats as the samplers' tables: rows
    sqrt(1-a_t), sqrt(a_t), sqrt(a_prev), sqrt(1-a_prev). (4,F) float32."""
    levels = s.steps // s.frames * s.frames
    ts = scheduler.timesteps(levels, s.spacing).tolist()
    rows = []
    for j in frame_steps(s, u):
        a, ap = scheduler.alphas(int(ts[j]), levels, s.spacing)
        rows.append([(1 - a) ** 0.5, a ** 0.5, ap ** 0.5, (1 - ap) ** 0.5])
    return torch.tensor(rows, dtype=torch.float32).T.contiguous()  # (4,F)


def ddim_frames(model_output, x, coef: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """DDIM (eta = 0) with a noise level per frame: x (B,C,F,h,w), coef (4,F) of ddim_factors. Term by term as
    vidrd.ref.ddim.DDIM.update."""
    c0, c1, c2, c3 = (c.view(1, 1, -1, 1, 1) for c in coef)  # (1,1,F,1,1) each
    if v_prediction:
        x0 = c1 * x - c0 * model_output
        eps = c1 * model_output + c0 * x
    else:
        eps = model_output
        x0 = (x - c0 * eps) / c1
    return c2 * x0 + c3 * eps


@torch.no_grad()
def generate(model, contexts: list, s: SamplerSettings, generator, callback=None):
    """Diagonal denoising of a whole request; contexts[c] is clip c's text context ([uncond; cond] (2B,77,D) under
    guidance, else (B,77,D)). -> video (B,3,frames_out,H,W) in [0,1], latents (clips,B,C,F,h,w): each clip's
    decoded window. callback(clip, i) after every UNet call, i its progress() step."""
    f, n = s.frames, substeps(s)
    levels = n * f
    ctx = contexts[0]
    b = ctx.shape[0] // (2 if s.cfg else 1)
    shape = (b, model.unet.cfg.in_channels, f, s.height // LATENT_FACTOR, s.width // LATENT_FACTOR)  # (B,C,F,h,w)
    ts = model.scheduler.timesteps(levels, s.spacing).tolist()
    v_pred = model.config.scheduler.prediction_type == "v_prediction"

    def guided(x, t, ctx):
        x_in = torch.cat([x, x]) if s.cfg else x  # (2B or B,C,F,h,w)
        eps = model.unet(x_in, t, ctx)
        if not s.cfg:
            return eps
        eps_u, eps_c = eps.chunk(2)
        return eps_u + s.guidance_scale * (eps_c - eps_u)

    # warm-up: the first clip at one noise level, frame k taken onto the diagonal before step (F-1-k) n
    x = initial_noise(shape, generator, s.noise_prior, ctx.dtype, ctx.device)
    queue = torch.empty_like(x)
    calls, total = 0, clip_calls(s)
    for i in range((f - 1) * n + 1):
        if i % n == 0:
            k = f - 1 - i // n
            queue[:, :, k] = x[:, :, k]
        if i == (f - 1) * n:
            break
        a, ap = model.scheduler.alphas(int(ts[i]), levels, s.spacing)
        x = model.scheduler.update(guided(x, ts[i], ctx), x, a, ap)
        if callback is not None:
            callback(0, progress(calls, total[0], s.steps))
        calls += 1

    coefs = [ddim_factors(model.scheduler, s, u).to(x.device) for u in range(n)]  # (4,F) per sub-step
    t_frames = [torch.tensor([ts[j] for j in frame_steps(s, u)], device=x.device) for u in range(n)]  # (F,) each
    emitted, videos, finals = [], [], []
    sizes = clip_sizes(s)
    for c, size in enumerate(sizes):
        ctx = contexts[c]
        if c > 0:
            calls = 0
        for r in range(size):
            for u in range(n):
                t = t_frames[u].expand(ctx.shape[0], f)  # (2B or B,F): a timestep per frame
                queue = ddim_frames(guided(queue, t, ctx), queue, coefs[u], v_pred)
                if callback is not None:
                    callback(c, progress(calls, total[c], s.steps))
                calls += 1
            emitted.append(queue[:, :, :1])  # (B,C,1,h,w) clean
            last = c == len(sizes) - 1 and r == size - 1
            if not last:  # the queue moves on: a fresh-noise frame at the back
                fresh = torch.randn((b, shape[1], 1, *shape[3:]), generator=generator, dtype=torch.float32)
                queue = torch.cat([queue[:, :, 1:], fresh.to(queue.device, queue.dtype)], dim=2)
        window = torch.cat(emitted[-f:], dim=2)  # (B,C,F,h,w) the last F frames emitted
        finals.append(window)
        video = decode(model, window, s.temporal_decode)  # (B,3,F,H,W)
        videos.append(video[:, :, f - size:])
    return torch.cat(videos, dim=2), torch.stack(finals)
