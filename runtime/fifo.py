"""Diagonal denoising in the runtime (continuation="fifo"; the schedule, warm-up and output are described in
vidrd_ref/fifo.py, which this matches for a seed): the queue lives in the loop's latents buffer, the warm-up is the
first clip's usual steps (`Generation.step`) on the L-level schedule, and each round runs n sub-steps with a timestep
per frame, then emits the front frame into a window of clean frames and moves the queue on. Its own buffers are made
once, by the first request that asks for the mode; a round only copies, computes in place and calls the backends.
"""
from __future__ import annotations

import torch

from vidrd.ref import fifo as ref_fifo


class FifoBuffers:
    """For requests up to the runtime's limits: the clean-frame window (B,C,F,h,w) (during the warm-up: the queue
    being filled), per-frame timesteps (n,2B,F) and DDIM factors (n,4,F) of the sub-steps (n F <= T)."""

    def __init__(self, rt):
        lim, dev = rt.limits, rt.device
        self.window = torch.empty_like(rt.latents)  # (B*C*F*h*w,) float32
        self.ts = torch.empty(lim.steps * 2 * lim.batch, device=dev)  # (n*2B*F,) float32
        self.coef = torch.empty(lim.steps * 4, device=dev)  # (n*4*F,) float32


class Diagonal:
    """One request's diagonal denoising on the runtime's buffers (views bound and tables filled before step 0)."""

    def __init__(self, rt, job, bufs: FifoBuffers):
        s, (b, c, f, h, w) = job.s, job.shape
        n, nb = ref_fifo.substeps(s), job.ts.shape[0]
        self.rt, self.job, self.s, self.n, self.f = rt, job, s, n, f
        self.sizes, self.calls = ref_fifo.clip_sizes(s), ref_fifo.clip_calls(s)
        self.window = bufs.window[: b * c * f * h * w].view(job.shape)  # (B,C,F,h,w)
        self.ts = bufs.ts[: n * nb * f].view(n, nb, f)  # (n,2B,F)
        self.coef = bufs.coef[: n * 4 * f].view(n, 4, 1, 1, f, 1, 1)  # (n,4,1,1,F,1,1): broadcast on (B,C,F,h,w)
        levels, sched = n * f, rt.scheduler
        timesteps = sched.timesteps(levels, s.spacing).tolist()
        rows = []  # the warm-up runs Generation.step on the L-level schedule: its rows of the loop's tables
        for t in timesteps:
            a, ap = sched.alphas(int(t), levels, s.spacing)
            rows.append([(1 - a) ** 0.5, a ** 0.5, ap ** 0.5, (1 - ap) ** 0.5])
        rt.coef[:levels].copy_(torch.tensor(rows, dtype=torch.float32))
        table = torch.tensor(timesteps, dtype=torch.float32)[:, None]  # (L,1)
        rt.ts_table[:levels].copy_(table.expand(-1, rt.ts_table.shape[1]))
        for u in range(n):
            self.ts[u].copy_(torch.tensor([timesteps[j] for j in ref_fifo.frame_steps(s, u)], dtype=torch.float32))
            self.coef[u].copy_(ref_fifo.ddim_factors(sched, s, u).view(4, 1, 1, f, 1, 1))
        self.filled = 0  # frames of the window written by the current clip's rounds

    def clip(self, c: int):
        """Clip c's work (clip 0: the warm-up first), yielding after every UNet call the step it reports
        (vidrd_ref/fifo.py progress)."""
        job, lat, n, f = self.job, self.job.lat, self.n, self.f
        calls, total, steps = 0, self.calls[c], self.s.steps
        if c == 0:
            for i in range((f - 1) * n + 1):  # frame k joins the queue (the window, for now) before step (F-1-k) n
                if i % n == 0:
                    k = f - 1 - i // n
                    self.window[:, :, k].copy_(lat[:, :, k])
                if i == (f - 1) * n:
                    break
                job.step(0, i)
                yield ref_fifo.progress(calls, total, steps)
                calls += 1
            lat.copy_(self.window)
        size = self.sizes[c]
        keep = f - size  # the last frames of the previous clip's window lead this one's
        if keep:
            job.scratch[:, :, :keep].copy_(self.window[:, :, f - keep:])
            self.window[:, :, :keep].copy_(job.scratch[:, :, :keep])
        for r in range(size):
            for u in range(n):
                self.substep(u)
                yield ref_fifo.progress(calls, total, steps)
                calls += 1
            self.window[:, :, keep + r].copy_(lat[:, :, 0])  # the front frame is clean
            if not (c == len(self.sizes) - 1 and r == size - 1):
                self.advance()

    def substep(self, u: int) -> None:
        """Sub-step u of a round, in place: every queue frame one level down (UNet with a timestep per frame)."""
        job, rt, lat, g, tmp = self.job, self.rt, self.job.lat, self.job.guided, self.job.scratch
        b, x_in, eps, coef = job.b, job.x_in, job.eps, self.coef[u]
        x_in[:b].copy_(lat)
        if self.s.cfg:
            x_in[b:].copy_(lat)
        rt.unet(x_in, self.ts[u], job.ctx_unet, eps)
        if self.s.cfg:  # eps_u + scale * (eps_c - eps_u), as the samplers compute it
            g.copy_(eps[b:])
            g.sub_(eps[:b])
            g.mul_(rt.gscale)
            g.add_(eps[:b])
        else:
            g.copy_(eps)
        if rt.v_prediction:  # as Generation.ddim_v_update, factors per frame
            x0, t2 = tmp, job.prev_x0
            torch.mul(lat, coef[1], out=x0)
            torch.mul(g, coef[0], out=t2)
            x0.sub_(t2)
            torch.mul(lat, coef[0], out=t2)
            g.mul_(coef[1])
            g.add_(t2)
            torch.mul(x0, coef[2], out=lat)
            torch.mul(g, coef[3], out=t2)
            lat.add_(t2)
        else:
            torch.mul(g, coef[0], out=tmp)  # x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t), per frame
            lat.sub_(tmp)
            lat.div_(coef[1])
            lat.mul_(coef[2])  # x_prev = sqrt(a_prev) x0 + sqrt(1-a_prev) eps
            torch.mul(g, coef[3], out=tmp)
            lat.add_(tmp)

    def advance(self) -> None:
        """The queue moves on by one frame; a fresh N(0,1) frame (B,C,1,h,w), drawn on the CPU, enters at the back."""
        job, lat, f = self.job, self.job.lat, self.f
        job.scratch[:, :, : f - 1].copy_(lat[:, :, 1:])  # through scratch: the two ranges overlap
        lat[:, :, : f - 1].copy_(job.scratch[:, :, : f - 1])
        torch.randn(job.noise_frame.shape, generator=job.generator, out=job.noise_frame)
        lat[:, :, f - 1:].copy_(job.noise_frame)

