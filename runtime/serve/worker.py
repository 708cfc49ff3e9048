"""The service's worker side: run one job on a Runtime, publishing each clip's file as soon as it is decoded, then
the whole videos; and `LocalService`, the single-process backend of `vidrd serve` (one runtime, one worker thread).

A job of a durable service (ServeConfig.durable) keeps its resume state in its folder, under resume/: after each
clip, that clip's uint8 frames (frames-KKK.safetensors, every video of the batch) and the runtime's Checkpoint
(state.safetensors), each written to a temporary file, synced and renamed. A job started again (after a restart)
loads them: the whole videos are encoded again from the stored frames of the clips before, so they are the frames
an uninterrupted run writes, and the runtime continues from the checkpoint.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vidrd.ref.sampler import SamplerSettings, shorten

from ..loop import Cancelled, Checkpoint, Request, Runtime
from ..video_io import VideoWriter
from .jobs import Registry, ServeConfig, clip_path, job_dir, new_id, published, storage_health, video_path
from .store import Store

log = logging.getLogger("vidrd.serve")


class Interrupted(Exception):
    """The service is stopping: the job ends here unrecorded (it stays running) and resumes at the next start."""


def save_atomic(tensors: dict, path: Path) -> None:
    """safetensors file written whole or not at all: a synced temporary file renamed over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_clip(folder: Path, clip) -> None:
    """A finished clip's resume state: its frames, then the checkpoint that points past it."""
    folder.mkdir(exist_ok=True)
    save_atomic({"frames": torch.from_numpy(clip.frames)}, folder / f"frames-{clip.index:03d}.safetensors")
    ck = clip.checkpoint
    save_atomic({"clip": torch.tensor([ck.clip]), "init_src": ck.init_src, "overlap": ck.overlap, "rng": ck.rng},
                folder / "state.safetensors")


def load_resume(folder: Path) -> Checkpoint | None:
    """The checkpoint of the last clip saved in `folder` (resume/), if any and if every earlier clip's frames are
    there; None (start over) otherwise, with a warning when something is unreadable."""
    if not (folder / "state.safetensors").exists():
        return None
    try:
        t = load_file(folder / "state.safetensors")
        ck = Checkpoint(int(t["clip"][0]), t["init_src"], t["overlap"], t["rng"])
        missing = [k for k in range(ck.clip + 1) if not (folder / f"frames-{k:03d}.safetensors").is_file()]
        if missing:
            raise FileNotFoundError(f"the frames of clips {missing} are missing")
        return ck
    except (OSError, SafetensorError, KeyError, ValueError) as e:
        log.warning("resume state in %s unusable, the job starts over: %s: %s", folder, type(e).__name__, e)
        return None


def spec_request(spec: dict, durable: bool = False) -> Request:
    """The runtime Request of a job's validated spec (api.to_spec)."""
    return Request(tuple(spec["prompts"]), tuple(spec["negative_prompts"]), SamplerSettings(**spec["settings"]),
                   spec["seed"], checkpoints=durable, clip_prompts=tuple(spec.get("clip_prompts") or ()) or None)


class JobFiles:
    """A job's folder: its resume state, each clip's files and the whole videos, every file published atomically
    (VideoWriter writes a temp file and renames it), so a client never reads a partial clip.

    Made before the job runs: leftovers of a run that died are removed, and a results folder with under
    `min_free_bytes` free fails the job before any file is opened (a writer failing on a full disk can keep its file
    descriptor: PyAV's mp4 muxer). `durable`: `resume` is the checkpoint of the last clip saved, if any."""

    def __init__(self, results, job_id: str, spec: dict, min_free_bytes: int = 0, durable: bool = False):
        self.results, self.job_id, self.spec = results, job_id, spec
        self.folder, self.state = job_dir(results, job_id), job_dir(results, job_id) / "resume"
        self.folder.mkdir(exist_ok=True)  # exists when this is a retry
        for tmp in self.folder.glob(".*"):  # temporary files of a run that died: nobody else writes here
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(self.folder).free
        if free < min_free_bytes:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: the results folder has {free} bytes free, "
                          f"under this service's minimum of {min_free_bytes}")
        self.resume = load_resume(self.state) if durable else None
        self.videos: list[VideoWriter] = []

    def open(self, first: int) -> None:
        """The whole videos' writers, with the frames of clips 0..first-1 (done before a restart) written again."""
        fmt, fps = self.spec["format"], self.spec["fps"]
        for v in range(len(self.spec["prompts"])):
            self.videos.append(VideoWriter(video_path(self.results, self.job_id, v, fmt), fps, force=True))
        for k in range(first):  # the clips done before: their frames as they were, into the whole videos
            for v, frames in enumerate(load_file(self.state / f"frames-{k:03d}.safetensors")["frames"].numpy()):
                self.videos[v].write(frames)

    def write(self, clip) -> None:
        """A finished clip: its file per video, appended to the whole videos, its resume state when it has one."""
        fmt, fps = self.spec["format"], self.spec["fps"]
        for v, frames in enumerate(clip.frames):  # (F',H,W,3) uint8 per prompt
            with VideoWriter(clip_path(self.results, self.job_id, clip.index, v, fmt), fps, force=True) as w:
                w.write(frames)
            self.videos[v].write(frames)
        if clip.checkpoint is not None:
            save_clip(self.state, clip)

    def close(self) -> int:
        """Publish the whole videos; the frames written (all videos of the batch)."""
        try:
            for w in self.videos:
                w.close()  # on failure it drops its own temporary file
        except BaseException:
            self.abort()  # the ones not published yet
            raise
        return sum(w.frames_written for w in self.videos)

    def abort(self) -> None:
        for w in self.videos:
            w.abort()  # never raises; removes the temporary file (a full disk, a removed folder)


def run_job(rt, results, job_id: str, spec: dict, registry, min_free_bytes: int = 0, durable: bool = False,
            stop: threading.Event | None = None) -> int:
    """Generate `spec` on `rt` into the job's folder (JobFiles); returns the frames written (all videos of the batch).

    `durable`: save the resume state after each clip and continue from it when there is one. Raises Cancelled when
    the registry flags the job, Interrupted when `stop` is set (after a step), or whatever failed."""
    request = spec_request(spec, durable)
    files = JobFiles(results, job_id, spec, min_free_bytes, durable)

    def on_step(c: int, i: int) -> None:  # runs after every denoising step: a cancel stops within one step
        if registry.step(job_id, c, i):
            raise Cancelled(f"job {job_id} cancelled at clip {c}, step {i}")
        if stop is not None and stop.is_set():
            raise Interrupted(f"job {job_id} interrupted at clip {c}, step {i}")

    def on_preview(c: int, i: int, frames) -> None:  # (B,F,H,W,3) uint8, on the runtime's preview thread
        registry.preview(job_id, c, i, frames)

    if getattr(rt, "previews", None) is None:  # LocalService attaches them when the model has a tiny decoder
        on_preview = None

    resume, stream = files.resume, None
    if resume is not None:
        try:  # validated now, generated when iterated
            stream = rt.generate(replace(request, resume=resume), on_step=on_step, on_preview=on_preview)
        except ValueError as e:  # a checkpoint of another request shape: the request itself is checked below
            log.warning("job %s: its resume state does not fit its request, it starts over: %s", job_id, e)
            resume = None
    first = 0 if resume is None else resume.clip + 1
    registry.start_at(job_id, first)
    try:
        files.open(first)
        for clip in stream or rt.generate(request, on_step=on_step, on_preview=on_preview):
            assert clip.index >= first, f"clip {clip.index} of a generation resumed at clip {first}"
            files.write(clip)
            registry.clip_done(job_id, clip.index)
    except BaseException:
        files.abort()
        raise
    return files.close()


def execute(rt, config: ServeConfig, job_id: str, spec: dict, registry, stop: threading.Event | None = None) -> str:
    """Run a job and record how it ended in the registry: 'done', 'cancelled' or 'failed' (with the error); or
    'interrupted' (`stop` set or the lease lost: nothing recorded, the job resumes at the next start or on another
    worker); 'lost' when the registry did not take the end (the job had ended, or another worker leased it)."""
    try:
        frames = run_job(rt, config.results, job_id, spec, registry, config.min_free_bytes, config.durable, stop)
    except Interrupted:
        return "interrupted"
    except Cancelled:
        end = "cancelled"
        recorded = registry.finish(job_id, end)
    except Exception as e:  # the job fails, the worker goes on with the next one
        log.exception("job %s failed", job_id)
        end = "failed"
        recorded = registry.finish(job_id, end, shorten(f"{type(e).__name__}: {e}", 500))  # it may quote the request
    else:
        end = "done"
        recorded = registry.finish(job_id, end, frames=frames)
    if not recorded:  # it ended elsewhere, or another worker holds it now: its resume state is not ours to drop
        return "lost"
    shutil.rmtree(job_dir(config.results, job_id) / "resume", ignore_errors=True)  # an ended job never resumes
    return end


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class LocalService:
    """The backend of `vidrd serve`: the in-process Registry and one worker thread that owns the Runtime: one job
    at a time, or with config.batch_jobs > 1 batches of compatible jobs (batching.BatchWorker; `rt` then needs the
    buffers of config.runtime_limits()).

    The async methods are what the HTTP routes call (api.make_app); ray.RayBackend has the same ones. Jobs the
    store holds open from an earlier run are taken first, in submission order: the one that was running resumes
    from its last finished clip. With a tiny decoder (preview.TinyDecoder of the model's latents) and
    config.preview_every > 0, running jobs publish a preview every preview_every steps (events.py)."""

    def __init__(self, rt, config: ServeConfig, store: Store | None = None, tiny=None):
        self.rt, self.config = rt, config
        if config.batch_jobs > 1 and not isinstance(rt, Runtime):
            raise ValueError(f"batch_jobs={config.batch_jobs} needs the lean runtime (not {type(rt).__name__})")
        if config.batch_jobs > 1 and rt.limits.batch < config.runtime_limits().batch:
            raise ValueError(f"batch_jobs={config.batch_jobs} needs a runtime with room for "
                             f"{config.runtime_limits().batch} prompts (ServeConfig.runtime_limits); this one has "
                             f"{rt.limits.batch}")
        self.previews = tiny is not None and config.preview_every > 0
        if self.previews:
            from ..preview import Previews
            rt.previews = Previews(tiny, rt.limits, rt.model.vae.cfg.scaling_factor, config.preview_every,
                                   device=rt.device)
        self.registry = Registry(config, store=store)
        self._queue: queue.Queue = queue.Queue()  # job ids; admission (the bound) is the registry's
        for job_id in self.registry.open_jobs():
            self._queue.put(job_id)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="vidrd-worker", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        name = worker_name()
        if self.config.batch_jobs > 1:  # compatible jobs share the UNet batch (batching.py)
            from .batching import BatchWorker
            BatchWorker(self.rt, self.config, self.registry, self.config.batch_jobs, name, self._stop,
                        self.previews).run(self._queue)
            return
        while (job_id := self._queue.get()) is not None and not self._stop.is_set():
            spec = self.registry.take(job_id, name)
            if spec is not None:  # None: cancelled while queued
                execute(self.rt, self.config, job_id, spec, self.registry, self._stop)

    async def submit(self, spec: dict) -> tuple[str | None, tuple[int, int, str] | None]:
        """(job id, None), or (None, (HTTP status, Retry-After seconds, why)) when it is refused (Registry.submit)."""
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

    def events(self, job_id: str, now: dict, last_id: int | None):
        """The job's Server-Sent Events (bytes), from its status `now` on (events.Hub.stream)."""
        return self.registry.events.stream(job_id, now, last_id)

    async def preview(self, job_id: str) -> tuple | None:
        """(clip, step, (B,H,W,3) uint8) of the job's latest preview, None before it or after the end."""
        return self.registry.events.latest(job_id)

    async def health(self) -> dict:
        alive = self._thread.is_alive()
        problem, disk = storage_health(self.config)
        return {"status": problem or ("ok" if alive else "worker stopped"), "workers": int(alive),
                "queue_depth": self.registry.depth(), "disk": disk}

    def close(self) -> None:
        """Stop the worker (the running job after its current step), free the runtime, close the store. Open jobs
        stay open in the store: the next service on it runs them, the interrupted one from its last clip."""
        self._stop.set()
        self._queue.put(None)
        self._thread.join()
        if self.previews:
            self.rt.previews.close()
        self.rt.close()
        self.registry.close()


class Leased:
    """run_job's registry for a worker that shares the store through a lease (`run_claimed`): each step renews the
    lease (recording the progress, reading the cancel flag), each clip is recorded, and every write, the end
    included, happens only while this worker still holds the lease: one that lost it stops (Interrupted) and
    records nothing."""

    def __init__(self, store: Store, job: dict, worker: str, lease_s: float):
        self.store, self.job, self.worker, self.lease_s = store, job, worker, lease_s
        self.steps = job["spec"]["settings"]["steps"]

    def step(self, job_id: str, c: int, i: int) -> bool:
        cancel = self.store.renew(job_id, self.worker, self.lease_s, steps_done=c * self.steps + i + 1)
        if cancel is None:
            raise Interrupted(f"job {job_id}: {self.worker} lost its lease (another worker took the job over)")
        return cancel

    def start_at(self, job_id: str, clips: int) -> None:
        self._write(clips_done=clips, steps_done=clips * self.steps, files=published(self.job["spec"], clips, False))

    def clip_done(self, job_id: str, k: int) -> None:
        assert k == self.job["clips_done"], f"clip {k} published out of order (expected {self.job['clips_done']})"
        self._write(clips_done=k + 1, steps_done=(k + 1) * self.steps, first_clip=self.job["first_clip"] or time.time(),
                    files=published(self.job["spec"], k + 1, done=False))

    def finish(self, job_id: str, state: str, error: str | None = None, frames: int = 0) -> bool:
        """Record the end: False (nothing written) when this worker no longer holds the job."""
        self.job.update(state=state, error=error, finished=time.time(),
                        files=published(self.job["spec"], self.job["clips_done"], done=state == "done"))
        return self.store.update(self.job, holder=self.worker)

    def _write(self, **fields) -> None:
        self.job.update(fields)
        if not self.store.update(self.job, holder=self.worker):
            raise Interrupted(f"job {self.job['id']}: {self.worker} lost its lease (another worker took it over)")


def run_claimed(rt, config: ServeConfig, store: Store, worker: str, stop: threading.Event | None = None) -> int:
    """Claim and run jobs of a store shared by several workers (Ray replicas on one PostgreSQL database) until none
    is claimable or `stop` is set: the number of jobs taken. A job whose worker died is claimable once its lease
    (config.lease_s, renewed every step) expired, and resumes from its last clip (the results folder is shared)."""
    taken = 0
    while not (stop is not None and stop.is_set()) and (job := store.claim(worker, config.lease_s)) is not None:
        taken += 1
        log.info("job %s: %s takes it (attempt %d, from clip %d)", job["id"], worker, job["attempts"],
                 job["clips_done"])
        execute(rt, config, job["id"], job["spec"], Leased(store, job, worker, config.lease_s), stop)
    return taken
