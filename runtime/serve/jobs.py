"""The service's job registry: bounded admission and records, states and progress, cancel flags, TTL janitor,
storage health, Prometheus metrics.

One Registry holds every job of a service. `vidrd serve` keeps it in-process; `vidrd serve --ray` runs the same
class as one named Ray actor that every replica talks to, so any replica can answer for any job. Its methods take
and return plain, picklable values (job ids, dicts, numbers) for that reason.

Records are durable: the Registry writes every change of a record to its Store (store.py: SQLite or PostgreSQL)
before it answers, and reads the records back when it starts, so a restarted service knows every job it accepted.
Progress within a clip (steps_done) and the metrics are kept in memory only: a restart resumes a job from its last
finished clip, whose progress is recorded.
"""
from __future__ import annotations

import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from vidrd.ref.config import LATENT_FACTOR, SchedulerConfig
from vidrd.ref.ddim import SPACINGS

from ..loop import Limits
from .callbacks import Sender
from .events import Hub
from .store import Store, open_store

STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
FORMATS = ("mp4", "gif")
ID_PATTERN = r"^[0-9a-f]{32}$"  # secrets.token_hex(16): the only request-derived part of any path
_ID = re.compile(ID_PATTERN)
# a job cancelled before it started has no files: its record (GET says "cancelled") is kept this long at most, and
# is the first to go when the records are at --max-records, so submit-then-cancel cannot hold records until the TTL
CANCELLED_GRACE_S = 60.0
log = logging.getLogger("vidrd.serve")


@dataclass(frozen=True)
class ServeConfig:
    """What a service accepts and keeps: per-request limits (its runtime's, whose buffers are sized from them),
    queue, TTL. Frozen dataclasses all the way down, so Ray can hand it to every replica."""
    results: str = "vidrd-results"  # job folders live here (shared by all replicas under Ray)
    queue_size: int = 8  # jobs waiting for a runtime; one more gets 429
    max_records: int = 2000  # job records held (open, and finished until their TTL); one more submission gets 429
    submit_rate: float = 5.0  # submissions per second per client address, sustained (token bucket); more get 429
    submit_burst: int = 20  # ... and at once
    ttl_s: float = 3600.0  # a finished job's files and record are deleted this long after it ends
    limits: Limits = Limits(clips=8)  # the largest request (Limits.check); open_runtime sizes the buffers from it
    max_prompt_chars: int = 1000
    max_body_bytes: int = 65536
    read_timeout_s: float = 30.0  # a client must send a request's headers, and then its body, within this time
    max_header_bytes: int = 16384  # request headers larger than this get 431 and the connection closed
    send_timeout_s: float = 30.0  # a client that reads nothing of a response for this long is disconnected
    max_downloads: int = 32  # clip and video downloads in progress at once; one more gets 503 + Retry-After
    min_free_bytes: int = 64 << 20  # /healthz answers 503 "low disk space" when the results folder has less free
    api_key: str | None = None
    # what a request that leaves a setting out gets: (name, value) pairs over the official defaults (the embedded
    # model's own settings, runtime/shapes), and the negative prompt
    defaults: tuple = ()
    negative_prompt: str = "watermark"
    # why the runtime's UNet cannot reuse features (an exported graph, --compile: quality.feature_reuse_blocker), so
    # requests asking for it are refused and quality presets leave it off; None: it can
    feature_reuse_off: str | None = None
    # the model's schedule (for_model): a request's steps must fit it (DDIM.check_steps, as the sampler checks
    # them); None: not known (only limits.steps bounds requests)
    scheduler: SchedulerConfig | None = None
    # the SQLite file or postgresql:// URL of the job records (store.py); None: jobs.db in the results folder.
    # ":memory:" keeps them in memory only: a restart forgets every job, and running jobs save no resume state
    jobs_db: str | None = None
    # webhooks (callbacks.py): whether requests may give a callback_url, whether it may be a loopback or private
    # address, and each try's timeout and the retries after a failed one
    callbacks: bool = True
    allow_private_callbacks: bool = False
    callback_timeout_s: float = 5.0
    callback_retries: int = 3
    # workers sharing a store (store.py leases: Ray replicas on PostgreSQL) renew a job's lease every step; one that
    # stops renewing (a lost replica) loses the job to another worker this long after its last renewal. It must
    # exceed the longest time between two steps (a clip's decode and files, the first step's text encoding)
    lease_s: float = 30.0
    # a preview of a running job every this many steps (events.py), when the model has a tiny decoder; 0: none
    preview_every: int = 5
    # jobs whose settings match (runtime/batch.py key) that share one UNet batch (serve/batching.py); 1: one job at a
    # time. The runtime's buffers hold batch_jobs x limits.batch prompts (runtime_limits)
    batch_jobs: int = 1

    def jobs_path(self) -> str:
        return self.jobs_db or os.path.join(self.results, "jobs.db")

    def runtime_limits(self) -> Limits:
        """The service runtime's buffers: a request's limits, with room for batch_jobs of the largest batch."""
        return replace(self.limits, batch=self.limits.batch * self.batch_jobs)

    @property
    def durable(self) -> bool:
        return self.jobs_path() != ":memory:"

    def validate(self) -> None:
        lim = self.limits
        for name, v in (("batch", lim.batch), ("frames", lim.frames), ("height", lim.height), ("width", lim.width),
                        ("steps", lim.steps), ("clips", lim.clips),
                        *((name, getattr(self, name)) for name in ("queue_size", "max_prompt_chars", "max_body_bytes",
                                                                   "max_records", "submit_burst", "max_header_bytes",
                                                                   "max_downloads", "batch_jobs"))):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if lim.height % LATENT_FACTOR or lim.width % LATENT_FACTOR:
            raise ValueError(f"height={lim.height}, width={lim.width} limits must be multiples of {LATENT_FACTOR}")
        if not 0 <= lim.overlap < lim.frames:
            raise ValueError(f"overlap={lim.overlap} limit must be in [0, frames={lim.frames})")
        if not isinstance(self.min_free_bytes, int) or self.min_free_bytes < 0:
            raise ValueError(f"min_free_bytes={self.min_free_bytes!r} must be an integer >= 0")
        if not (isinstance(self.submit_rate, (int, float)) and 0 < self.submit_rate < float("inf")):
            raise ValueError(f"submit_rate={self.submit_rate!r} must be a number of submissions per second > 0")
        if isinstance(self.preview_every, bool) or not isinstance(self.preview_every, int) or self.preview_every < 0:
            raise ValueError(f"preview_every={self.preview_every!r} must be a whole number of steps >= 0")
        if not isinstance(self.callback_retries, int) or self.callback_retries < 0:
            raise ValueError(f"callback_retries={self.callback_retries!r} must be an integer >= 0")
        for name in ("ttl_s", "read_timeout_s", "send_timeout_s", "callback_timeout_s", "lease_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise ValueError(f"{name}={v!r} must be a number of seconds > 0")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("the API key must have at least 8 characters")

    def for_model(self, model) -> ServeConfig:
        """This config with the model's schedule; ValueError unless the steps limit (--max-steps) fits the schedule
        of at least one spacing, so that a request at the limit can run."""
        most = tuple((spacing, model.scheduler.max_steps(spacing)) for spacing in SPACINGS)
        if all(self.limits.steps > n for _, n in most):
            raise ValueError(f"--max-steps {self.limits.steps} exceeds what the model's schedule of "
                             f"{model.scheduler.cfg.num_train_timesteps} training timesteps allows ("
                             + ", ".join(f"{n} with {spacing} spacing" for spacing, n in most) + ")")
        return replace(self, scheduler=model.scheduler.cfg)


def new_id() -> str:
    return secrets.token_hex(16)


def valid_id(job_id: str) -> bool:
    return bool(_ID.match(job_id))


def job_dir(results: str | Path, job_id: str) -> Path:
    assert valid_id(job_id), f"not a job id: {job_id!r}"
    return Path(results) / job_id


def clip_path(results, job_id: str, k: int, video: int, fmt: str) -> Path:
    return job_dir(results, job_id) / f"clip-{k:03d}-{video}.{fmt}"


def video_path(results, job_id: str, video: int, fmt: str) -> Path:
    return job_dir(results, job_id) / f"video-{video}.{fmt}"


def published(spec: dict, clips: int, done: bool) -> list[str]:
    """The names of a job's published files in its folder: clips 0..clips-1 of every video, and when `done` the
    whole videos."""
    fmt, n = spec["format"], len(spec["prompts"])
    return ([f"clip-{k:03d}-{v}.{fmt}" for k in range(clips) for v in range(n)]
            + ([f"video-{v}.{fmt}" for v in range(n)] if done else []))


def storage_health(config: ServeConfig) -> tuple[str | None, dict]:
    """(problem or None, disk) of the results folder for /healthz: missing, not a folder, or under min_free_bytes
    free (a job would fail writing its files). Never recreates the folder: a vanished mount must show, not be
    papered over by a folder on another disk."""
    disk = {"results": str(config.results), "free_bytes": None, "min_free_bytes": config.min_free_bytes}
    if not os.path.isdir(config.results):
        return f"results folder {config.results} is missing", disk
    try:
        disk["free_bytes"] = shutil.disk_usage(config.results).free
    except OSError as e:
        return f"results folder {config.results} unusable: {e.strerror or e}", disk
    if disk["free_bytes"] < config.min_free_bytes:
        return "low disk space", disk
    return None, disk


def sweep_folders(root: Path, known: set, gone: list, ttl: float, now: float) -> None:
    """Delete the folders of the `gone` jobs, and job folders of no `known` job that are older than the TTL."""
    for path in root.iterdir():  # OSError when the folder is gone: the janitor logs it and tries again
        if not valid_id(path.name) or path.name in known:
            continue  # never touch anything that is not a job folder
        try:
            old = path.name in gone or path.stat().st_mtime + ttl < now
        except FileNotFoundError:
            continue
        if old:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


@dataclass
class Job:
    """A job's record; `spec` is the validated request (see api.to_spec)."""
    id: str
    spec: dict
    created: float
    state: str = "queued"
    started: float | None = None
    finished: float | None = None
    first_clip: float | None = None
    clips_done: int = 0
    steps_done: int = 0
    last_step: float | None = None
    cancel: bool = False
    error: str | None = None
    worker: str | None = None
    attempts: int = 0
    files: list = field(default_factory=list)  # published files, relative to the job's folder

    def expires(self, ttl_s: float) -> float | None:
        """When the record (and its files) go: TTL after the end; sooner for a job cancelled before it started."""
        if self.finished is None:
            return None
        unstarted = self.state == "cancelled" and self.started is None
        return self.finished + (min(ttl_s, CANCELLED_GRACE_S) if unstarted else ttl_s)

    def status(self, ttl_s: float) -> dict:
        s = self.spec["settings"]
        return {"id": self.id, "state": self.state, "error": self.error, "cancel_requested": self.cancel,
                "videos": len(self.spec["prompts"]), "format": self.spec["format"], "clips": s["clips"],
                "clips_done": self.clips_done, "steps_per_clip": s["steps"], "steps_done": self.steps_done,
                "steps_total": s["clips"] * s["steps"], "worker": self.worker, "attempts": self.attempts,
                "created": self.created, "started": self.started, "finished": self.finished,
                "expires": self.expires(ttl_s), "request": self.spec}


BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
STAGES = ("queue_wait", "first_clip", "denoise_step", "run", "total")
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)  # jobs in one UNet batch


@dataclass
class Histogram:
    """Cumulative-bucket histogram, rendered in the Prometheus text format."""
    buckets: tuple = BUCKETS
    counts: list = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = self.counts or [0] * (len(self.buckets) + 1)

    def observe(self, v: float) -> None:
        i = next((j for j, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += v
        self.n += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip((*self.buckets, "+Inf"), self.counts):
            acc += c
            out.append(f'{name}_bucket{{{labels},le="{b}"}} {acc}')
        return out + [f"{name}_sum{{{labels}}} {self.total:.6f}", f"{name}_count{{{labels}}} {self.n}"]


class Registry:
    """Every job of one service; thread-safe (HTTP handlers, workers and the janitor call it concurrently)."""

    def __init__(self, config: ServeConfig, janitor_period_s: float | None = None, store: Store | None = None):
        """Opens `store` (default: config.jobs_path(); StoreError when it is unusable) and takes over its records:
        a running job whose cancel was requested ends cancelled; other open jobs stay open (open_jobs)."""
        self.config = config
        self.jobs: dict[str, Job] = {}
        self.rejected = 0
        self.hist = {stage: Histogram() for stage in STAGES}
        self.batch_hist = Histogram(BATCH_BUCKETS)  # jobs in the UNet batch of each finished clip of each job
        self.batch_sizes: Counter = Counter()  # the same, by exact size (benchmarks)
        self.frames_total, self.run_seconds_total, self.last_fps = 0, 0.0, 0.0
        self._leased: dict[str, float] = {}  # job id: when its lease was last renewed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.events = Hub()  # live events and previews of open jobs (events.py)
        Path(config.results).mkdir(parents=True, exist_ok=True)
        self.callbacks = (Sender(config.callback_timeout_s, config.callback_retries, config.allow_private_callbacks)
                          if config.callbacks else None)
        self.store = store or open_store(config.jobs_path())
        for row in self.store.load():
            job = self.jobs[row["id"]] = Job(**row)
            if job.state == "running" and job.cancel:  # asked to stop before the restart: it stays stopped
                self._end(job, "cancelled", None)
        self.sweep()
        period = janitor_period_s or min(60.0, max(0.5, config.ttl_s / 4))
        self._janitor = threading.Thread(target=self._janitor_loop, args=(period,), daemon=True,
                                         name="vidrd-janitor")
        self._janitor.start()

    # ------------------------------------------------------------------------------------------ clients

    def submit(self, job_id: str, spec: dict) -> tuple[int, int, str] | None:
        """Queue a job: None, or (HTTP status, Retry-After seconds, why) when it is refused (not recorded): 429 when
        the queue or the records are full, 503 when the store cannot write it (a full disk). At the records bound,
        jobs cancelled before they started are forgotten first, oldest first."""
        with self._lock:
            if job_id in self.jobs:
                raise ValueError(f"job id {job_id} already exists")
            if self._depth() >= self.config.queue_size:
                self.rejected += 1
                return 429, self._retry_after(), f"the queue is full ({self.config.queue_size} jobs waiting)"
            if len(self.jobs) >= self.config.max_records:
                self._forget_unstarted(len(self.jobs) - self.config.max_records + 1)
            if len(self.jobs) >= self.config.max_records:
                self.rejected += 1
                ends = [j.expires(self.config.ttl_s) for j in self.jobs.values() if j.finished is not None]
                retry = math.ceil(min(ends) - time.time()) if ends else self._retry_after()
                return 429, max(1, retry), f"the service holds {self.config.max_records} job records"
            job = Job(job_id, spec, time.time())
            try:  # first: a job is accepted only once it is recorded
                self.store.insert(asdict(job))
            except self.store.errors as e:
                log.warning("job store: cannot record a new job: %s", e)
                return 503, self._retry_after(), f"the job store cannot record the job ({e})"
            self.jobs[job_id] = job
            self._publish(job, "queued")
            return None

    def status(self, job_id: str) -> dict | None:
        with self._lock:
            job = self.jobs.get(job_id)
            return None if job is None else job.status(self.config.ttl_s)

    def cancel(self, job_id: str) -> dict | None:
        """Queued: cancelled now. Running: flagged; the worker stops after its current step."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job.state == "queued":
                self._end(job, "cancelled", None)
            elif job.state == "running" and not job.cancel:
                job.cancel = True
                self._save(job)
            return job.status(self.config.ttl_s)

    def open_jobs(self) -> list[str]:
        """Queued and running jobs, in submission order."""
        with self._lock:
            return [j.id for j in self.jobs.values() if j.state not in FINISHED]

    def settings(self) -> ServeConfig:
        return self.config

    def depth(self) -> int:
        with self._lock:
            return self._depth()

    # ------------------------------------------------------------------------------------------ workers

    def take(self, job_id: str, worker: str) -> dict | None:
        """A worker starts a job: its spec, or None when it was cancelled or expired meanwhile. The worker says next
        which clip it starts from (start_at).

        A job already running is handed out again: after a restart, or under Ray a retry after its replica died."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None or job.state not in ("queued", "running"):
                return None
            if job.state == "queued":
                job.started = time.time()
                self.hist["queue_wait"].observe(job.started - job.created)
            job.state, job.worker, job.attempts = "running", worker, job.attempts + 1
            job.last_step = None
            self._save(job)
            self._lease(job, time.time(), force=True)
            self._publish(job, "started")
            return job.spec

    def start_at(self, job_id: str, clips: int) -> None:
        """The worker runs the job from clip `clips` on: clips 0..clips-1 are done (resumed), or none (clips=0)."""
        with self._lock:
            job = self.jobs[job_id]
            job.clips_done, job.steps_done = clips, clips * job.spec["settings"]["steps"]
            job.files = published(job.spec, clips, done=False)
            self._save(job)

    def step(self, job_id: str, c: int, i: int) -> bool:
        """Step i of clip c is done; True when the job should stop (cancel requested)."""
        now = time.time()
        with self._lock:
            job = self.jobs[job_id]
            if i > 0 and job.last_step is not None:  # step durations within a clip (no text/decode time)
                self.hist["denoise_step"].observe(now - job.last_step)
            job.last_step = now
            job.steps_done = c * job.spec["settings"]["steps"] + i + 1
            self._lease(job, now)
            self._publish(job, "step")
            return job.cancel

    def clip_done(self, job_id: str, k: int, batch: int = 1) -> None:
        """Clip k of the job is published; it ran in a UNet batch of `batch` jobs."""
        with self._lock:
            self.batch_hist.observe(batch)
            self.batch_sizes[batch] += 1
            job = self.jobs[job_id]
            assert k == job.clips_done, f"clip {k} published out of order (expected {job.clips_done})"
            job.clips_done = k + 1
            # the clip is published once the next clip's first step ran (CPU decode): progress never goes back
            job.steps_done = max(job.steps_done, job.clips_done * job.spec["settings"]["steps"])
            job.files = published(job.spec, job.clips_done, done=False)
            if job.first_clip is None:
                job.first_clip = time.time()
                self.hist["first_clip"].observe(job.first_clip - job.started)
            self._save(job)
            self._notify(job, "clip")
            self._publish(job, "clip", clip=k)

    def finish(self, job_id: str, state: str, error: str | None = None, frames: int = 0) -> bool:
        """End a job (True); a job that already ended keeps its first end (e.g. a lost replica reported twice)."""
        assert state in FINISHED, state
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None or job.state in FINISHED:
                return False
            self._end(job, state, error)
            if state == "done" and job.started is not None:
                run = job.finished - job.started
                self.frames_total += frames
                self.run_seconds_total += run
                self.last_fps = frames / run if run > 0 else 0.0
            return True

    def preview(self, job_id: str, clip: int, step: int, frames) -> None:
        """A preview of a running job (Runtime.generate's on_preview, on the preview thread): frames (B,F,H,W,3)."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job is not None and job.state == "running":
                self.events.preview(job_id, clip, step, frames, self._event(job))

    # ------------------------------------------------------------------------------------------ janitor

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete finished jobs past their TTL, and job folders nobody knows about that are older than the TTL."""
        now = time.time() if now is None else now
        ttl, root = self.config.ttl_s, Path(self.config.results)
        with self._lock:  # records first: they expire even when the folder below cannot be read
            gone = [j.id for j in self.jobs.values() if j.finished is not None and j.expires(ttl) < now]
            self.store.delete(gone)
            for job_id in gone:
                del self.jobs[job_id]
            self.events.forget(gone)
            known = set(self.jobs)
        sweep_folders(root, known, gone, ttl, now)
        return gone

    def _janitor_loop(self, period: float) -> None:
        """Sweep every `period`; an error is logged (once until it changes) and the next sweep tries again."""
        last = None
        while not self._stop.wait(period):
            try:
                self.sweep()
                last = None
            except Exception as e:  # noqa: BLE001 - one bad sweep (results folder removed, I/O error) must not end it
                if repr(e) != last:
                    log.warning("janitor: sweep failed (retrying every %.3g s): %s: %s", period, type(e).__name__, e)
                last = repr(e)

    def close(self) -> None:
        self._stop.set()
        self._janitor.join()
        if self.callbacks is not None:
            self.callbacks.close()
        with self._lock:
            self.store.close()

    # ------------------------------------------------------------------------------------------ metrics

    def metrics(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        with self._lock:
            states = Counter(j.state for j in self.jobs.values())
            lines = ["# HELP vidrd_queue_depth Jobs waiting for a runtime.", "# TYPE vidrd_queue_depth gauge",
                     f"vidrd_queue_depth {self._depth()}",
                     "# HELP vidrd_queue_capacity Jobs the queue holds before 429.",
                     "# TYPE vidrd_queue_capacity gauge", f"vidrd_queue_capacity {self.config.queue_size}",
                     "# HELP vidrd_jobs Jobs known to the service, by state (finished ones until their TTL).",
                     "# TYPE vidrd_jobs gauge"]
            lines += [f'vidrd_jobs{{state="{s}"}} {states.get(s, 0)}' for s in STATES]
            lines += ["# HELP vidrd_jobs_rejected_total Submissions refused with 429 (queue or job records full).",
                      "# TYPE vidrd_jobs_rejected_total counter", f"vidrd_jobs_rejected_total {self.rejected}",
                      "# HELP vidrd_stage_seconds Latency per stage: queue_wait, first_clip (start to first clip "
                      "published), denoise_step, run (start to end), total (submit to end).",
                      "# TYPE vidrd_stage_seconds histogram"]
            for stage, h in self.hist.items():
                lines += h.lines("vidrd_stage_seconds", f'stage="{stage}"')
            lines += ["# HELP vidrd_batch_jobs Jobs in the UNet batch that ran a clip (one observation per job and "
                      "finished clip; --batch-jobs is the most).", "# TYPE vidrd_batch_jobs histogram"]
            lines += self.batch_hist.lines("vidrd_batch_jobs", f'batch_jobs_max="{self.config.batch_jobs}"')
            lines += ["# HELP vidrd_frames_total Frames of finished videos (all prompts of a batch).",
                      "# TYPE vidrd_frames_total counter", f"vidrd_frames_total {self.frames_total}",
                      "# HELP vidrd_run_seconds_total Seconds spent running jobs that finished.",
                      "# TYPE vidrd_run_seconds_total counter", f"vidrd_run_seconds_total {self.run_seconds_total:.6f}",
                      "# HELP vidrd_frames_per_second Frames per second of the last finished job.",
                      "# TYPE vidrd_frames_per_second gauge", f"vidrd_frames_per_second {self.last_fps:.6f}"]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------------------------------ internals

    def _depth(self) -> int:
        return sum(j.state == "queued" for j in self.jobs.values())

    def _forget_unstarted(self, n: int) -> None:
        """Drop the records of up to `n` jobs cancelled before they started (no files), oldest first."""
        unstarted = sorted((j for j in self.jobs.values() if j.state == "cancelled" and j.started is None),
                           key=lambda j: j.finished)
        try:
            self.store.delete([job.id for job in unstarted[:n]])
        except self.store.errors as e:  # they stay, and the submission waits for room
            log.warning("job store: cannot delete records: %s", e)
            return
        for job in unstarted[:n]:
            del self.jobs[job.id]

    def _retry_after(self) -> int:
        """Seconds until a queue slot is likely free: one mean job run time (1 s before any job finished)."""
        done = self.hist["run"]
        return max(1, math.ceil(done.total / done.n)) if done.n else 1

    def _save(self, job: Job) -> None:
        """Write a changed record through. A failing write (a full disk) is logged and the service goes on from its
        memory: the record on file stays at its last state, from which a restart would run the job again."""
        try:
            self.store.update(asdict(job))
        except self.store.errors as e:
            log.warning("job store: cannot record job %s (%s, %s): %s", job.id, job.state, job.clips_done, e)

    def _lease(self, job: Job, now: float, force: bool = False) -> None:
        """Keep a lease (store.py) on the row of a job this service runs, renewed at most every lease_s / 4: if the
        service dies, workers that share the database through leases can take its running job over."""
        if force or now - self._leased.get(job.id, 0.0) >= self.config.lease_s / 4:
            self._leased[job.id] = now
            try:
                self.store.renew(job.id, job.worker, self.config.lease_s, now)
            except self.store.errors as e:
                log.warning("job store: cannot renew the lease of job %s: %s", job.id, e)

    def _notify(self, job: Job, event: str) -> None:
        """Queue the job's callback for `event` (clip, or how it ended), after its record is saved."""
        url = job.spec.get("callback_url")  # specs of older vidrd have none
        if url and self.callbacks is not None:
            steps = job.spec["settings"]["clips"] * job.spec["settings"]["steps"]
            self.callbacks.send(url, {"id": job.id, "event": event, "state": job.state, "clips_done": job.clips_done,
                                      "progress": round(job.steps_done / steps, 4), "error": job.error})

    def _event(self, job: Job) -> dict:
        """An event's data: the job's state and progress (events.progress of its status)."""
        return {"id": job.id, "state": job.state, "clips_done": job.clips_done, "steps_done": job.steps_done,
                "steps_total": job.spec["settings"]["clips"] * job.spec["settings"]["steps"], "error": job.error}

    def _publish(self, job: Job, name: str, **extra) -> None:
        self.events.publish(job.id, name, {**self._event(job), **extra})

    def _end(self, job: Job, state: str, error: str | None) -> None:
        job.state, job.error, job.finished = state, error, time.time()
        self._leased.pop(job.id, None)
        if state == "done":  # the worker published the videos before it reported the end
            job.files = published(job.spec, job.clips_done, done=True)
        self._save(job)
        self._notify(job, state)
        self._publish(job, state)
        if job.started is not None:
            self.hist["run"].observe(job.finished - job.started)
        self.hist["total"].observe(job.finished - job.created)
