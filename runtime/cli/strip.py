"""`vidrd strip`: a video's frames side by side in one small PNG (the pictures in the docs are made with it)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

GAP = 2  # pixels between frames, in the background of the strip (dark gray)


def register(sub) -> None:
    p = sub.add_parser("strip", help="a video's frames side by side in one PNG (a frame strip for docs)",
                       description="Read an .mp4/.gif (or a folder of PNG frames) and write every N-th frame side by "
                       "side, in rows of --columns frames, as one PNG.")
    p.add_argument("video", type=Path, help="the video: .mp4, .gif or a folder of frame_*.png")
    p.add_argument("-o", "--out", required=True, type=Path, metavar="FILE.png")
    p.add_argument("--every", type=int, default=1, metavar="N", help="keep every N-th frame (default 1: all)")
    p.add_argument("--columns", type=int, default=None, metavar="K", help="frames per row (default: one row)")
    p.add_argument("--scale", type=int, default=1, metavar="S", help="enlarge each frame S times (nearest pixel)")
    p.add_argument("--force", action="store_true", help="replace an existing strip")
    p.set_defaults(func=run)


def tile(frames: np.ndarray, columns: int, scale: int) -> np.ndarray:
    """Frames (T,H,W,3) uint8 -> one image (rows*(S*H+GAP)-GAP, K*(S*W+GAP)-GAP, 3) uint8, row by row."""
    t, h, w, _ = frames.shape
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)  # (T,S*H,S*W,3)
    h, w, rows = h * scale, w * scale, -(-t // columns)
    out = np.full((rows * (h + GAP) - GAP, columns * (w + GAP) - GAP, 3), 40, dtype=np.uint8)
    for k, frame in enumerate(frames):
        y, x = (k // columns) * (h + GAP), (k % columns) * (w + GAP)
        out[y:y + h, x:x + w] = frame
    return out


def run(args) -> int:
    from vidrd.ref.outputs import check_target
    from vidrd.runtime.video_io import encode_png, read_video

    for name in ("every", "scale") + (("columns",) if args.columns is not None else ()):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be >= 1")
    if args.scale > 16:
        raise ValueError(f"--scale={args.scale} must be <= 16 (a strip for docs stays small)")
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out={args.out}: the strip is a PNG; give a name ending in .png")
    if not args.video.exists():
        raise FileNotFoundError(f"video not found: {args.video}")
    check_target(args.out, args.force, "file")
    frames = read_video(args.video)[:: args.every]  # (T,H,W,3)
    image = tile(frames, args.columns or len(frames), args.scale)
    fd, tmp = tempfile.mkstemp(prefix=f".{args.out.name}.", suffix=".png", dir=args.out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(encode_png(image))
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {args.out}: {len(frames)} frames, {image.shape[1]}x{image.shape[0]}")
    return 0
