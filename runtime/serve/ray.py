"""`vidrd serve --ray`: the same HTTP API on Ray Serve, one runtime per replica, replicas added by Serve's autoscaler.

Three parts (README "Serving" explains the design):
- `Registry` (jobs.py) as one named, detached Ray actor: every job's state, progress, cancel flag and the bounded
  queue's admission. Every replica asks it, so any replica answers for any job. It keeps its records in memory
  (jobs_db ":memory:", see `in_memory`), so they go with the actor and jobs save no resume state.
- `Ingress`: the FastAPI app of api.py (cheap, no model). A POST is admitted by the registry, then dispatched as
  one `Generator.run(job_id)` call through a Serve handle; Serve routes it to a replica with a free slot and its
  queue length drives the autoscaler. When that call fails (the replica died), the job is marked failed.
- `Generator`: one Runtime per replica (one GPU each when the cluster has GPUs), opened from the RuntimeOptions of
  `vidrd serve`'s execution flags (vidrd.runtime.options), `max_ongoing_requests=1`; it writes
  clip and video files into the shared results folder and reports each step to the registry (which answers with
  the cancel flag).

With `--jobs-db postgresql://...` (store.shared) there is no registry actor: the job table is the database, which
every process reaches. The ingress answers submit, status, cancel and metrics from it (`StoreBackend`), and every
Generator replica claims jobs from it and renews their leases (worker.run_claimed): a `run()` call drains the
claimable jobs, and a poller takes jobs whose replica died once their lease (ServeConfig.lease_s) expired; they
resume from their last clip through the resume files in the shared results folder.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import ray
from ray import serve

from ..options import RuntimeOptions
from .api import make_app
from .events import poll
from .jobs import FINISHED, STATES, Histogram, Job, Registry, ServeConfig, new_id, storage_health, sweep_folders
from .store import open_store, shared
from .worker import execute, run_claimed, worker_name

log = logging.getLogger("vidrd.serve")
NAMESPACE, REGISTRY = "vidrd", "vidrd-jobs"


def in_memory(config: ServeConfig) -> ServeConfig:
    """`config` as the cluster runs it: job records in PostgreSQL when it names one, else in the registry actor's
    memory. SQLite's lock and WAL need every process on one host, which a cluster's replicas are not."""
    return config if shared(config.jobs_db) else replace(config, jobs_db=":memory:")


def start_registry(config: ServeConfig):
    """The cluster's job registry: a detached actor that outlives replica restarts (one per cluster).

    One left by an earlier run with the same configuration is reused (its jobs stay readable); one with another
    configuration is replaced, forgetting its jobs."""
    config = in_memory(config)
    with contextlib.suppress(ValueError):  # ValueError: no such actor
        old = ray.get_actor(REGISTRY, namespace=NAMESPACE)
        if ray.get(old.settings.remote()) == config:
            return old
        log.warning("replacing the job registry of an earlier run (another configuration); its jobs are forgotten")
        ray.kill(old, no_restart=True)
    for _ in range(100):  # the name is free once the killed actor is gone
        try:
            return ray.remote(Registry).options(name=REGISTRY, namespace=NAMESPACE, lifetime="detached",
                                                num_cpus=0).remote(config)
        except ValueError:
            time.sleep(0.1)
    raise RuntimeError(f"the Ray actor name {REGISTRY!r} in namespace {NAMESPACE!r} stays taken")


def stop_registry() -> None:
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(REGISTRY, namespace=NAMESPACE), no_restart=True)


class _Blocking:
    """The registry actor with plain blocking calls, for worker.execute on a replica's worker thread."""

    def __init__(self, actor):
        self._actor = actor

    def __getattr__(self, name):
        method = getattr(self._actor, name)
        return lambda *args, **kw: ray.get(method.remote(*args, **kw))


@serve.deployment(max_ongoing_requests=1, graceful_shutdown_timeout_s=30)
class Generator:
    """One Runtime; runs one job at a time, from the registry's spec."""

    def __init__(self, config: ServeConfig, model_args: dict, options: RuntimeOptions):
        from ..cli.model_args import load_model
        from ..options import open_runtime

        options = options.resolved()  # the replica's device: cuda when it has a GPU
        model, what, _ = load_model(argparse.Namespace(**model_args), dtype=options.torch_dtype, device=options.device)
        config.for_model(model)  # ValueError unless --max-steps fits this model's schedule
        self.rt = open_runtime(model, options, config.limits)
        self.config, self.name = config, worker_name()
        if shared(config.jobs_db):
            self.store, self._busy, self._stop = open_store(config.jobs_db, exclusive=False), threading.Lock(), \
                threading.Event()
            threading.Thread(target=self._poll, daemon=True, name="vidrd-claims").start()
        else:
            self.store, self.registry = None, _Blocking(ray.get_actor(REGISTRY, namespace=NAMESPACE))
        log.info("generator %s: %s on %s", self.name, what, options.device)

    async def run(self, job_id: str) -> str:
        """Run one job to its end; the event loop stays free for Serve's health checks meanwhile."""
        return await asyncio.to_thread(self._run, job_id)

    def _run(self, job_id: str) -> str:
        if self.store is not None:  # a nudge: this replica drains the claimable jobs, job_id's or older ones
            with self._busy:
                return f"ran {run_claimed(self.rt, self.config, self.store, self.name, self._stop)} jobs"
        spec = self.registry.take(job_id, self.name)
        if spec is None:  # cancelled while queued
            return "skipped"
        return execute(self.rt, self.config, job_id, spec, self.registry)

    def _poll(self) -> None:
        """While idle, claim jobs nobody was nudged for: those of a replica that died, once their lease expired."""
        period = max(0.2, min(5.0, self.config.lease_s / 4))
        while not self._stop.wait(period):
            if not self._busy.acquire(blocking=False):
                continue  # running a job already
            try:
                run_claimed(self.rt, self.config, self.store, self.name, self._stop)
            except self.store.errors as e:  # the database is unreachable: the next poll tries again
                log.warning("generator %s: job store: %s", self.name, e)
            finally:
                self._busy.release()

    def __del__(self):
        if getattr(self, "store", None) is not None:
            self._stop.set()
        if getattr(self, "rt", None) is not None:
            self.rt.close()


class RayBackend:
    """api.make_app's backend on Ray: registry calls awaited, jobs dispatched to Generator replicas."""

    def __init__(self, registry, generator, config: ServeConfig):
        self.registry, self.generator, self.config = registry, generator, config
        self._dispatches: set[asyncio.Task] = set()

    async def submit(self, spec: dict) -> tuple[str | None, tuple[int, int, str] | None]:
        job_id = new_id()
        refused = await self.registry.submit.remote(job_id, spec)
        if refused:
            return None, refused
        task = asyncio.get_running_loop().create_task(self._dispatch(job_id))
        self._dispatches.add(task)
        task.add_done_callback(self._dispatches.discard)
        return job_id, None

    async def _dispatch(self, job_id: str) -> None:
        try:
            await self.generator.run.remote(job_id)
        except Exception as e:  # the replica died mid-job (or could not start): the job fails, it never hangs
            log.warning("job %s: its generator call failed: %s", job_id, e)
            await self.registry.finish.remote(job_id, "failed", f"the replica running it was lost: "
                                              f"{type(e).__name__}: {str(e)[:300]}")

    async def status(self, job_id: str) -> dict | None:
        return await self.registry.status.remote(job_id)

    async def cancel(self, job_id: str) -> dict | None:
        return await self.registry.cancel.remote(job_id)

    previews = False  # the preview thread's frames stay on the replica

    def events(self, job_id: str, now: dict, last_id: int | None):
        """Events made from status polling (events.poll): the registry lives in another process."""
        return poll(self.status, job_id, now)

    async def preview(self, job_id: str) -> None:
        return None

    async def metrics(self) -> str:
        return await self.registry.metrics.remote()

    async def health(self) -> dict:
        problem, disk = storage_health(self.config)  # the shared results folder, as this node sees it
        return {"status": problem or "ok", "queue_depth": await self.registry.depth.remote(),
                "dispatched": len(self._dispatches), "disk": disk}


class StoreBackend:
    """api.make_app's backend on Ray with a shared (PostgreSQL) job store: records read and written in the database,
    each job dispatched as a nudge to a Generator replica, which claims the oldest claimable job. Admission counts
    the database's rows, so ingress replicas that race may admit a job or two over --queue-size."""

    def __init__(self, store, generator, config: ServeConfig, janitor_period_s: float | None = None):
        self.store, self.generator, self.config = store, generator, config
        self._dispatches: set[asyncio.Task] = set()
        self._stop = threading.Event()
        period = janitor_period_s or min(60.0, max(0.5, config.ttl_s / 4))
        threading.Thread(target=self._janitor, args=(period,), daemon=True, name="vidrd-janitor").start()

    async def submit(self, spec: dict) -> tuple[str | None, tuple[int, int, str] | None]:
        job_id = new_id()
        refused = await asyncio.to_thread(self._admit, job_id, spec)
        if refused:
            return None, refused
        task = asyncio.get_running_loop().create_task(self._dispatch(job_id))
        self._dispatches.add(task)
        task.add_done_callback(self._dispatches.discard)
        return job_id, None

    def _admit(self, job_id: str, spec: dict) -> tuple[int, int, str] | None:
        try:
            counts = self.store.counts()
            if counts.get("queued", 0) >= self.config.queue_size:
                return 429, 1, f"the queue is full ({self.config.queue_size} jobs waiting)"
            if sum(counts.values()) >= self.config.max_records:
                return 429, 1, f"the service holds {self.config.max_records} job records"
            self.store.insert(asdict(Job(job_id, spec, time.time())))
        except self.store.errors as e:
            log.warning("job store: cannot record a new job: %s", e)
            return 503, 1, f"the job store cannot record the job ({e})"
        return None

    async def _dispatch(self, job_id: str) -> None:
        try:
            await self.generator.run.remote(job_id)
        except Exception as e:  # the replica died: its job stays leased until the lease expires, then another takes it
            log.warning("job %s: its generator call failed (%s); a replica takes the job over once its lease "
                        "expires", job_id, type(e).__name__)

    def _status(self, row: dict | None) -> dict | None:
        return None if row is None else Job(**row).status(self.config.ttl_s)

    async def status(self, job_id: str) -> dict | None:
        return self._status(await asyncio.to_thread(self.store.get, job_id))

    async def cancel(self, job_id: str) -> dict | None:
        return self._status(await asyncio.to_thread(self.store.cancel, job_id))

    previews = False  # the preview thread's frames stay on the replica

    def events(self, job_id: str, now: dict, last_id: int | None):
        """Events made from status polling (events.poll): the registry lives in another process."""
        return poll(self.status, job_id, now)

    async def preview(self, job_id: str) -> None:
        return None

    async def metrics(self) -> str:
        """Prometheus text: queue depth and capacity, jobs by state, stage latencies from the records' times."""
        jobs = [Job(**row) for row in await asyncio.to_thread(self.store.load)]
        states = Counter(j.state for j in jobs)
        hist = {stage: Histogram() for stage in ("queue_wait", "first_clip", "run", "total")}
        for j in jobs:
            for stage, a, b in (("queue_wait", j.created, j.started), ("first_clip", j.started, j.first_clip),
                                ("run", j.started, j.finished if j.state in FINISHED else None),
                                ("total", j.created, j.finished)):
                if a is not None and b is not None:
                    hist[stage].observe(b - a)
        lines = ["# HELP vidrd_queue_depth Jobs waiting for a runtime.", "# TYPE vidrd_queue_depth gauge",
                 f"vidrd_queue_depth {states.get('queued', 0)}",
                 "# HELP vidrd_queue_capacity Jobs the queue holds before 429.", "# TYPE vidrd_queue_capacity gauge",
                 f"vidrd_queue_capacity {self.config.queue_size}",
                 "# HELP vidrd_jobs Jobs in the job store, by state (finished ones until their TTL).",
                 "# TYPE vidrd_jobs gauge", *(f'vidrd_jobs{{state="{s}"}} {states.get(s, 0)}' for s in STATES),
                 "# HELP vidrd_stage_seconds Latency per stage of the jobs in the store: queue_wait, first_clip, run, "
                 "total.", "# TYPE vidrd_stage_seconds histogram"]
        for stage, h in hist.items():
            lines += h.lines("vidrd_stage_seconds", f'stage="{stage}"')
        return "\n".join(lines) + "\n"

    async def health(self) -> dict:
        problem, disk = storage_health(self.config)
        try:
            depth = (await asyncio.to_thread(self.store.counts)).get("queued", 0)
        except self.store.errors as e:
            problem, depth = problem or f"job store unreachable: {e}", None
        return {"status": problem or "ok", "queue_depth": depth, "dispatched": len(self._dispatches), "disk": disk}

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete finished jobs past their TTL (records, then folders), and old folders of no job."""
        now = time.time() if now is None else now
        jobs = [Job(**row) for row in self.store.load()]
        gone = [j.id for j in jobs if j.finished is not None and j.expires(self.config.ttl_s) < now]
        self.store.delete(gone)
        sweep_folders(Path(self.config.results), {j.id for j in jobs} - set(gone), gone, self.config.ttl_s, now)
        return gone

    def _janitor(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                self.sweep()
            except Exception as e:  # noqa: BLE001 - a failed sweep (database or folder unreachable) is retried
                log.warning("janitor: sweep failed: %s: %s", type(e).__name__, e)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP API; holds no model."""

    def __init__(self, generator, config: ServeConfig):
        self.config = config
        if shared(config.jobs_db):
            self.backend = StoreBackend(open_store(config.jobs_db, exclusive=False), generator, config)
        else:
            self.backend = RayBackend(ray.get_actor(REGISTRY, namespace=NAMESPACE), generator, config)

    def __serve_build_asgi_app__(self):
        return make_app(self.backend, self.config)


def build(config: ServeConfig, model_args: dict, options: RuntimeOptions, *, min_replicas: int = 1,
          max_replicas: int | None = None, replica_cpus: float = 1.0, autoscaling: dict | None = None):
    """The Serve application: Ingress -> Generator. One GPU per replica when the cluster has GPUs.

    Serve's autoscaler keeps about one job (running or waiting at the ingress's handle) per replica; `autoscaling`
    overrides its settings (Serve's autoscaling_config keys)."""
    config = in_memory(config)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actor = {"num_gpus": 1, "num_cpus": replica_cpus} if gpus else {"num_cpus": replica_cpus}
    if not gpus and options.threads is None:
        options = replace(options, threads=max(1, int(replica_cpus)))  # no oversubscription on shared CPUs
    most = max_replicas or max(gpus, 1)
    if not 1 <= min_replicas <= most:
        raise ValueError(f"--min-replicas {min_replicas} must be between 1 and --max-replicas {most}")
    generator = Generator.options(ray_actor_options=actor, autoscaling_config={
        "min_replicas": min_replicas, "max_replicas": most, "target_ongoing_requests": 1, "upscale_delay_s": 10,
        "downscale_delay_s": 300, **(autoscaling or {})})
    return Ingress.bind(generator.bind(config, model_args, options), config)
