"""The service's worker side: run one job on a Runtime, publishing each clip's file as soon as it is decoded, then
the whole videos; and `LocalService`, the single-process backend of `vidrd serve` (one runtime, one worker thread).
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import shutil
import socket
import threading

from vidrd.ref.sampler import SamplerSettings, shorten

from ..loop import Cancelled, Request
from ..video_io import VideoWriter
from .jobs import Registry, ServeConfig, clip_path, job_dir, new_id, storage_health, video_path

log = logging.getLogger("vidrd.serve")


def run_job(rt, results, job_id: str, spec: dict, registry, min_free_bytes: int = 0) -> int:
    """Generate `spec` on `rt` into the job's folder; returns the frames written (all videos of the batch).

    Every file is published atomically (VideoWriter writes a temp file and renames it), so a client never reads a
    partial clip. A results folder with under `min_free_bytes` free fails the job before any file is opened (a
    writer failing on a full disk can keep its file descriptor: PyAV's mp4 muxer). Raises Cancelled when the
    registry flags the job, or whatever failed."""
    request = Request(tuple(spec["prompts"]), tuple(spec["negative_prompts"]), SamplerSettings(**spec["settings"]),
                      spec["seed"])
    fmt, fps = spec["format"], spec["fps"]
    folder = job_dir(results, job_id)
    folder.mkdir(exist_ok=True)  # exists when this is a retry
    free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: the results folder has {free} bytes free, under "
                      f"this service's minimum of {min_free_bytes}")
    videos = []

    def on_step(c: int, i: int) -> None:  # runs after every denoising step: a cancel stops within one step
        if registry.step(job_id, c, i):
            raise Cancelled(f"job {job_id} cancelled at clip {c}, step {i}")

    try:
        for v in range(len(request.prompts)):
            videos.append(VideoWriter(video_path(results, job_id, v, fmt), fps, force=True))
        for clip in rt.generate(request, on_step=on_step):
            for v, frames in enumerate(clip.frames):  # (F',H,W,3) uint8 per prompt
                with VideoWriter(clip_path(results, job_id, clip.index, v, fmt), fps, force=True) as w:
                    w.write(frames)
                videos[v].write(frames)
            registry.clip_done(job_id, clip.index)
    except BaseException:
        for w in videos:
            w.abort()  # never raises; removes the temporary file (a full disk, a removed folder)
        raise
    try:
        for w in videos:
            w.close()  # on failure it drops its own temporary file
    except BaseException:
        for w in videos:
            w.abort()  # the ones not published yet
        raise
    return sum(w.frames_written for w in videos)


def execute(rt, config: ServeConfig, job_id: str, spec: dict, registry) -> str:
    """Run a job and record how it ended in the registry: 'done', 'cancelled' or 'failed' (with the error)."""
    try:
        frames = run_job(rt, config.results, job_id, spec, registry, config.min_free_bytes)
    except Cancelled:
        registry.finish(job_id, "cancelled")
        return "cancelled"
    except Exception as e:  # the job fails, the worker goes on with the next one
        log.exception("job %s failed", job_id)
        registry.finish(job_id, "failed", shorten(f"{type(e).__name__}: {e}", 500))  # it may quote the request
        return "failed"
    registry.finish(job_id, "done", frames=frames)
    return "done"


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class LocalService:
    """The backend of `vidrd serve`: the in-process Registry and one worker thread that owns the Runtime.

    The async methods are what the HTTP routes call (api.make_app); ray.RayBackend has the same ones."""

    def __init__(self, rt, config: ServeConfig):
        self.rt, self.config = rt, config
        self.registry = Registry(config)
        self._queue: queue.Queue = queue.Queue()  # job ids; admission (the bound) is the registry's
        self._thread = threading.Thread(target=self._work, name="vidrd-worker", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        name = worker_name()
        while (job_id := self._queue.get()) is not None:
            spec = self.registry.take(job_id, name)
            if spec is not None:  # None: cancelled while queued
                execute(self.rt, self.config, job_id, spec, self.registry)

    async def submit(self, spec: dict) -> tuple[str | None, tuple[int, str] | None]:
        """(job id, None), or (None, (Retry-After seconds, why)) when the queue or the records are full."""
        job_id = new_id()
        refused = self.registry.submit(job_id, spec)
        if refused:
            return None, refused
        self._queue.put(job_id)
        return job_id, None

    async def status(self, job_id: str) -> dict | None:
        return self.registry.status(job_id)

    async def cancel(self, job_id: str) -> dict | None:
        return self.registry.cancel(job_id)

    async def metrics(self) -> str:
        return self.registry.metrics()

    async def health(self) -> dict:
        alive = self._thread.is_alive()
        problem, disk = storage_health(self.config)
        return {"status": problem or ("ok" if alive else "worker stopped"), "workers": int(alive),
                "queue_depth": self.registry.depth(), "disk": disk}

    def close(self) -> None:
        """Cancel what is queued or running, stop the worker, free the runtime."""
        for job_id in self.registry.open_jobs():
            self.registry.cancel(job_id)
        self._queue.put(None)
        self._thread.join()
        self.rt.close()
        self.registry.close()
