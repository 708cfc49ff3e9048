"""Video output: .mp4 (H.264), .gif or a folder of PNGs, streamed clip by clip, published atomically."""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from vidrd.ref.outputs import check_target

FORMATS = {".mp4": "mp4", ".gif": "gif", "": "png"}


def output_kind(path: Path) -> str:
    """'mp4', 'gif' or 'png' (a folder of PNGs) from the output's extension."""
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise ValueError(f"output {path}: unknown extension {ext!r}; use .mp4, .gif, or a folder name without "
                         "extension for PNG frames")
    return FORMATS[ext]


# Frame rates every format keeps exactly (GIF stores delays in whole centiseconds, so at most 100 fps there);
# below 0.1 fps, H.264's time base loses the rate (it silently becomes 24 fps) and GIF's delay field overflows.
FPS_RANGE = {"mp4": (0.1, 120.0), "gif": (0.1, 100.0), "png": (0.1, 120.0)}
ENCODERS = {"mp4": ("libx264", "yuv420p"), "gif": ("gif", "pal8")}


def check_fps(kind: str, fps: float) -> None:
    """ValueError unless `fps` is a frame rate that a `kind` file keeps as given."""
    lo, hi = FPS_RANGE[kind]
    if not (isinstance(fps, (int, float)) and lo <= fps <= hi):  # also refuses NaN and inf
        raise ValueError(f"fps={fps!r} must be between {lo:g} and {hi:g} for {kind} output")


def check_frame_size(kind: str, height: int, width: int) -> None:
    """ValueError unless the `kind` encoder accepts (height, width) frames: it is opened in memory, so the limit
    is the encoder's own (libx264: at most 16384 per side; gif: 65535), found before any generation."""
    if kind == "png":
        return
    import av
    codec, pix_fmt = ENCODERS[kind]
    if kind == "mp4" and (height % 2 or width % 2):
        raise ValueError(f"H.264 needs even frame sizes, got {width}x{height}")
    container = av.open(io.BytesIO(), mode="w", format=kind)
    try:
        stream = container.add_stream(codec, rate=8)
        stream.pix_fmt, stream.width, stream.height = pix_fmt, width, height
        stream.codec_context.open()
    except av.error.FFmpegError:
        raise ValueError(f"{width}x{height} frames are too large for {kind} output (the {codec} encoder refuses "
                         "them); make them smaller, or write PNG frames (an output name without extension)") from None
    finally:
        container.close()


def check_output(path: Path, force: bool, *, height: int | None = None, width: int | None = None,
                 fps: float | None = None) -> None:
    """Fail before any work if the output cannot be written: it exists (without force) or is a folder where a
    file goes, its folder is missing or not writable, or the encoder refuses the frame size or rate."""
    path = Path(path)
    kind = output_kind(path)
    check_target(path, force, "frames" if kind == "png" else "file")  # --force replaces only vidrd's own outputs
    if fps is not None:
        check_fps(kind, fps)
    if height is not None and width is not None:
        check_frame_size(kind, height, width)


def _publishable(tmp: Path) -> None:
    """Give a temporary output the permissions of a normal new file or folder (mkstemp/mkdtemp make 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod((0o777 if tmp.is_dir() else 0o666) & ~umask)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """Video (3,T,H,W) in [0,1] -> frames (T,H,W,3) uint8, truncating like the official save_videos_grid."""
    return (video.permute(1, 2, 3, 0) * 255).to(torch.uint8).cpu().numpy()


class VideoWriter:
    """Streams uint8 frames (T,H,W,3) to `path`; the file appears only when `close()` succeeds."""

    def __init__(self, path: Path, fps: float = 8.0, force: bool = False):
        check_output(path, force, fps=fps)
        self.path, self.kind, self.force, self.fps = Path(path), output_kind(path), force, Fraction(fps).limit_denominator(1001)
        self.frames_written = 0
        self._container = self._stream = self._file = None
        if self.kind == "png":
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=self.path.suffix, dir=self.path.parent)
            os.close(fd)
            self._tmp = Path(name)

    def _open(self, h: int, w: int) -> None:
        import av
        # our own file object: when ffmpeg fails to write (a full disk), it may keep its descriptor; ours we close
        self._file = open(self._tmp, "wb")
        self._container = av.open(self._file, mode="w", format=self.kind)
        if self.kind == "mp4":
            if h % 2 or w % 2:
                raise ValueError(f"H.264 needs even frame sizes, got {w}x{h}")
            self._stream = self._container.add_stream("libx264", rate=self.fps, options={"crf": "17"})
            self._stream.pix_fmt = "yuv420p"
        else:
            self._stream = self._container.add_stream("gif", rate=self.fps)
            self._stream.pix_fmt = "pal8"
            self._graph = _palette_graph(w, h, self.fps)
        self._stream.width, self._stream.height = w, h

    def write(self, frames: np.ndarray) -> None:
        """Append frames (T,H,W,3) uint8."""
        import av
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (T,H,W,3), got {frames.dtype} {frames.shape}")
        for rgb in frames:
            if self.kind == "png":
                _write_png(self._tmp / f"frame_{self.frames_written:05d}.png", rgb)
            else:
                if self._container is None:
                    self._open(*rgb.shape[:2])
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                if self.kind == "gif":  # the palette is built from all frames, so they are encoded at close
                    frame.pts = self.frames_written
                    self._graph.push(frame)
                else:
                    for packet in self._stream.encode(frame):
                        self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> Path:
        """Flush and publish atomically (rename over the target); a failure drops the temporary output."""
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        return self.path

    def _finish(self) -> None:
        if self._container is not None:
            if self.kind == "gif":
                for frame in _drain(self._graph):
                    for packet in self._stream.encode(frame):
                        self._container.mux(packet)
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None
            self._file.close()
            self._file = None
        _publishable(self._tmp)
        if self.kind == "png" and self.path.exists():  # only with force, and only a folder of frames (check_target)
            check_target(self.path, self.force, "frames")  # still only frames: nothing foreign was added meanwhile
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old.", dir=self.path.parent))
            os.replace(self.path, old / "frames")
            os.replace(self._tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial output; what was at `path` before stays untouched. Never raises: closing a container on
        a full disk raises the write error again, and the temporary output must go whatever close says."""
        container, self._container, file, self._file = self._container, None, self._file, None
        try:
            if container is not None:
                container.close()
        except Exception:  # noqa: BLE001 - the error that made us abort has been raised already
            pass
        finally:
            if file is not None:
                try:
                    file.close()  # flushing a full disk's buffer raises again; the descriptor is closed anyway
                except OSError:
                    pass
            if self._tmp.is_dir():
                shutil.rmtree(self._tmp, ignore_errors=True)
            else:
                try:
                    self._tmp.unlink(missing_ok=True)
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _palette_graph(w: int, h: int, fps: Fraction):
    """An ffmpeg filter graph that builds one 256-colour palette from all frames and dithers with it."""
    import av
    g = av.filter.Graph()
    src = g.add_buffer(width=w, height=h, format="rgb24", time_base=1 / fps)
    split, gen = g.add("split"), g.add("palettegen", "stats_mode=full")
    use, sink = g.add("paletteuse", "dither=sierra2_4a"), g.add("buffersink")
    src.link_to(split)
    split.link_to(gen, 0, 0)
    split.link_to(use, 1, 0)
    gen.link_to(use, 0, 1)
    use.link_to(sink)
    g.configure()
    return g


def _drain(graph):
    """Close the graph's input and yield every output frame."""
    import av
    graph.push(None)
    while True:
        try:
            frame = graph.pull()
        except (av.error.EOFError, av.error.BlockingIOError):
            return
        frame.pts = None
        yield frame


def encode_png(rgb: np.ndarray) -> bytes:
    """One RGB frame (H,W,3) uint8 as PNG bytes, through PyAV's png encoder."""
    import av
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    return b"".join(bytes(p) for p in codec.encode(frame)) + b"".join(bytes(p) for p in codec.encode(None))


def _write_png(path: Path, rgb: np.ndarray) -> None:
    """One RGB frame (H,W,3) uint8 as a PNG file."""
    path.write_bytes(encode_png(rgb))


def read_video(path: Path) -> np.ndarray:
    """Decode an .mp4/.gif (or a PNG folder) back to frames (T,H,W,3) uint8; for tests and checks."""
    import av
    path = Path(path)
    files = sorted(path.glob("frame_*.png")) if path.is_dir() else [path]
    out = []
    for f in files:
        with av.open(str(f)) as c:
            out += [fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)]
    return np.stack(out)
