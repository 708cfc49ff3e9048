"""Procedural text-to-video data for vidrd-shapes: one coloured shape moving in a straight line on a plain background.

Every video is a pure function of (caption, seed): no dataset files. Captions follow one grammar exactly:
`a {color} {shape} moving {direction} on a {background} background` (6 x 3 x 4 x 2 = 144 captions).
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

# RGB in 0..255. Each colour is >= 120 (Euclidean) from every other colour and from both backgrounds, so the
# harness can name a pixel by its nearest palette entry.
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
          "white": (250, 250, 250), "magenta": (220, 50, 220)}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
VELOCITY = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy), y down
TEMPLATE = "a {color} {shape} moving {direction} on a {background} background"
_PATTERN = re.compile(r"a (\w+) (\w+) moving (\w+) on a (\w+) background")
WORDS = tuple(sorted({"a", "moving", "on", "background", *COLORS, *SHAPES, *DIRECTIONS, *BACKGROUNDS}))

# Every fifth caption of a fixed shuffle (seed 0): 14 of 144 (~10%) never seen in training. The check below keeps
# each word in the training set in every slot, so held-out captions test new combinations, not new words.
SIZE, FRAMES, SUPERSAMPLE = 64, 8, 4
RADIUS = (7.0, 11.0)  # pixels: half the box side of the shape
SPEED = (2.0, 3.5)  # pixels per frame


@dataclass(frozen=True)
class Caption:
    color: str
    shape: str
    direction: str
    background: str

    def __str__(self) -> str:
        return TEMPLATE.format(**self.__dict__)


def parse(text: str) -> Caption | None:
    """The caption's four words, or None when `text` is not in the grammar."""
    m = _PATTERN.fullmatch(text.strip().lower())
    if not m:
        return None
    c = Caption(*m.groups())
    ok = c.color in COLORS and c.shape in SHAPES and c.direction in DIRECTIONS and c.background in BACKGROUNDS
    return c if ok else None


def all_captions() -> list[Caption]:
    """The 144 captions in grammar order."""
    return [Caption(*t) for t in itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS)]


def _held_out() -> frozenset[str]:
    caps = all_captions()
    order = np.random.default_rng(0).permutation(len(caps))
    held = [caps[i] for i in order[::10]][:14]
    train = [c for c in caps if str(c) not in {str(h) for h in held}]
    for slot in ("color", "shape", "direction", "background"):
        assert {getattr(c, slot) for c in train} == {getattr(c, slot) for c in caps}, slot
    return frozenset(str(c) for c in held)


HELD_OUT = _held_out()
TRAIN_CAPTIONS = tuple(c for c in all_captions() if str(c) not in HELD_OUT)
HELD_OUT_CAPTIONS = tuple(c for c in all_captions() if str(c) in HELD_OUT)


def out_of_vocabulary(prompt: str) -> list[str]:
    """Words of `prompt` that the shapes grammar never uses (for a warning)."""
    return sorted({w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in WORDS})


@dataclass(frozen=True)
class Motion:
    """Where the object starts and how it moves: centre (x, y) in pixels, radius, speed in pixels per frame."""
    x: float
    y: float
    radius: float
    speed: float


def sample_motion(caption: Caption, rng: np.random.Generator, frames: int = FRAMES, size: int = SIZE) -> Motion:
    """A start point such that the object's centre stays inside the frame for all `frames` frames."""
    r = rng.uniform(*RADIUS) * size / SIZE
    v = rng.uniform(*SPEED) * size / SIZE
    dx, dy = VELOCITY[caption.direction]
    travel = v * (frames - 1)
    lo, hi = r * 0.6, size - r * 0.6  # the centre keeps at least 60% of the radius inside the frame

    def start(d: float) -> float:
        if d > 0:
            return rng.uniform(lo, max(lo, hi - travel))
        if d < 0:
            return rng.uniform(min(hi, lo + travel), hi)
        return rng.uniform(r, size - r)
    return Motion(start(dx), start(dy), r, v)


def _inside(shape: str, px: torch.Tensor, py: torch.Tensor, r: float) -> torch.Tensor:
    """Boolean mask of sample points (px, py) relative to the centre, for a shape of half-size r."""
    if shape == "circle":
        return px * px + py * py <= r * r
    if shape == "square":
        return (px.abs() <= r) & (py.abs() <= r)
    # triangle: apex up at (0, -r), base from (-r, r) to (r, r); half of its box
    return (py <= r) & (2 * px.abs() <= py + r)


def render(caption: Caption, motion: Motion, frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """One video (F,3,H,W) float32 in [0,1], anti-aliased by SUPERSAMPLE x SUPERSAMPLE coverage."""
    dx, dy = VELOCITY[caption.direction]
    centres = [(motion.x + dx * motion.speed * f, motion.y + dy * motion.speed * f) for f in range(frames)]
    return draw(caption, centres, motion.radius, size)


def draw(caption: Caption, centres, radius: float, size: int = SIZE) -> torch.Tensor:
    """Frames (F,3,H,W) float32 in [0,1] of the caption's shape at each centre (x, y) in pixels (F centres)."""
    s = SUPERSAMPLE
    axis = (torch.arange(size * s, dtype=torch.float32) + 0.5) / s  # sample positions in pixels
    py, px = torch.meshgrid(axis, axis, indexing="ij")  # (H s, W s)
    fg = torch.tensor(COLORS[caption.color], dtype=torch.float32) / 255  # (3,)
    bg = torch.tensor(BACKGROUNDS[caption.background], dtype=torch.float32) / 255
    out = torch.empty(len(centres), 3, size, size)
    for f, (cx, cy) in enumerate(centres):
        hit = _inside(caption.shape, px - cx, py - cy, radius).float()  # (H s, W s)
        cover = hit.view(size, s, size, s).mean(dim=(1, 3))  # (H,W) coverage in [0,1]
        out[f] = bg[:, None, None] + (fg - bg)[:, None, None] * cover
    return out


def video(caption: Caption | str, seed: int, frames: int = FRAMES, size: int = SIZE) -> torch.Tensor:
    """The video of `caption` for `seed`: (F,3,H,W) float32 in [0,1], deterministic."""
    cap = caption if isinstance(caption, Caption) else parse(caption)
    if cap is None:
        raise ValueError(f"caption {caption!r} is not in the grammar {TEMPLATE!r}")
    rng = np.random.default_rng([seed, hash_caption(cap)])
    return render(cap, sample_motion(cap, rng, frames, size), frames, size)


def hash_caption(cap: Caption) -> int:
    """A stable small integer per caption (its index in grammar order)."""
    return [str(c) for c in all_captions()].index(str(cap))


def batch(step: int, n: int, seed: int = 0, frames: int = FRAMES, size: int = SIZE,
          captions: tuple = TRAIN_CAPTIONS) -> tuple[torch.Tensor, list[str]]:
    """Training batch `step`: n videos (n,F,3,H,W) in [0,1] and their captions, a function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    picks = rng.integers(0, len(captions), size=n)
    caps = [captions[i] for i in picks]
    vids = torch.stack([render(c, sample_motion(c, rng, frames, size), frames, size) for c in caps])
    return vids, [str(c) for c in caps]


# Long videos: a track is one object moving through `segments` clips of `frames` frames that share `overlap` frames
# (the frames a long video keeps with --assembly trim: F + (S-1)(F-O)); each segment has its own direction, so a
# direction word can change between clips (a story). Slower than single clips, so three clips stay in the frame.
TRACK_SPEED = (1.75, 3.0)  # pixels per frame
WINDOWS = (0.3, 0.35, 0.35)  # how often a training window is the track's first, second, third clip


def segment_of(frame: int, frames: int, overlap: int) -> int:
    """Which segment (clip) a track frame belongs to: the first clip's F frames, then F-O new frames per clip."""
    return 0 if frame < frames else 1 + (frame - frames) // (frames - overlap)


def track(directions: list[str], rng: np.random.Generator, frames: int = FRAMES, overlap: int = 4,
          size: int = SIZE) -> tuple[list[tuple[float, float]], float]:
    """Centres (x, y) of a track through len(directions) segments, and the radius; the centre stays inside the frame
    (as in sample_motion) for the whole track. The move into frame f follows the direction of f's segment."""
    r = rng.uniform(*RADIUS) * size / SIZE
    n = frames + (len(directions) - 1) * (frames - overlap)
    steps = [VELOCITY[directions[segment_of(f, frames, overlap)]] for f in range(1, n)]
    path = np.concatenate([np.zeros((1, 2)), np.cumsum(np.array(steps, dtype=np.float64), axis=0)])  # (T,2) unit
    lo, hi = r * 0.6, size - r * 0.6
    span = float((path.max(axis=0) - path.min(axis=0)).max())
    v = min(rng.uniform(*TRACK_SPEED), (hi - lo) / span if span else TRACK_SPEED[1]) * size / SIZE
    start = [rng.uniform(lo - v * path[:, k].min(), max(lo - v * path[:, k].min(), hi - v * path[:, k].max()))
             for k in range(2)]
    return [(start[0] + v * px, start[1] + v * py) for px, py in path], r


def _neighbour(direction: str, rng: np.random.Generator, turn: float) -> str:
    """The direction of a segment next to one moving `direction`: another one with probability `turn`."""
    keep = rng.random() >= turn
    return direction if keep else str(rng.choice([d for d in DIRECTIONS if d != direction]))


def window_batch(step: int, n: int, seed: int = 0, frames: int = FRAMES, overlap: int = 4, turn: float = 0.5,
                 size: int = SIZE, captions: tuple = TRAIN_CAPTIONS, segments: int = 0):
    """Training batch `step` of clips cut from tracks, a function of (seed, step): videos (n,F,3,H,W) in [0,1], each
    clip's caption (its own segment's direction), the index of its first new frame (0 for a first clip, else O:
    the frames before it are the previous clip's last O frames) and the previous segment's direction (or None).
    Each earlier segment keeps the next one's direction with probability 1 - `turn`. `segments` > 0: every track
    has that many clips (len(WINDOWS) at most), the captioned one among them, so that a first clip is placed and paced
    to leave room in the frame for the clips after it (a long video's first clip); 0: the track ends at the
    captioned clip."""
    if not 0 <= segments <= len(WINDOWS):
        raise ValueError(f"segments={segments} must be in 0..{len(WINDOWS)}")
    rng = np.random.default_rng([seed, step, 7])
    vids, caps, first, before = [], [], [], []
    for _ in range(n):
        cap = captions[rng.integers(0, len(captions))]
        w = int(rng.choice(len(WINDOWS), p=WINDOWS))
        if segments:
            w = min(w, segments - 1)
        dirs = [cap.direction]
        for _ in range(w):  # segments before the captioned one, latest first
            dirs.insert(0, _neighbour(dirs[0], rng, turn))
        for _ in range(max(0, segments - w - 1)):  # and after it, which only place and pace the track
            dirs.append(_neighbour(dirs[-1], rng, turn))
        centres, r = track(dirs, rng, frames, overlap, size)
        a = w * (frames - overlap)
        vids.append(draw(cap, centres[a:a + frames], r, size))
        caps.append(str(cap))
        first.append(overlap if w else 0)
        before.append(dirs[w - 1] if w else None)
    return torch.stack(vids), caps, first, before


def palette_distance() -> float:
    """The smallest RGB distance between two palette entries (colours and backgrounds)."""
    entries = list(COLORS.values()) + list(BACKGROUNDS.values())
    return min(math.dist(a, b) for a, b in itertools.combinations(entries, 2))
