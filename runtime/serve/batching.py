"""The service's batching worker (`vidrd serve --batch-jobs K`, K > 1): queued jobs whose settings match (batch.key)
share one UNet batch of up to K jobs on the service's runtime (runtime/batch.py).

Between two clips the worker admits queued jobs that fit the batch, in submission order (into an empty batch, every
waiting job that fits the oldest one); while the oldest waiting job does not fit the running batch, nothing joins it,
so that job starts once the batch has drained and no job waits behind a stream of newer compatible ones. A job is
validated before it is admitted (a job that fails validation never enters a batch), and each job streams its clips
to its own files as the one-at-a-time worker does (worker.JobFiles). A cancel ends the job after the current step
(its record, files and events at once; its rows run to the end of the clip and are then freed); a job whose files
cannot be written fails alone. A failure of the runtime itself fails every job of the batch. When the service stops,
the running jobs stay running in the store and resume from their last clip. A job that cannot share a batch
(batch.alone: per-clip prompts, continuation "fifo") runs on its own, as with K = 1, when no batch is running.
"""
from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from dataclasses import replace

from vidrd.ref.sampler import shorten

from ..batch import Batch, Member, alone
from ..loop import Cancelled
from .jobs import ServeConfig, job_dir
from .worker import Interrupted, JobFiles, execute, spec_request

log = logging.getLogger("vidrd.serve")
# An idle worker that takes a job waits this long before starting it, so that jobs submitted together start in one
# batch instead of the first running a clip alone (dynamic batching's queue delay; small against a clip's seconds)
GATHER_S = 0.05


class BatchWorker:
    """Runs the jobs of a LocalService's queue in batches on its runtime; `run` is the worker thread's body."""

    def __init__(self, rt, config: ServeConfig, registry, jobs: int, name: str, stop: threading.Event,
                 previews: bool = False):
        self.rt, self.config, self.registry, self.name, self.stop = rt, config, registry, name, stop
        self.batch = Batch(rt, jobs)
        self.previews = previews
        self.waiting: list[str] = []  # job ids in submission order, not admitted yet
        self.files: dict[Member, JobFiles] = {}  # the open jobs' folders

    def run(self, jobs: queue.Queue) -> None:
        """Until the queue yields None or `stop` is set: admit between clips, run a clip, publish its files."""
        while not self.stop.is_set():
            if not self.batch.members and not self.waiting:
                job_id = jobs.get()  # idle: wait for a job, and briefly for those that come with it
                if job_id is None:
                    return
                self.waiting.append(job_id)
                time.sleep(GATHER_S)
            while True:  # whatever else arrived: admitted at this clip boundary if it fits
                try:
                    job_id = jobs.get_nowait()
                except queue.Empty:
                    break
                if job_id is None:
                    self._interrupt()
                    return
                self.waiting.append(job_id)
            self.admit()
            if self.batch.members:
                self.clip()

    def admit(self) -> None:
        """Queued jobs into the batch, in submission order, while they fit. Into an empty batch every waiting job
        that fits the first one; into a running batch none while the oldest waiting job does not fit it, so that
        job starts once the batch has drained."""
        running = bool(self.batch.members)
        for job_id in list(self.waiting):
            st = self.registry.status(job_id)
            if st is None or st["state"] not in ("queued", "running"):  # cancelled or expired while it waited
                self.waiting.remove(job_id)
                continue
            spec = st["request"]
            try:
                request = spec_request(spec)
                solo, fits = alone(request) is not None, self.batch.fits(request.settings)
            except ValueError:  # admission fails it below, alone
                solo, fits = False, not self.batch.members
            if solo and not self.batch.members:  # per-clip prompts, fifo: the one-at-a-time path, as K = 1 runs it
                self.waiting.remove(job_id)
                self.solo(job_id)
                if self.stop.is_set():
                    return
                continue
            fits = fits and not solo
            room = (len(self.batch.members) < self.batch.jobs
                    and self.batch.rows + len(spec["prompts"]) <= self.rt.limits.batch)
            if not (fits and room):
                if running and job_id == self.waiting[0]:
                    break  # the oldest waits for the batch to drain; nothing newer joins meanwhile
                continue
            self.waiting.remove(job_id)
            self.start(job_id)

    def solo(self, job_id: str) -> None:
        """A job that cannot share a batch (batch.alone), run on its own as the one-at-a-time worker runs it."""
        spec = self.registry.take(job_id, self.name)
        if spec is not None:  # None: cancelled meanwhile
            execute(self.rt, self.config, job_id, spec, self.registry, self.stop)

    def start(self, job_id: str) -> None:
        """Take a job, check it, open its files, add it to the batch; any failure ends it here, alone."""
        spec = self.registry.take(job_id, self.name)
        if spec is None:  # cancelled meanwhile
            return
        files = member = None
        try:
            request = spec_request(spec, self.config.durable)
            files = JobFiles(self.config.results, job_id, spec, self.config.min_free_bytes, self.config.durable)
            if files.resume is not None:
                try:
                    self.batch.check(replace(request, resume=files.resume))
                    request = replace(request, resume=files.resume)
                except ValueError as e:  # a checkpoint of another request shape: the request is checked below
                    log.warning("job %s: its resume state does not fit its request, it starts over: %s", job_id, e)
            on_preview = self._on_preview(job_id) if self.previews else None
            member = self.batch.admit(request, on_step=self._on_step(job_id), on_preview=on_preview, tag=job_id)
            self.registry.start_at(job_id, member.clip)
            files.open(member.clip)
        except Exception as e:  # noqa: BLE001 - the job fails, the batch goes on
            if member is not None:
                self.batch.drop(member, e)
            if files is not None:
                files.abort()
            self._end(job_id, "failed", e)
            return
        self.files[member] = files

    def clip(self) -> None:
        """One clip of the batch; then each job's files, and the end of those that finished."""
        size = len(self.batch.members)
        try:
            ran = self.batch.run_clip(after_step=self._after_step)
        except Interrupted:
            self._interrupt()
            return
        except Exception as e:  # noqa: BLE001 - the runtime failed: every job of the batch fails, the worker goes on
            log.exception("a batch of %d jobs failed", size)
            for m, files in list(self.files.items()):
                files.abort()
                self._end(m.tag, "failed", e)
            self.files.clear()
            return
        for m in ran:
            files, job_id = self.files.get(m), m.tag
            if files is None:  # ended during the clip (cancelled)
                continue
            if m.error is not None or m.out is None:  # dropped (cancelled) or its clip failed
                files.abort()
                del self.files[m]
                self._end(job_id, "cancelled" if isinstance(m.error, Cancelled) else "failed", m.error)
                continue
            try:
                files.write(m.out)
                self.registry.clip_done(job_id, m.out.index, batch=size)
                if m.done:
                    frames = files.close()
                    del self.files[m]
                    self._end(job_id, "done", frames=frames)
            except Exception as e:  # noqa: BLE001 - its storage failed: this job fails, the others go on
                log.exception("job %s failed", job_id)
                self.batch.drop(m, e)
                files.abort()
                self.files.pop(m, None)
                self._end(job_id, "failed", e)

    def _on_step(self, job_id: str):
        def on_step(c: int, i: int) -> None:  # after every step of the job: a cancel ends it here
            if self.registry.step(job_id, c, i):
                for m, files in list(self.files.items()):
                    if m.tag == job_id:
                        files.abort()
                        del self.files[m]
                        break
                self._end(job_id, "cancelled")
                raise Cancelled(f"job {job_id} cancelled at clip {c}, step {i}")
        return on_step

    def _on_preview(self, job_id: str):
        def on_preview(c: int, i: int, frames) -> None:  # (b,F,H,W,3) uint8, on the runtime's preview thread
            self.registry.preview(job_id, c, i, frames)
        return on_preview

    def _after_step(self, i: int) -> None:
        if self.stop.is_set():
            raise Interrupted(f"the service is stopping (step {i})")

    def _interrupt(self) -> None:
        """The service stops: temporary files go, the jobs stay running in the store and resume at the next start."""
        for files in self.files.values():
            files.abort()
        self.files.clear()
        for m in list(self.batch.members):
            self.batch.drop(m)

    def _end(self, job_id: str, state: str, error: BaseException | None = None, frames: int = 0) -> None:
        """Record how a job ended, as worker.execute does (the registry keeps a job's first end); an ended job
        never resumes."""
        why = None if error is None or state != "failed" else shorten(f"{type(error).__name__}: {error}", 500)
        if self.registry.finish(job_id, state, why, frames=frames):  # it may quote the request: shortened
            if state == "failed":
                log.warning("job %s failed: %s", job_id, why)
            shutil.rmtree(job_dir(self.config.results, job_id) / "resume", ignore_errors=True)
