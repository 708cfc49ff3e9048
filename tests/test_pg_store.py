"""The PostgreSQL job store (store.PgStore) against a real server that this module starts (initdb and pg_ctl on a
unix socket only), and the leases both stores share: records survive reopening, a newer schema and an unreachable
server are refused with one line, racing workers never take the same job, and a job whose lease expired is taken
over by another worker and resumes from its last clip."""
import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from vidrd.ref.weights import random_model
from vidrd.runtime.options import open_runtime
from vidrd.runtime.serve import store as store_module
from vidrd.runtime.serve.jobs import Job, Registry, ServeConfig, job_dir
from vidrd.runtime.serve.store import SCHEMA, PgStore, StoreError, open_store
from vidrd.runtime.serve.worker import Interrupted, run_job

psycopg = pytest.importorskip("psycopg")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SPEC = {"prompts": ["a"], "format": "mp4", "settings": {"clips": 1, "steps": 1}}


def as_user() -> list[str]:
    """The command prefix that runs the server's tools: initdb refuses to run as root, so root runs them as an
    unprivileged user (postgres, else nobody)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        pytest.skip("running as root and runuser is missing: initdb refuses to run as root")
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return ["runuser", "-u", pwd.getpwnam(name).pw_name, "--"]
    pytest.skip("running as root with no unprivileged user (postgres, nobody) to run initdb as")


@pytest.fixture(scope="session")
def pg_server():
    """The conninfo prefix of a PostgreSQL server started for this session (trust auth, user vidrd, unix socket in a
    temporary folder, no TCP); skips with the reason when it cannot be started."""
    tools = [shutil.which(t) for t in ("initdb", "pg_ctl")]
    if None in tools:
        pytest.skip("initdb/pg_ctl not on PATH: install PostgreSQL (apt-get install postgresql) to run these tests")
    prefix = as_user()
    root = tempfile.mkdtemp(prefix="vidrd-pg-")
    if prefix:
        os.chown(root, pwd.getpwnam(prefix[2]).pw_uid, -1)
    data, port = os.path.join(root, "data"), 5432
    run = lambda *cmd: subprocess.run(prefix + list(cmd), capture_output=True, text=True, timeout=120)  # noqa: E731
    r = run(tools[0], "-D", data, "--auth=trust", "-U", "vidrd", "-E", "UTF8", "--no-sync")
    if r.returncode:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb cannot run here: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    r = run(tools[1], "-D", data, "-l", os.path.join(root, "log"), "-w", "-o",
            f"-k {root} -c listen_addresses='' -p {port} -c fsync=off", "start")
    if r.returncode:
        log = open(os.path.join(root, "log")).read() if os.path.exists(os.path.join(root, "log")) else r.stderr
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"pg_ctl cannot start the server: {log.strip().splitlines()[-1:]}")
    try:
        yield f"postgresql://vidrd@/%s?host={root}&port={port}"
    finally:
        run(tools[1], "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the session's server."""
    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_server % "postgres", autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return pg_server % name


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """Both stores: an SQLite file, and a PostgreSQL database."""
    return str(tmp_path / "jobs.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")


def record(job_id: str, **fields) -> dict:
    from dataclasses import asdict
    row = asdict(Job(job_id, SPEC, time.time()))
    del row["last_step"]
    return {**row, **fields}


def test_records_survive_reopening(pg_url):
    s = open_store(pg_url)
    assert isinstance(s, PgStore)
    rows = [record(f"{i:032x}") for i in range(3)]
    for row in rows:
        s.insert(row)
    rows[1].update(state="done", finished=time.time(), clips_done=1, files=["clip-000-0.mp4", "video-0.mp4"],
                   cancel=True, error="x")
    s.update(rows[1])
    s.delete([rows[2]["id"]])
    s.close()
    with contextlib.closing(open_store(pg_url)) as s:
        assert s.load() == rows[:2]  # same values, floats to the bit, in submission order


def test_registry_records_survive_a_restart_on_postgresql(pg_url, tmp_path):
    config = ServeConfig(results=str(tmp_path), ttl_s=60, jobs_db=pg_url)
    registry = Registry(config, janitor_period_s=3600)
    ids = [f"{i:032x}" for i in range(3)]
    for job_id in ids:
        assert registry.submit(job_id, SPEC) is None
    registry.take(ids[0], "w")
    registry.start_at(ids[0], 0)
    registry.clip_done(ids[0], 0)
    registry.finish(ids[0], "done", frames=4)
    registry.take(ids[1], "w")
    registry.cancel(ids[1])
    before = {i: registry.status(i) for i in ids}
    with pytest.raises(StoreError, match="another service holds it"):  # one Registry per database
        open_store(pg_url)
    registry.close()
    registry = Registry(config, janitor_period_s=3600)
    try:
        after = {i: registry.status(i) for i in ids}
        assert after[ids[0]] == before[ids[0]] and after[ids[2]] == before[ids[2]]
        assert after[ids[1]]["state"] == "cancelled" and registry.open_jobs() == [ids[2]]
        assert registry.sweep(now=time.time() + 61) == ids[:2]
    finally:
        registry.close()
    with contextlib.closing(open_store(pg_url)) as s:
        assert [r["id"] for r in s.load()] == [ids[2]]


def test_the_service_resumes_its_jobs_from_postgresql_after_a_restart(pg_url, tmp_path):
    """test_job_store's restart test on PostgreSQL: the running job resumes from its last clip, the queued one runs."""
    from test_job_store import LIMITS, hold_in_clip, post, same_videos, serving, videos, wait
    model, config = random_model("tiny", 0), ServeConfig(results=str(tmp_path), limits=LIMITS, jobs_db=pg_url)
    with serving(model, config) as (client, service):
        reached = hold_in_clip(service, clip=1)
        first, second = post(client), post(client)
        assert reached.wait(60)
    with serving(model, config) as (client, service):
        a, b = wait(client, first), wait(client, second)
        assert a["state"] == b["state"] == "done" and a["attempts"] == 2 and a["finished"] < b["started"]
        same_videos(videos(client, first), videos(client, second), tmp_path)


def test_newer_schema_and_unreachable_server_are_refused_with_one_line(pg_url, tmp_path):
    open_store(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("UPDATE schema_version SET version = %s", (SCHEMA + 1,))
    with pytest.raises(StoreError, match=f"schema version {SCHEMA + 1}, newer than this vidrd's {SCHEMA}") as e:
        open_store(pg_url)
    assert "\n" not in str(e.value)
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA + 1,)]  # never rewritten
    gone = f"postgresql://vidrd:secret@/x?host={tmp_path}&port=1"
    with pytest.raises(StoreError, match=r"postgresql://vidrd:\*\*\*@/x.*cannot connect") as e:
        open_store(gone)
    assert "\n" not in str(e.value) and "secret" not in str(e.value)


def test_an_older_schema_is_upgraded_on_postgresql(pg_url, monkeypatch):
    with monkeypatch.context() as m:  # a database of schema 1: no leases
        m.setattr(store_module, "SCHEMA", 1)
        m.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
        with contextlib.closing(store_module.open_store(pg_url)) as s:
            s.insert(record("a" * 32))
    with contextlib.closing(open_store(pg_url, exclusive=False)) as s:
        assert [r["id"] for r in s.load()] == ["a" * 32]
        assert s.claim("w", 10)["id"] == "a" * 32  # the lease column exists
        assert s._run("SELECT version FROM schema_version").fetchall() == [(SCHEMA,)]


# ------------------------------------------------------------------------------------------------ leases


def test_racing_workers_never_take_the_same_job(url):
    n, workers = 40, 4
    first = open_store(url, exclusive=False)
    for i in range(n):
        first.insert(record(f"{i:032x}"))
    # PostgreSQL: one connection per worker, as replicas have; SQLite: one process, its threads share the store
    stores = [first] + [open_store(url, exclusive=False) if isinstance(first, PgStore) else first
                        for _ in range(workers - 1)]
    taken, go = [[] for _ in range(workers)], threading.Barrier(workers)

    def work(k):
        go.wait()
        while (job := stores[k].claim(f"w{k}", 60)) is not None:
            taken[k].append(job["id"])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = [i for ids in taken for i in ids]
    try:
        assert sorted(claimed) == [f"{i:032x}" for i in range(n)]  # every job once, none twice
        assert all(r["state"] == "running" and r["attempts"] == 1 for r in first.load())
        print("jobs per worker:", [len(ids) for ids in taken])
    finally:
        for s in set(stores):
            s.close()


def test_a_lease_is_renewed_and_lost_to_a_takeover(url):
    with contextlib.closing(open_store(url, exclusive=False)) as s:
        s.insert(record("a" * 32))
        s.insert(record("b" * 32, state="done"))
        now = 1000.0
        job = s.claim("w1", 10, now=now)
        assert job["id"] == "a" * 32 and job["worker"] == "w1" and job["started"] == now
        assert s.claim("w2", 10, now=now + 5) is None  # held; the done job is never claimed
        assert s.renew(job["id"], "w1", 10, now=now + 9) is False  # held until now + 19
        assert s.claim("w2", 10, now=now + 18) is None
        again = s.claim("w2", 10, now=now + 20)  # w1 died: its lease ran out
        assert again["id"] == job["id"] and again["attempts"] == 2 and again["started"] == now
        assert s.renew(job["id"], "w1", 10, now=now + 21) is None  # w1 came back: it must stop


class Leased:
    """The registry side of run_job for a worker that shares the store through a lease: each step renews it (and
    reads the cancel flag), each clip is recorded. `die_at` (clip, step): the worker stops there with nothing
    recorded, as a killed replica does."""

    def __init__(self, store, job: dict, worker: str, lease_s: float, die_at=None):
        self.store, self.job, self.worker, self.lease_s, self.die_at = store, job, worker, lease_s, die_at
        self.started_at = None

    def step(self, job_id, c, i):
        if (c, i) == self.die_at:
            raise Interrupted("killed")
        cancel = self.store.renew(job_id, self.worker, self.lease_s)
        if cancel is None:
            raise Interrupted(f"the lease on {job_id} was lost")
        return cancel

    def start_at(self, job_id, clips):
        self.started_at = clips
        self.store.update({**self.job, "clips_done": clips})

    def clip_done(self, job_id, k):
        self.job["clips_done"] = k + 1
        self.store.update(self.job)


def test_an_expired_lease_is_taken_over_and_the_job_resumes_from_its_last_clip(pg_url, tmp_path):
    from test_job_store import LIMITS
    from vidrd.runtime.video_io import read_video
    spec = {"prompts": ["a boat"], "negative_prompts": [""], "format": "mp4", "fps": 8, "seed": 3,
            "settings": {"height": 32, "width": 32, "frames": 4, "overlap": 2, "steps": 2, "clips": 3}}
    rt = open_runtime(random_model("tiny", 0), limits=LIMITS)
    a, b = (open_store(pg_url, exclusive=False) for _ in range(2))
    try:
        a.insert({**record("a" * 32), "spec": spec})
        a.insert({**record("b" * 32), "spec": spec})  # the same request, run uninterrupted
        job = a.claim("replica-a", 0.5)
        # replica a dies in clip 2 (on the CPU, clip 1 is published after clip 2's first step)
        with pytest.raises(Interrupted, match="killed"):
            run_job(rt, tmp_path, job["id"], spec, Leased(a, job, "replica-a", 0.5, die_at=(2, 1)), durable=True)
        assert b.claim("replica-b", 30)["id"] == "b" * 32  # a's lease still runs: b takes the next job
        run_job(rt, tmp_path, "b" * 32, spec, Leased(b, b.load()[1], "replica-b", 30), durable=True)
        time.sleep(0.6)
        again = b.claim("replica-b", 30)
        assert again["id"] == job["id"] and again["attempts"] == 2 and again["clips_done"] == 2
        worker = Leased(b, again, "replica-b", 30)
        run_job(rt, tmp_path, job["id"], spec, worker, durable=True)
        assert worker.started_at == 2  # resumed from its last clip, from the shared results folder
        assert a.renew(job["id"], "replica-a", 0.5) is None
        resumed, whole = (read_video(job_dir(tmp_path, i) / "video-0.mp4") for i in ("a" * 32, "b" * 32))
        assert resumed.shape == whole.shape and abs(resumed.astype(float) - whole).mean() <= 1.0
    finally:
        a.close()
        b.close()
        rt.close()
