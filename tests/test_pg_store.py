"""The PostgreSQL job store (store.PgStore) against a real server that this module starts (initdb and pg_ctl on a
unix socket only), and the leases both stores share: records survive reopening, a newer schema and an unreachable
server are refused with one line, racing workers never take the same job, and a job whose lease expired is taken
over by another worker and resumes from its last clip."""
import contextlib
import threading
import time

import pytest

from vidrd.ref.weights import random_model
from vidrd.runtime.options import open_runtime
from vidrd.runtime.serve import store as store_module
from vidrd.runtime.serve.jobs import Job, Registry, ServeConfig, job_dir
from vidrd.runtime.serve.store import SCHEMA, PgStore, StoreError, open_store
from vidrd.runtime.serve.worker import Interrupted, Leased, run_job

psycopg = pytest.importorskip("psycopg")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SPEC = {"prompts": ["a"], "format": "mp4", "settings": {"clips": 1, "steps": 1}}


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


class Dying(Leased):
    """A leased worker that stops at `die_at` (clip, step) with nothing recorded, as a killed replica does; it
    remembers the clip it started from."""

    def __init__(self, *args, die_at=None):
        super().__init__(*args)
        self.die_at, self.started_at = die_at, None

    def step(self, job_id, c, i):
        if (c, i) == self.die_at:
            raise Interrupted("killed")
        return super().step(job_id, c, i)

    def start_at(self, job_id, clips):
        self.started_at = clips
        super().start_at(job_id, clips)


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
            run_job(rt, tmp_path, job["id"], spec, Dying(a, job, "replica-a", 0.5, die_at=(2, 1)), durable=True)
        assert b.claim("replica-b", 30)["id"] == "b" * 32  # a's lease still runs: b takes the next job
        run_job(rt, tmp_path, "b" * 32, spec, Leased(b, b.get("b" * 32), "replica-b", 30), durable=True)
        time.sleep(0.6)
        again = b.claim("replica-b", 30)
        assert again["id"] == job["id"] and again["attempts"] == 2 and again["clips_done"] == 2
        worker = Dying(b, again, "replica-b", 30)
        run_job(rt, tmp_path, job["id"], spec, worker, durable=True)
        assert worker.started_at == 2  # resumed from its last clip, from the shared results folder
        assert a.renew(job["id"], "replica-a", 0.5) is None
        resumed, whole = (read_video(job_dir(tmp_path, i) / "video-0.mp4") for i in ("a" * 32, "b" * 32))
        assert resumed.shape == whole.shape and abs(resumed.astype(float) - whole).mean() <= 1.0
    finally:
        a.close()
        b.close()
        rt.close()


def test_a_worker_writes_only_while_it_holds_the_lease(url):
    """The end (and every write) of a leased worker is conditional on its lease; cancel and progress are atomic."""
    with contextlib.closing(open_store(url, exclusive=False)) as s:
        for c in "abc":
            s.insert(record(c * 32))
        assert s.cancel("c" * 32, now=5.0)["state"] == "cancelled" and s.get("c" * 32)["finished"] == 5.0
        job = s.claim("w1", 10, now=1000.0)
        assert s.renew(job["id"], "w1", 10, now=1001.0, steps_done=3) is False and s.get(job["id"])["steps_done"] == 3
        assert s.cancel(job["id"])["cancel"] and s.get(job["id"])["state"] == "running"  # the worker stops it
        assert s.update({**job, "clips_done": 1}, holder="w1")  # a worker's write keeps the client's cancel flag
        assert s.get(job["id"])["cancel"] and s.renew(job["id"], "w1", 10, now=1002.0) is True
        again = s.claim("w2", 10, now=1013.0)  # w1's lease ran out
        assert again["id"] == job["id"]
        assert not s.update({**job, "state": "done", "finished": 1014.0}, holder="w1")  # w1 came back: not its job
        assert s.get(job["id"])["state"] == "running"
        assert s.update({**again, "state": "cancelled", "finished": 1014.0}, holder="w2")
        assert not s.update({**again, "state": "done"}, holder="w2")  # an ended job takes no more writes
        assert s.counts() == {"queued": 1, "cancelled": 2} and s.get("d" * 32) is None and s.cancel("d" * 32) is None


def test_a_services_running_job_carries_a_lease_that_workers_take_over(pg_url, tmp_path):
    registry = Registry(ServeConfig(results=str(tmp_path), jobs_db=pg_url, lease_s=10), janitor_period_s=3600)
    try:
        assert registry.submit("a" * 32, SPEC) is None
        registry.take("a" * 32, "service")
        with contextlib.closing(open_store(pg_url, exclusive=False)) as s:
            assert s.claim("w", 10) is None  # held by the service's lease
            assert s.claim("w", 10, now=time.time() + 11)["attempts"] == 2  # the service died: a worker takes it
    finally:
        registry.close()


def test_two_workers_share_a_store_and_a_stopped_ones_job_resumes_on_the_other(pg_url, tmp_path, monkeypatch):
    """run_claimed in two threads, a store connection each: worker a stops mid-job (nothing recorded, its lease
    left to expire, as a killed replica); worker b runs the other job, then takes a's over and resumes it from its
    last clip; the video equals b's uninterrupted run of the same request."""
    from test_job_store import LIMITS
    from vidrd.runtime.serve.worker import run_claimed
    from vidrd.runtime.video_io import read_video
    spec = {"prompts": ["a boat"], "negative_prompts": [""], "format": "mp4", "fps": 8, "seed": 3,
            "settings": {"height": 32, "width": 32, "frames": 4, "overlap": 2, "steps": 2, "clips": 3}}
    config = ServeConfig(results=str(tmp_path), limits=LIMITS, lease_s=1.5, jobs_db=pg_url)
    model = random_model("tiny", 0)
    stores = {w: open_store(pg_url, exclusive=False) for w in "ab"}
    runtimes = {w: open_runtime(model, limits=LIMITS) for w in "ab"}
    stops = {w: threading.Event() for w in "ab"}
    first, second = "a" * 32, "b" * 32

    def work(w):
        while not stops[w].is_set():
            run_claimed(runtimes[w], config, stores[w], w, stops[w])
            stops[w].wait(0.1)

    starts, start_at = [], Leased.start_at
    monkeypatch.setattr(Leased, "start_at", lambda self, i, k: (starts.append((self.worker, k)), start_at(self, i, k)))
    threads = {w: threading.Thread(target=work, args=(w,)) for w in "ab"}
    try:
        stores["a"].insert({**record(first), "spec": spec})
        stores["a"].insert({**record(second), "spec": spec})
        threads["a"].start()
        deadline = time.time() + 60
        while stores["b"].get(first)["clips_done"] < 1:  # a has published clip 0 (and saved its resume state)
            assert time.time() < deadline
            time.sleep(0.01)
        stops["a"].set()
        threads["a"].join(60)
        threads["b"].start()
        while stores["b"].get(first)["state"] != "done":
            assert time.time() < deadline + 60
            time.sleep(0.05)
        stops["b"].set()
        threads["b"].join(60)
        a, b = stores["b"].get(first), stores["b"].get(second)
        assert b["state"] == "done" and b["worker"] == "b" and b["attempts"] == 1
        assert a["worker"] == "b" and a["attempts"] == 2 and a["clips_done"] == 3 and a["finished"] > b["finished"]
        assert starts[0] == ("a", 0) and starts[2][0] == "b" and starts[2][1] >= 1, starts  # resumed, not redone
        assert not (job_dir(tmp_path, first) / "resume").exists()  # an ended job keeps no resume state
        resumed, whole = (read_video(job_dir(tmp_path, i) / "video-0.mp4") for i in (first, second))
        assert resumed.shape == whole.shape and abs(resumed.astype(float) - whole).mean() <= 1.0
    finally:
        for w in "ab":
            stops[w].set()
            if threads[w].is_alive():
                threads[w].join(60)
            stores[w].close()
            runtimes[w].close()
