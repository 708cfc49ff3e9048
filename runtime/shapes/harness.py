"""Quality harness for vidrd-shapes videos: pure measurement of frames against the caption grammar (data.py).

Per frame, every pixel is named by its nearest palette entry (6 colours, 2 backgrounds). The background is the
background entry with the most pixels; the object is the colour with the most pixels when it has at least
`min_pixels`. Its mask (that colour, plus anti-aliased edge pixels that are at least half-way from the background
to it) is cut to its largest 8-connected component, which gives the centroid, size, box and fill ratio of the box
(triangle 1/2, circle pi/4, square 1: the nearest names the shape). Per clip, a least-squares line through the
centroid track gives the direction; the steps between frames give smoothness, and the step across each clip
boundary, against the median step inside clips, gives continuity. Videos are (T,3,H,W) float in [0,1], T = the
sum of the clip lengths.

Per clip, each clip is scored against its own caption (a story gives one per clip: "right", then "down", ...):
direction, colour and shape (the most frequent in the clip's frames), found rate. A later clip trimmed of its
overlap frames (--assembly trim) adds F-O frames; its direction is measured on those plus the last frame before
them, the step that leads into the clip (the frames it shares with the previous clip belong to that clip's motion).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import data

PALETTE = tuple(data.COLORS) + tuple(data.BACKGROUNDS)  # class index -> name: colours 0..5, backgrounds 6, 7
_RGB = torch.tensor([*data.COLORS.values(), *data.BACKGROUNDS.values()], dtype=torch.float32) / 255  # (8,3)
N_COLORS = len(data.COLORS)
FILL = {"triangle": 0.5, "circle": math.pi / 4, "square": 1.0}  # area / box area of each shape
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
CHANCE = {"color_acc": 1 / len(data.COLORS), "shape_acc": 1 / len(data.SHAPES),
          "background_acc": 1 / len(data.BACKGROUNDS), "direction_acc": 1 / len(data.DIRECTIONS)}
# At 64x64 (scaled with the frame's side or area): the fewest pixels that make an object, the slowest motion that
# has a direction, and the smallest step a boundary jump is measured against (quantisation moves a centroid ~0.2).
MIN_PIXELS, MIN_SPEED, MIN_STEP = 6, 0.5, 0.5
EDGE_RESIDUAL = 0.25  # an edge pixel lies within 0.25 (RGB in [0,1]) of the background-to-colour line


@dataclass(frozen=True)
class Frame:
    """What one frame shows: background, and the object (None when absent) with centroid (x, y) in pixels."""
    background: str
    color: str | None = None
    shape: str | None = None
    x: float | None = None
    y: float | None = None
    size: int = 0  # pixels of the object's component
    box: tuple | None = None  # (x0, y0, x1, y1) inclusive pixel indices
    fill: float | None = None


def _components(mask: torch.Tensor) -> torch.Tensor:
    """Labels of the 8-connected components of mask (T,H,W) bool: each pixel takes its component's largest index+1."""
    t, h, w = mask.shape
    m = mask[:, None].float()  # (T,1,H,W)
    lab = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w) * m  # (T,1,H,W), 0 off the mask
    while True:
        nxt = F.max_pool2d(lab, 3, stride=1, padding=1) * m  # the largest label among the 8 neighbours
        # pointer jumping: take the label of the pixel a label names (same component, label >= its own), so long
        # components converge in about log(length) rounds instead of length
        flat = nxt.view(t, h * w)
        nxt = torch.maximum(nxt, flat.gather(1, (flat.long() - 1).clamp(min=0)).view_as(nxt) * m)
        if torch.equal(nxt, lab):
            return lab[:, 0].long()  # (T,H,W)
        lab = nxt


def frames(video: torch.Tensor) -> list[Frame]:
    """Per-frame measurements of one video (T,3,H,W) in [0,1]."""
    assert video.dim() == 4 and video.shape[1] == 3, f"expected (T,3,H,W), got {tuple(video.shape)}"
    t, _, h, w = video.shape
    px = video.detach().float().cpu().permute(0, 2, 3, 1)  # (T,H,W,3)
    d2 = (_RGB * _RGB).sum(1) - 2 * px @ _RGB.T  # (T,H,W,8) squared distance to each entry, less |px|^2
    cls = d2.argmin(-1)  # (T,H,W)
    k = len(PALETTE)
    counts = torch.bincount((cls + k * torch.arange(t)[:, None, None]).view(-1), minlength=t * k).view(t, k)
    bg = N_COLORS + counts[:, N_COLORS:].argmax(1)  # (T,)
    col = counts[:, :N_COLORS].argmax(1)  # (T,)
    present = counts.gather(1, col[:, None])[:, 0] >= max(2, round(MIN_PIXELS * h * w / 64 ** 2))
    # anti-aliased edges: alpha along the background -> colour line, residual off it
    b, c = _RGB[bg][:, None, None], _RGB[col][:, None, None]  # (T,1,1,3)
    d = c - b
    alpha = ((px - b) * d).sum(-1) / (d * d).sum(-1)  # (T,H,W)
    residual = (px - b - alpha[..., None] * d).square().sum(-1).sqrt()  # (T,H,W)
    named = cls == col[:, None, None]  # (T,H,W)
    mask = (named | ((alpha >= 0.5) & (alpha <= 1.5) & (residual < EDGE_RESIDUAL))) & present[:, None, None]
    lab = _components(mask)
    # coverage of each pixel: a mix of background and colour, or a pixel named the colour though off their line
    # (a generated video's colour drifts); other pixels are not the object
    soft = alpha.clamp(0, 1) * ((residual < EDGE_RESIDUAL) | named)  # (T,H,W)
    out = []
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for i in range(t):
        background = PALETTE[int(bg[i])]
        if not present[i]:
            out.append(Frame(background))
            continue
        ids, n = lab[i][lab[i] > 0].unique(return_counts=True)
        comp = lab[i] == ids[n.argmax()]  # (H,W) largest component
        cx, cy = xs[comp].float(), ys[comp].float()
        x0, x1, y0, y1 = int(cx.min()), int(cx.max()), int(cy.min()), int(cy.max())
        # fill from coverage, not pixel counts: a hard mask drops a triangle's thin apex rows and rounds a small
        # circle's box up, which moves their ratios halfway to the next shape
        near = F.max_pool2d(comp[None, None].float(), 3, stride=1, padding=1)[0, 0] * soft[i]  # (H,W)
        area = float(near.sum())
        box = float(near.amax(1).sum()) * float(near.amax(0).sum())  # soft height x soft width
        fill = area / max(box, 1.0)
        shape = min(FILL, key=lambda s: abs(FILL[s] - fill))
        # pixel i covers [i, i+1): its centre is i + 0.5, as in data.render
        out.append(Frame(background, PALETTE[int(col[i])], shape, float(cx.mean()) + 0.5, float(cy.mean()) + 0.5,
                         int(comp.sum()), (x0, y0, x1, y1), fill))
    return out


def direction(track: Sequence[Frame], scale: float = 1.0) -> str:
    """left/right/up/down from a least-squares line through the centroids, or "none" (missing or barely moving)."""
    pts = [(i, f.x, f.y) for i, f in enumerate(track) if f.color is not None]
    if len(pts) < max(2, (len(track) + 1) // 2):
        return "none"
    t = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    t = t - t.mean()
    xy = torch.tensor([p[1:] for p in pts], dtype=torch.float64)  # (n,2)
    vx, vy = ((t[:, None] * (xy - xy.mean(0))).sum(0) / (t * t).sum()).tolist()  # pixels per frame
    if max(abs(vx), abs(vy)) < MIN_SPEED * scale:
        return "none"
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"  # y grows downwards


def _steps(track: Sequence[Frame]) -> list[float]:
    """Centroid steps between consecutive frames that both show the object."""
    return [math.dist((a.x, a.y), (b.x, b.y)) for a, b in zip(track, track[1:])
            if a.color is not None and b.color is not None]


def _accels(track: Sequence[Frame]) -> list[float]:
    """|second difference| of the centroid over consecutive triples that all show the object."""
    out = []
    for a, b, c in zip(track, track[1:], track[2:]):
        if a.color is not None and b.color is not None and c.color is not None:
            out.append(math.hypot(a.x - 2 * b.x + c.x, a.y - 2 * b.y + c.y))
    return out


def _mode(values):
    vals = [v for v in values if v is not None]
    return Counter(vals).most_common(1)[0][0] if vals else None


def _mean(values):
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def clip_lengths(frames_per_clip: int | Sequence[int], total: int) -> list[int]:
    """Clip lengths: an int splits `total` frames evenly; a sequence (e.g. trimmed later clips) must sum to it."""
    if isinstance(frames_per_clip, int):
        if frames_per_clip < 1 or total % frames_per_clip:
            raise ValueError(f"frames_per_clip={frames_per_clip} does not divide the video's {total} frames")
        return [frames_per_clip] * (total // frames_per_clip)
    lengths = [int(n) for n in frames_per_clip]
    if sum(lengths) != total or min(lengths) < 1:
        raise ValueError(f"clip lengths {lengths} do not add up to the video's {total} frames")
    return lengths


def _caption(caption: data.Caption | str) -> data.Caption:
    cap = caption if isinstance(caption, data.Caption) else data.parse(caption)
    if cap is None:
        raise ValueError(f"caption {caption!r} is not in the grammar {data.TEMPLATE!r}")
    return cap


def clip_captions(caption, clips: int) -> list[data.Caption]:
    """One caption per clip: a caption (str or Caption) for every clip, or a sequence of `clips` captions (a story)."""
    if isinstance(caption, (str, data.Caption)):
        return [_caption(caption)] * clips
    caps = [_caption(c) for c in caption]
    if len(caps) != clips:
        raise ValueError(f"{len(caps)} captions for a video of {clips} clips; give one per clip")
    return caps


def score_video(video: torch.Tensor, caption, frames_per_clip: int | Sequence[int], *, trimmed: bool = False) -> dict:
    """One video (T,3,H,W) in [0,1] against its caption, or a caption per clip (a story): a JSON-serialisable
    record. `trimmed`: later clips lost their overlap frames (--assembly trim), which sets the frames a later clip's
    own direction is measured on (module docstring)."""
    fs = frames(video)
    scale = max(video.shape[-2:]) / data.SIZE
    clips, starts, start = [], [], 0
    for n in clip_lengths(frames_per_clip, len(fs)):
        clips.append(fs[start:start + n])
        starts.append(start)
        start += n
    caps = clip_captions(caption, len(clips))
    cap = caps[0]
    dirs = [direction(c, scale) for c in clips]
    inside = [s for c in clips for s in _steps(c)]
    median = sorted(inside)[len(inside) // 2] if inside else None
    ratios = []
    for a, b in zip(clips, clips[1:]):  # the step across a boundary against the median step inside clips
        if median is not None and a[-1].color is not None and b[0].color is not None:
            ratios.append(math.dist((a[-1].x, a[-1].y), (b[0].x, b[0].y)) / max(median, MIN_STEP * scale))
    later = dirs[1:]
    color, shape = _mode(f.color for f in fs), _mode(f.shape for f in fs)
    background = _mode(f.background for f in fs)
    # each clip against its own caption; a trimmed later clip's direction includes the frame before it
    own = [fs[a - 1:a + len(c)] if trimmed and k else c for k, (a, c) in enumerate(zip(starts, clips))]
    clip_dirs = [direction(t, scale) for t in own]
    clip_colors, clip_shapes = [_mode(f.color for f in c) for c in clips], [_mode(f.shape for f in c) for c in clips]
    return {
        "caption": str(cap), "held_out": any(str(c) in data.HELD_OUT for c in caps),
        "clip_captions": [str(c) for c in caps], "story": len({c.direction for c in caps}) > 1,
        "clip_directions": clip_dirs, "clip_direction_ok": [d == c.direction for d, c in zip(clip_dirs, caps)],
        "clip_direction_own_ok": [d == c.direction for d, c in zip(dirs, caps)],  # its own frames only
        "clip_color_ok": [v == c.color for v, c in zip(clip_colors, caps)],
        "clip_shape_ok": [v == c.shape for v, c in zip(clip_shapes, caps)],
        "clip_found": [_mean(f.color is not None for f in c) for c in clips],
        "color": color, "shape": shape, "background": background, "directions": dirs,
        "color_ok": color == cap.color, "shape_ok": shape == cap.shape, "background_ok": background == cap.background,
        "direction_ok": dirs[0] == cap.direction, "direction_none": dirs[0] == "none",
        "direction_consistency": _mean(d == c.direction for d, c in zip(later, caps[1:])) if later else None,
        "reversals": _mean(b == OPPOSITE.get(a) for a, b in zip(dirs, later)) if later else None,
        "found": _mean(f.color is not None for f in fs),
        "size_mean": _mean(f.size if f.color is not None else None for f in fs),
        "step_mean": _mean(inside), "step_std": _std(inside),
        "accel_mean": _mean(a for c in clips for a in _accels(c)),
        "boundary_ratio": _mean(ratios) if ratios else None,
    }


def _median(values):
    """The median of sorted `values` (the mean of the middle two for an even count), None when empty."""
    n = len(values)
    return None if n == 0 else (values[n // 2] + values[(n - 1) // 2]) / 2


def _std(values):
    m = _mean(values)
    return None if m is None else math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


# summary key -> per-video field; booleans become rates
SUMMARY = {"color_acc": "color_ok", "shape_acc": "shape_ok", "background_acc": "background_ok",
           "direction_acc": "direction_ok", "direction_none": "direction_none",
           "direction_consistency": "direction_consistency", "reversal_rate": "reversals", "found_rate": "found",
           "size_mean": "size_mean", "step_mean": "step_mean", "step_std": "step_std", "accel_mean": "accel_mean",
           "boundary_ratio": "boundary_ratio"}


# summary key -> per-video list with one entry per clip: a list of rates by clip
PER_CLIP = {"clip_direction_acc": "clip_direction_ok", "clip_direction_own_acc": "clip_direction_own_ok",
            "clip_color_acc": "clip_color_ok",
            "clip_shape_acc": "clip_shape_ok", "clip_found_rate": "clip_found"}
# summary key -> per-video list: the rate of videos where it holds in every clip
EVERY_CLIP = {"direction_every_clip": "clip_direction_ok", "color_every_clip": "clip_color_ok",
              "shape_every_clip": "clip_shape_ok"}


def summarize(records: Sequence[dict]) -> dict:
    """Means of the per-video records (fields that are None for a video are left out of its mean), all and split.
    Per-clip keys are lists by clip (clip k's mean over the videos that have a clip k)."""
    def by_clip(rs, f):
        n = max((len(r[f]) for r in rs), default=0)
        return [_mean(r[f][k] for r in rs if len(r[f]) > k) for k in range(n)]

    def means(rs):
        ratios = sorted(r["boundary_ratio"] for r in rs if r["boundary_ratio"] is not None)
        return {"n": len(rs), **{k: _mean(r[f] for r in rs) for k, f in SUMMARY.items()},
                "boundary_ratio_median": _median(ratios),
                **{k: by_clip(rs, f) for k, f in PER_CLIP.items()},
                **{k: _mean(all(r[f]) for r in rs) for k, f in EVERY_CLIP.items()}}
    return {"all": means(records), "trained": means([r for r in records if not r["held_out"]]),
            "held_out": means([r for r in records if r["held_out"]])}


def score_videos(videos, captions: Sequence, frames_per_clip: int | Sequence[int], *, trimmed: bool = False) -> dict:
    """Score videos ((N,T,3,H,W) or a list of (T,3,H,W), float in [0,1]) against captions (each a caption or one per
    clip) -> JSON-serialisable dict: {"summary": {"all"|"trained"|"held_out": means}, "chance": ..., "videos":
    per-video records}. A video is held out when any of its captions is."""
    if len(videos) != len(captions):
        raise ValueError(f"{len(videos)} videos but {len(captions)} captions")
    records = [score_video(v, c, frames_per_clip, trimmed=trimmed) for v, c in zip(videos, captions)]
    return {"summary": summarize(records), "chance": CHANCE, "videos": records}

