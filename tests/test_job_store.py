"""The durable job store (runtime/serve/store.py) and resuming: a runtime continued from a clip's Checkpoint gives
the clips of an uninterrupted run; a service restarted on the same database runs its queued jobs, resumes the
running one from its last clip (after a clean stop or a crash), keeps finished and cancelled jobs; a corrupt,
locked or newer database refuses the start with one line."""
import contextlib
import sqlite3
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from vidrd.ref.sampler import SamplerSettings
from vidrd.ref.weights import random_model
from vidrd.runtime.loop import Limits, Request
from vidrd.runtime.options import open_runtime
from vidrd.runtime.serve import store as store_module
from vidrd.runtime.serve.jobs import Registry, ServeConfig, job_dir
from vidrd.runtime.serve.store import SCHEMA, Store, StoreError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LIMITS = Limits(batch=2, frames=4, height=32, width=32, steps=4, overlap=2, clips=3)
SPEC = {"prompts": ["a"], "format": "mp4", "settings": {"clips": 1, "steps": 1}}


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", 0)


# ------------------------------------------------------------------------------------------------ runtime resume


@pytest.mark.parametrize("prompts, settings", [
    (("a boat",), {}),
    (("a boat",), {"continuation": "forward"}),
    (("a boat", "wood on fire"), {"continuation": "forward", "assembly": "trim", "solver": "dpmpp-2m"}),
], ids=["official", "forward", "forward-trim-dpmpp-batch2"])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(model, prompts, settings):
    s = SamplerSettings(height=32, width=32, frames=4, overlap=2, steps=3, clips=3, **settings)
    request = Request(prompts, None, s, seed=7, checkpoints=True)
    rt = open_runtime(model, limits=LIMITS)
    full = list(rt.generate(request))
    rt.close()
    assert [c.index for c in full] == [0, 1, 2] and all(c.checkpoint.clip == c.index for c in full)
    rt = open_runtime(model, limits=LIMITS)  # a new runtime, as after a restart
    try:
        for k in (0, 1):
            resumed = list(rt.generate(replace(request, resume=full[k].checkpoint)))
            assert [c.index for c in resumed] == list(range(k + 1, 3))
            for a, b in zip(full[k + 1:], resumed):  # same kernels, shapes and thread: the same arithmetic
                assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)
        assert list(rt.generate(replace(request, resume=full[2].checkpoint))) == []  # nothing left
    finally:
        rt.close()


def test_a_checkpoint_that_does_not_fit_the_request_is_refused(model):
    s = SamplerSettings(height=32, width=32, frames=4, overlap=2, steps=3, clips=3)
    rt = open_runtime(model, limits=LIMITS)
    try:
        ck = next(iter(rt.generate(Request(("a",), None, s, checkpoints=True)))).checkpoint
        with pytest.raises(ValueError, match="resume.overlap"):
            rt.generate(Request(("a",), None, replace(s, steps=2), resume=ck))
        with pytest.raises(ValueError, match="resume.clip=3"):
            rt.generate(Request(("a",), None, s, resume=replace(ck, clip=3)))
    finally:
        rt.close()


# ------------------------------------------------------------------------------------------------ the store


def test_records_survive_reopening_and_a_cancel_is_kept(tmp_path):
    config = ServeConfig(results=str(tmp_path), ttl_s=60)
    registry = Registry(config, janitor_period_s=3600)
    ids = [f"{i:032x}" for i in range(4)]
    for job_id in ids:
        assert registry.submit(job_id, SPEC) is None
    registry.take(ids[0], "w")
    registry.start_at(ids[0], 0)
    registry.clip_done(ids[0], 0)
    registry.finish(ids[0], "done", frames=4)
    registry.take(ids[1], "w")
    registry.cancel(ids[1])  # asked while running, then the service died before the worker saw it
    registry.cancel(ids[2])  # cancelled while queued
    before = {i: registry.status(i) for i in ids}
    registry.close()
    assert (tmp_path / "jobs.db").is_file()
    registry = Registry(config, janitor_period_s=3600)
    try:
        after = {i: registry.status(i) for i in ids}
        assert after[ids[0]] == before[ids[0]]  # done, same times and expiry
        assert after[ids[1]]["state"] == "cancelled" and after[ids[2]] == before[ids[2]]
        assert after[ids[3]]["state"] == "queued" and registry.open_jobs() == [ids[3]]
        row = next(r for r in registry.store.load() if r["id"] == ids[0])
        assert row["files"] == ["clip-000-0.mp4", "video-0.mp4"]
        assert registry.sweep(now=time.time() + 61) == ids[:3]  # the TTL counts from each job's end
    finally:
        registry.close()
    with contextlib.closing(Store(config.jobs_path())) as store:
        assert [r["id"] for r in store.load()] == [ids[3]]  # expired records are gone from the file too


def test_corrupt_locked_and_newer_databases_are_refused(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="bad.db is unusable: file is not a database"):
        Store(str(bad))
    assert bad.read_bytes() == b"not a database at all" * 100  # never reset
    path = str(tmp_path / "jobs.db")
    first = Store(path)
    with pytest.raises(StoreError, match="another process holds it"):
        Store(path)
    first.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE schema_version SET version = ?", (SCHEMA + 1,))
    with pytest.raises(StoreError, match=f"schema version {SCHEMA + 1}, newer than this vidrd's {SCHEMA}"):
        Store(path)


def test_an_older_schema_is_upgraded_in_place(tmp_path, monkeypatch):
    path = str(tmp_path / "jobs.db")
    s = Store(path)
    s.insert({"id": "a" * 32, "spec": SPEC, "state": "queued", "created": 1.0, "started": None, "finished": None,
              "first_clip": None, "clips_done": 0, "steps_done": 0, "cancel": False, "error": None, "worker": None,
              "attempts": 0, "files": []})
    s.close()
    monkeypatch.setattr(store_module, "SCHEMA", SCHEMA + 1)
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS + ("ALTER TABLE jobs ADD note TEXT",))
    s = store_module.Store(path)
    try:
        assert [r["id"] for r in s.load()] == ["a" * 32]
        assert s.db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA + 1,)]
        assert "note" in [c[1] for c in s.db.execute("PRAGMA table_info(jobs)")]
    finally:
        s.close()


def test_vidrd_serve_refuses_a_corrupt_database_with_one_line(tmp_path, capsys):
    from vidrd.runtime.cli import main
    bad = tmp_path / "jobs.db"
    bad.write_bytes(b"\x00garbage" * 512)
    assert main(["serve", "--preset", "tiny", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "jobs.db is unusable: file is not a database" in err, err
    assert main(["serve", "--ray", "--jobs-db", str(bad), "--results", str(tmp_path)]) == 2


# ------------------------------------------------------------------------------------------------ the service


httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


@contextlib.contextmanager
def serving(model, config):
    from vidrd.runtime.bench import service as serve_bench
    with serve_bench.serving(model, config) as (base, service), httpx.Client(base_url=base, timeout=30) as client:
        yield client, service


def wait(client, job_id, until=lambda st: st["state"] in ("done", "failed", "cancelled"), timeout=120.0):
    t0 = time.monotonic()
    while not until(st := client.get(f"/v1/videos/{job_id}").json()):
        assert time.monotonic() - t0 < timeout, f"job {job_id} stuck: {st}"
        time.sleep(0.02)
    return st


def post(client, **body):
    r = client.post("/v1/videos", json={"prompts": ["a boat"], "height": 32, "width": 32, "frames": 4,
                                        "overlap": 2, "steps": 4, "clips": 3, "seed": 3, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def videos(client, job_id, n=1) -> list[bytes]:
    out = [client.get(f"/v1/videos/{job_id}/file", params={"video": v}) for v in range(n)]
    assert all(r.status_code == 200 for r in out)
    return [r.content for r in out]


def same_videos(resumed: list[bytes], uninterrupted: list[bytes], tmp_path) -> None:
    """The videos of a resumed job against an uninterrupted run's, as the service tests compare videos. The frames
    given to the encoder are the same (the runtime's are, and earlier clips are encoded again from their stored
    frames), but the service's mp4 files of one request differ between runs of the same process in a few
    macroblocks, resumed or not. The service runs every job through the batched path (a job's rows anywhere in
    buffers sized for K jobs, where kernels may round differently), so the batched tolerance applies."""
    from tolerances import BATCHED_MP4_MEAN
    from vidrd.runtime.video_io import read_video
    for v, (a, b) in enumerate(zip(resumed, uninterrupted)):
        (tmp_path / f"resumed-{v}.mp4").write_bytes(a)
        (tmp_path / f"uninterrupted-{v}.mp4").write_bytes(b)
        got = read_video(tmp_path / f"resumed-{v}.mp4").astype(np.int16)
        want = read_video(tmp_path / f"uninterrupted-{v}.mp4").astype(np.int16)
        assert got.shape == want.shape
        diff = np.abs(got - want).mean()
        print(f"resumed vs uninterrupted, video {v}: mean {diff:.4f} levels, bytes equal: {a == b}")
        assert diff <= BATCHED_MP4_MEAN, diff


def hold_in_clip(service, clip: int, step: int = 0, then=None):
    """Make the worker report step `step` of clip `clip`, then `then()` (or pause 50 ms); an Event set when it does.
    On the CPU a clip is published after the next clip's first step."""
    report, reached = service.registry.step, threading.Event()

    def held(job_id, c, i):
        cancel = report(job_id, c, i)
        if (c, i) == (clip, step) and not reached.is_set():
            reached.set()
            then() if then else time.sleep(0.05)
        return cancel

    service.registry.step = held
    return reached


def test_a_queued_job_and_an_interrupted_one_run_after_a_restart(model, tmp_path):
    """A clean stop (SIGTERM) mid-job: the running job resumes from its last clip, the queued one runs after it."""
    config = ServeConfig(results=str(tmp_path), limits=LIMITS)
    with serving(model, config) as (client, service):
        reached = hold_in_clip(service, clip=1)
        first, second = post(client), post(client)  # the same request: `second` runs uninterrupted
        assert reached.wait(60)
    with contextlib.closing(Store(config.jobs_path())) as store:
        states = {r["id"]: (r["state"], r["clips_done"]) for r in store.load()}
    assert states == {first: ("running", 1), second: ("queued", 0)}
    with serving(model, config) as (client, service):
        a, b = wait(client, first), wait(client, second)
        assert a["state"] == b["state"] == "done" and a["attempts"] == 2 and a["finished"] < b["started"]
        same_videos(videos(client, first), videos(client, second), tmp_path)
    assert not (job_dir(tmp_path, first) / "resume").exists()  # the resume state goes when the job ends


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the simulated crash
def test_a_job_running_when_the_service_dies_resumes_from_its_last_clip(model, tmp_path, monkeypatch):
    """A crash mid-clip (the worker stops with nothing recorded, its temporary files left behind): the next service
    on the same database and results resumes the job from its last finished clip."""
    config = ServeConfig(results=str(tmp_path), limits=LIMITS)
    body = {"prompts": ["a boat", "wood on fire"], "continuation": "forward", "assembly": "trim",
            "solver": "dpmpp-2m", "steps": 3}

    def die():
        raise SystemExit  # ends the worker thread silently: no end recorded, as a killed process records none

    with serving(model, config) as (client, service):
        reached = hold_in_clip(service, clip=2, step=1, then=die)
        job = post(client, **body)
        assert reached.wait(60)
        service._thread.join(60)
        st = client.get(f"/v1/videos/{job}").json()
        assert st["state"] == "running" and st["clips_done"] == 2
    (job_dir(tmp_path, job) / ".video-0.crash.mp4").write_bytes(b"partial")  # what a killed writer leaves
    resumed_at, start_at = [], Registry.start_at
    monkeypatch.setattr(Registry, "start_at", lambda self, job_id, clips: (resumed_at.append(clips),
                                                                          start_at(self, job_id, clips)))
    with serving(model, config) as (client, service):
        st = wait(client, job)
        assert st["state"] == "done" and resumed_at == [2] and st["clips_done"] == 3
        again = post(client, **body)
        assert wait(client, again)["state"] == "done"
        same_videos(videos(client, job, 2), videos(client, again, 2), tmp_path)
    assert not list(job_dir(tmp_path, job).glob(".*"))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the simulated crash
def test_a_job_with_a_prompt_per_clip_keeps_them_through_a_crash_and_resumes(model, tmp_path):
    """clip_prompts are part of the stored request: after a crash in clip 2 the next service resumes the job with
    them, and its video is the uninterrupted run's."""
    config = ServeConfig(results=str(tmp_path), limits=LIMITS)
    body = {"continuation": "forward", "assembly": "trim", "clip_prompts": ["wood on fire", "a red car"], "steps": 3}

    def die():
        raise SystemExit

    with serving(model, config) as (client, service):
        reached = hold_in_clip(service, clip=2, step=1, then=die)
        job = post(client, **body)
        assert reached.wait(60)
        service._thread.join(60)
        assert client.get(f"/v1/videos/{job}").json()["clips_done"] == 2
    with serving(model, config) as (client, service):
        st = wait(client, job)
        assert st["state"] == "done" and st["request"]["clip_prompts"] == body["clip_prompts"]
        again, plain = post(client, **body), post(client, **{**body, "clip_prompts": None})
        assert wait(client, again)["state"] == "done" and wait(client, plain)["state"] == "done"
        same_videos(videos(client, job), videos(client, again), tmp_path)
        assert videos(client, plain) != videos(client, again)


def test_done_and_cancelled_jobs_are_kept_across_a_restart(model, tmp_path):
    config = ServeConfig(results=str(tmp_path), limits=LIMITS)
    with serving(model, config) as (client, service):
        done = post(client, clips=1)
        assert wait(client, done)["state"] == "done"
        saved = videos(client, done)
        reached = hold_in_clip(service, clip=1)
        cancelled = post(client)
        assert reached.wait(60)
        assert client.delete(f"/v1/videos/{cancelled}").status_code in (200, 202)
        assert wait(client, cancelled)["state"] == "cancelled"
        before = {i: client.get(f"/v1/videos/{i}").json() for i in (done, cancelled)}
    with serving(model, config) as (client, service):
        assert {i: client.get(f"/v1/videos/{i}").json() for i in (done, cancelled)} == before
        assert videos(client, done) == saved
        assert client.get(f"/v1/videos/{cancelled}/clips/0").status_code == 200  # its finished clip, until the TTL
        assert service.registry.open_jobs() == []


def test_a_store_that_cannot_write_refuses_submissions_with_503(model, tmp_path, monkeypatch):
    config = ServeConfig(results=str(tmp_path), limits=LIMITS)
    with serving(model, config) as (client, service):
        def full(job):
            raise sqlite3.OperationalError("database or disk is full")
        monkeypatch.setattr(service.registry.store, "insert", full)
        r = client.post("/v1/videos", json={"prompts": ["a boat"], "height": 32, "width": 32, "frames": 4,
                                            "overlap": 2, "steps": 2, "clips": 1})
        assert r.status_code == 503 and "disk is full" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
        assert service.registry.jobs == {}
        monkeypatch.undo()
        assert wait(client, post(client, clips=1))["state"] == "done"


@pytest.mark.slow  # two starts of `vidrd serve` and 16 clips: about 13 s on two cores
def test_vidrd_serve_killed_mid_job_resumes_it_after_a_restart(tmp_path):
    """kill -9 of `vidrd serve` while a job runs: the next `vidrd serve` on the same results folder finishes it from
    its last clip, and its video is the one an uninterrupted run of the same request gives."""
    import signal
    import socket
    import subprocess
    import sys

    def start():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "vidrd.runtime.cli", "serve", "--preset", "tiny", "--port",
                                 str(port), "--results", str(tmp_path), "--threads", "1", "--max-height", "32",
                                 "--max-width", "32", "--max-frames", "4", "--max-steps", "12", "--max-clips", "8",
                                 "--max-overlap", "2", "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(httpx.TransportError):
                if client.get("/healthz").status_code == 200:
                    return proc, client
            assert proc.poll() is None and time.monotonic() - t0 < 120, proc.communicate()[1]
            time.sleep(0.2)

    proc, client = start()
    try:
        job = post(client, steps=12, clips=8)
        st = wait(client, job, until=lambda st: st["clips_done"] >= 1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        client.close()
    assert st["state"] == "running"
    proc, client = start()
    try:
        st = wait(client, job)
        assert st["state"] == "done" and st["attempts"] == 2, st
        again = post(client, steps=12, clips=8)
        assert wait(client, again)["state"] == "done"
        same_videos(videos(client, job), videos(client, again), tmp_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        client.close()
    assert proc.returncode == 0 and "Traceback" not in err, err
