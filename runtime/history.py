"""Reuse-and-diffuse bookkeeping (SPEC §3.5) on preallocated buffers: the only module that knows about it.

What a clip reads of the previous one, with its frames in the order `SamplerSettings.source_frames` gives (the
official loop: reversed; continuation="forward": the last O frames in order, then the same indices, or with
recycle_order="shifted" the first F-O frames): its latents
after step 0 (`init_src`: the overlap frames' restart values and the recycled noise) and, for each step, its
overlap frames (`overlap[i]`, for staged guidance). Each clip reads an entry before overwriting it with its own, so one copy of each suffices.
"""
from __future__ import annotations

import copy
import math

import torch


class History:
    """Buffers sized for the largest request: init_src (B,C,F,h,w) and overlap (T,B,C,O,h,w), float32."""

    def __init__(self, numel_clip: int, numel_overlap: int, steps: int, frames: int, device):
        self.init_src_flat = torch.empty(numel_clip, dtype=torch.float32, device=device)  # (B*C*F*h*w,)
        self.overlap_flat = torch.empty(steps * numel_overlap, dtype=torch.float32, device=device)  # (T*B*C*O*h*w,)
        self.index = torch.empty(frames, dtype=torch.int64, device=device)  # (F,) source frame of each frame (source_frames)
        self.consts = torch.empty(2, dtype=torch.float32, device=device)  # recycle weight, fresh-noise divisor
        self.pinned: list[int] = []

    def start(self, shape: tuple, settings, scheduler) -> None:
        """Bind views for a request of latent shape (B,C,F,h,w) (before step 0: may index, never allocates)."""
        b, c, f, h, w = shape
        o, t = (settings.overlap if settings.clips > 1 else 0), settings.steps  # one clip reads no history
        self.shape, self.o, self.overlap_shape = shape, o, (t, b, c, o, h, w)
        self.init_src = self.init_src_flat[: b * c * f * h * w].view(b, c, f, h, w)
        n = b * c * o * h * w
        self.overlap = [self.overlap_flat[i * n:(i + 1) * n].view(b, c, o, h, w) for i in range(t)]
        # previous-clip frame reused by each frame: official F-1..0 (reversed), forward F-O..F-1 then O..F-1
        self.index[:f].copy_(torch.tensor(settings.source_frames()))
        self.src_all, self.src_overlap = self.index[:f], self.index[:o]
        # staged guidance pins frames 0..K_i-1 at step i (SamplerSettings.pinned)
        self.pinned = settings.pinned(scheduler) if o else [0] * t
        r = settings.noise_recycle
        self.consts.copy_(torch.tensor([r / math.sqrt(1 + r * r), math.sqrt(1 + r * r)]))
        self.recycle, self.fresh_div = self.consts[0], self.consts[1]

    def rows(self, r0: int, r1: int) -> "History":
        """Rows r0..r1-1 of the bound request (one job of a batch of jobs): the same history, as views (no copy)."""
        assert 0 <= r0 < r1 <= self.shape[0], (r0, r1, self.shape)
        view = copy.copy(self)
        view.shape, view.overlap_shape = (r1 - r0, *self.shape[1:]), (*self.overlap_shape[:1], r1 - r0,
                                                                       *self.overlap_shape[2:])
        view.init_src = self.init_src[r0:r1]  # (b,C,F,h,w)
        view.overlap = [o[r0:r1] for o in self.overlap]  # T x (b,C,O,h,w)
        return view

    def save(self) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU copies of what the next clip reads: init_src (B,C,F,h,w) and overlap (T,B,C,O,h,w) (a checkpoint)."""
        return self.init_src.to("cpu", copy=True), torch.stack(self.overlap).to("cpu")

    def load(self, init_src: torch.Tensor, overlap: torch.Tensor) -> None:
        """Put back what save() returned, after start() for the same request shape (a resumed generation)."""
        assert tuple(overlap.shape) == self.overlap_shape, (tuple(overlap.shape), self.overlap_shape)
        self.init_src.copy_(init_src)
        for dst, src in zip(self.overlap, overlap):
            dst.copy_(src)

    def restart(self, latents: torch.Tensor, fresh: torch.Tensor) -> None:
        """A later clip's initial latents: overlap frames from init_src, the rest recycled noise + fresh (B,C,F,h,w).

        `fresh` holds a N(0,1) draw of the whole clip shape (the official code draws all frames, uses frames O..).
        """
        o = self.o
        fresh.div_(self.fresh_div)  # the official draw is randn / sqrt(1 + r^2)
        latents[:, :, :o].copy_(self.init_src[:, :, :o])
        torch.mul(self.init_src[:, :, o:], self.recycle, out=latents[:, :, o:])
        latents[:, :, o:].add_(fresh[:, :, o:])

    def guide_and_record(self, i: int, latents: torch.Tensor, later_clip: bool) -> None:
        """Step i: pin the overlap frames still in their window, then record this clip's frames in source order."""
        k = self.pinned[i] if later_clip else 0
        if k:
            latents[:, :, :k].copy_(self.overlap[i][:, :, :k])
        torch.index_select(latents, 2, self.src_overlap, out=self.overlap[i])
        if i == 0:
            torch.index_select(latents, 2, self.src_all, out=self.init_src)
