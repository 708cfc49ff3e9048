"""The evaluation behind `vidrd eval`: a fixed prompt set (single captions, or stories: a caption per clip) x seeds
through a backend and sampler settings, scored by the shapes harness.

The same prompts, seeds, batch and settings give the same videos (the runtime matches the reference sampler for a
seed), so two configurations' reports compare their quality on identical work.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from vidrd.ref.sampler import SamplerSettings
from vidrd.runtime.options import RuntimeOptions
from vidrd.runtime.shapes import data


EVAL_SETTINGS = replace(SamplerSettings(), height=data.SIZE, width=data.SIZE, frames=data.FRAMES, clips=3)
NEGATIVE = ""  # what vidrd-shapes was trained with as its unconditional caption (caption dropout)
HELD_OUT_EVERY = 4  # every 4th prompt of the set (positions 1, 5, 9, ...) is a held-out caption


def prompt_set(n: int, seed: int = 0) -> list[str]:
    """n captions, deterministic in (n, seed): held-out captions at positions 1, 5, 9, ... (a quarter, so both
    groups get enough samples), trained ones elsewhere; each group is a shuffle, repeated with a new shuffle when
    exhausted. prompt_set(n) is a prefix of prompt_set(n + 1)."""
    if n < 1:
        raise ValueError(f"n={n} prompts must be >= 1")
    rng = np.random.default_rng(seed)

    def cycle(caps):
        while True:
            for i in rng.permutation(len(caps)):
                yield str(caps[i])
    trained, held = cycle(data.TRAIN_CAPTIONS), cycle(data.HELD_OUT_CAPTIONS)
    return [next(held) if i % HELD_OUT_EVERY == 1 else next(trained) for i in range(n)]


def story_set(n: int, clips: int = 3, seed: int = 0) -> list[tuple[str, ...]]:
    """n stories of `clips` captions, deterministic in (n, clips, seed): one object and background, and a direction
    per clip that differs from the clip before (e.g. right, then down, then left). The first captions are
    prompt_set(n, seed)'s, so held-out captions start the stories at positions 1, 5, 9, ...; the later captions of
    the other stories are trained captions too, those of held-out ones any caption."""
    if clips < 2:
        raise ValueError(f"clips={clips}: a story needs at least 2 clips")
    rng = np.random.default_rng([seed, clips, 1])
    trained = {str(c) for c in data.TRAIN_CAPTIONS}
    out = []
    for i, first in enumerate(prompt_set(n, seed)):
        caps = [data.parse(first)]
        for _ in range(clips - 1):
            prev = caps[-1]
            turns = [data.Caption(prev.color, prev.shape, d, prev.background) for d in data.DIRECTIONS
                     if d != prev.direction]
            if i % HELD_OUT_EVERY != 1:
                turns = [c for c in turns if str(c) in trained] or turns
            caps.append(turns[rng.integers(len(turns))])
        out.append(tuple(str(c) for c in caps))
    return out


def evaluate(model, settings: SamplerSettings, prompts, seeds, options: RuntimeOptions = RuntimeOptions(), *,
             batch: int = 1, negative_prompt: str = NEGATIVE, progress: bool = True) -> dict:
    """Generate every prompt x seed (seed-major, `batch` prompts a request) and score the videos -> JSON-ready
    report {"config", "summary", "chance", "videos", "seconds"}. Runs what vidrd.runtime.options.open_runtime opens for
    `options` (the lean runtime, or the reference sampler for backend "reference"). `model` is loaded on options'
    device in options' dtype."""
    import torch
    from tqdm import tqdm

    from vidrd.runtime.shapes.harness import score_videos

    prompts = [str(p) if isinstance(p, str) else tuple(str(c) for c in p) for p in prompts]
    seeds = [int(s) for s in seeds]
    stories = any(not isinstance(p, str) for p in prompts)
    bad = [c for p in prompts for c in ([p] if isinstance(p, str) else p) if data.parse(c) is None]
    if bad:
        raise ValueError(f"prompt {bad[0]!r} is not in the shapes grammar {data.TEMPLATE!r}")
    if not prompts or not seeds:
        raise ValueError(f"need prompts and seeds (got {len(prompts)} prompts, {len(seeds)} seeds)")
    if batch < 1 or (stories and batch != 1):
        raise ValueError(f"batch={batch} must be >= 1" + (", and 1 for stories (a prompt per clip is a one-prompt "
                                                           "request)" if stories else ""))
    if stories and any(isinstance(p, str) or len(p) != settings.clips for p in prompts):
        raise ValueError(f"stories need one caption per clip (clips={settings.clips}) in every prompt")
    settings.check_model(model)
    options = options.resolved()
    s = settings
    chunks = [(seed, prompts[i:i + batch]) for seed in seeds for i in range(0, len(prompts), batch)]
    bar = tqdm(total=len(chunks) * s.clips * s.steps, unit="step", desc="eval", file=sys.stderr, disable=not progress)
    on_step = lambda c, i: bar.update(1)  # noqa: E731
    videos, captions, sample_seeds = [], [], []  # videos: (T,3,H,W) float in [0,1], from uint8 frames as written
    t0 = time.perf_counter()
    rt = None
    try:
        from vidrd.runtime.loop import Limits
        from vidrd.runtime.options import open_runtime
        rt = open_runtime(model, options, Limits.of(s, min(batch, len(prompts)), s.clips if stories else 1))
        for seed, group in chunks:
            for frames in _generate(rt, s, group, negative_prompt, seed, on_step):  # (T,H,W,3) uint8
                videos.append(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)
            captions += group
            sample_seeds += [seed] * len(group)
    finally:
        bar.close()
        if rt is not None:
            rt.close()
    seconds = time.perf_counter() - t0
    report = score_videos(videos, captions, clip_frames(s), trimmed=s.assembly == "trim")
    for record, seed in zip(report["videos"], sample_seeds):
        record["seed"] = seed
    config = {"settings": asdict(s), "backend": options.backend, "batch": batch, "negative_prompt": negative_prompt,
              "seeds": seeds, "prompts": len(prompts), "stories": stories, "samples": len(videos),
              "device": options.device,
              "dtype": str(options.torch_dtype).removeprefix("torch.")}
    return {"config": config, **report, "seconds": seconds, "seconds_per_sample": seconds / len(videos)}


def clip_frames(s: SamplerSettings) -> list[int]:
    """Frames of each clip in the assembled video: later clips lose their overlap frames under assembly 'trim'."""
    later = s.frames - (s.overlap if s.assembly == "trim" else 0)
    return [s.frames] + [later] * (s.clips - 1)


def _generate(rt, s: SamplerSettings, prompts: list, negative: str, seed: int, on_step):
    """The videos of one request as uint8 frames (T,H,W,3), one per prompt (a story: one, its clips' prompts)."""
    from vidrd.runtime.loop import Request

    negatives = tuple([negative] * len(prompts))
    if len(prompts) == 1 and not isinstance(prompts[0], str):  # a story: the first caption, then clip prompts
        request = Request(prompts[0][:1], negatives, s, seed, clip_prompts=prompts[0][1:])
    else:
        request = Request(tuple(prompts), negatives, s, seed)
    clips = [clip.frames for clip in rt.generate(request, on_step=on_step)]
    return list(np.concatenate(clips, axis=1))  # each clip (B,F',H,W,3) -> (B,T,H,W,3)


def write_atomic(path: Path, text: str) -> None:
    """Write beside `path` and rename over it, so a reader never sees a partial report."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
