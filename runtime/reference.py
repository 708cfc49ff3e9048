"""The readable reference sampler behind the runtime's interface: `generate(request)` runs
`vidrd.ref.sampler.generate` and hands its video out as the runtime's clips, so a command streams clips whatever the
backend. `vidrd.runtime.options.open_runtime` builds one for --backend reference.

Known limit: the sampler returns the whole video at once, so every clip is yielded after the last one is decoded.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator

import numpy as np
import torch

from vidrd.ref.attention import Attention, set_attention
from vidrd.ref.sampler import SamplerSettings, check_clip_prompts, check_prompts, check_seed, generate as sample

from .backends.fast_ops import shared_copy
from .loop import Clip, Limits, Request
from .video_io import to_uint8


class ReferenceRuntime:
    """The reference sampler on `model` with a Runtime's `generate(request, on_step)` and `close()`, for requests up
    to `limits`. Runs in the model's dtype and on its device; options.attention and options.threads apply."""

    def __init__(self, model, options, limits: Limits = Limits()):
        if options.threads is not None:  # only when asked: the thread count is process-wide
            torch.set_num_threads(options.threads)
        if any(isinstance(m, Attention) and m.backend != options.attention for m in model.unet.modules()):
            # the attention kernels go on a copy sharing the weights: the caller's model stays as it is
            model = replace(model, unet=set_attention(shared_copy(model.unet), options.attention))
        self.model, self.limits, self.device = model, limits, model.device

    def check(self, request: Request) -> tuple[list[str], list[str], SamplerSettings]:
        """Validate a request with the runtime's rules (seed, model, prompts, limits), before any work."""
        s = request.settings
        check_seed(request.seed)
        s.check_model(self.model)
        prompts, negatives = check_prompts(self.model.tokenizer, list(request.prompts),
                                           None if request.negative_prompts is None else list(request.negative_prompts))
        per_clip = check_clip_prompts(self.model.tokenizer, prompts, request.clip_prompts, s.clips)
        try:
            self.limits.check(s, len(prompts), max(1, len(set(per_clip))))
        except ValueError as e:
            raise ValueError(f"{e}, which this runtime was opened for; open the runtime with larger limits") from None
        return prompts, negatives, s

    def generate(self, request: Request, on_step: Callable[[int, int], None] | None = None) -> Iterator[Clip]:
        """Validate `request` now (ValueError before any generator exists), then return an iterator over its clips,
        as the runtime yields them. on_step(clip, step) runs after every step; raising Cancelled there stops it."""
        prompts, negatives, s = self.check(request)
        return self._stream(prompts, negatives, s, request, on_step)

    def _stream(self, prompts, negatives, s: SamplerSettings, request: Request, on_step):
        generator = torch.Generator().manual_seed(request.seed)  # CPU: the official noise order
        video, latents = sample(self.model, prompts, negatives, s, generator, callback=on_step, warn=False,
                                clip_prompts=request.clip_prompts)
        # video (B,3,T,H,W) in [0,1] of clips laid end to end; latents (clips,B,C,F,h,w)
        start = 0
        for c in range(s.clips):
            n = s.frames - s.overlap if (c > 0 and s.assembly == "trim") else s.frames  # the sampler's trimming
            part = video[:, :, start:start + n]  # (B,3,F',H,W)
            start += n
            frames = np.stack([to_uint8(v) for v in part])  # (B,F',H,W,3) truncating, as the runtime's clips
            yield Clip(c, frames, latents[c].to("cpu", torch.float32, copy=True),
                       part.to("cpu", torch.float32, copy=True) if request.float_video else None)

    def close(self) -> None:
        """Nothing to release: the reference sampler keeps no buffers between requests."""
