"""The service against hostile or broken conditions: a full or read-only or vanished results folder, huge headers,
stalled downloads, submit-then-cancel floods, step counts the schedule has no room for, repeated stop signals, and
bad bodies (codes, short messages). Tiny preset on loopback, as tests/test_service.py."""
import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from test_service import LIMITS, TINY, serving, submit, wait  # noqa: E402
from vidrd.ref.sampler import SEED_MAX, SEED_MIN  # noqa: E402
from vidrd.ref.weights import random_model  # noqa: E402
from vidrd.runtime.cli import main  # noqa: E402
from vidrd.runtime.loop import Limits  # noqa: E402
from vidrd.runtime.serve import worker  # noqa: E402
from vidrd.runtime.serve.jobs import CANCELLED_GRACE_S, Registry, ServeConfig, job_dir, video_path  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", 0)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    with serving(model, ServeConfig(results=str(tmp_path_factory.mktemp("results")), **LIMITS)) as s:
        yield s


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at `path` (True), or False where this process may not mount (not root, no CAP_SYS_ADMIN)."""
    path.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    try:
        yield r.returncode == 0
    finally:
        if r.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def port_of(client) -> int:
    return int(str(client.base_url).rsplit(":", 1)[1].rstrip("/"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settle(want, timeout=5.0):
    """Poll `want()` until it is true (the server's threads finish their cleanup asynchronously)."""
    t0 = time.monotonic()
    while not want():
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)


def temp_files(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).rglob(".*") if p.name.startswith((".video-", ".clip-")))


# ------------------------------------------------------------------------------------------------ storage


def test_full_disk_fails_jobs_cleanly_and_healthz_says_low_disk(model, tmp_path, monkeypatch):
    """Every job failing for lack of space leaves no temporary file and no descriptor; /healthz says 503 "low disk
    space"; the next job runs as soon as space is back."""
    results = tmp_path / "results"
    with tmpfs(results, "size=2m") as mounted:
        # the job records on another disk: this test is about the results (test_job_store: the store's disk full)
        config = ServeConfig(results=str(results), min_free_bytes=512 << 10, jobs_db=str(tmp_path / "jobs.db"),
                             **LIMITS)
        with serving(model, config) as (client, _):
            assert wait(client, submit(client))["state"] == "done"
            assert client.get("/healthz").json()["disk"]["free_bytes"] > 512 << 10
            filler = results / "filler"
            if mounted:  # fill the real filesystem to the last block
                with open(filler, "wb") as f, contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
            else:  # no mount here: the writer raises what a full disk raises, and the free space reads low
                def full(self, frames):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                monkeypatch.setattr(worker.VideoWriter, "write", full)
                real = shutil.disk_usage
                monkeypatch.setattr("vidrd.runtime.serve.jobs.shutil.disk_usage",
                                    lambda p: real(p)._replace(free=0) if filler.exists() else real(p))
                filler.write_bytes(b"x")
            r = client.get("/healthz")
            assert r.status_code == 503 and r.json()["status"] == "low disk space", r.json()
            before = open_fds()
            for _ in range(3):
                st = wait(client, submit(client, format="gif"))
                assert st["state"] == "failed" and "No space left" in st["error"], st
                st = wait(client, submit(client))
                assert st["state"] == "failed" and "No space left" in st["error"], st
                assert temp_files(results) == []
            settle(lambda: open_fds() <= before)
            filler.unlink()
            monkeypatch.undo()
            assert client.get("/healthz").status_code == 200
            assert wait(client, submit(client))["state"] == "done"
            assert temp_files(results) == []


def test_janitor_survives_a_removed_results_folder_and_healthz_says_so(model, tmp_path, caplog):
    results = tmp_path / "results"
    config = ServeConfig(results=str(results), ttl_s=0.5, **LIMITS)  # the janitor sweeps every 0.5 s
    with caplog.at_level(logging.WARNING, logger="vidrd.serve"), serving(model, config) as (client, service):
        job_id = submit(client)
        assert wait(client, job_id)["state"] == "done"
        shutil.rmtree(results)
        settle(lambda: client.get(f"/v1/videos/{job_id}").status_code == 404)  # records still expire
        time.sleep(1.2)  # two more sweeps
        assert service.registry._janitor.is_alive()
        r = client.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == f"results folder {results} is missing", r.json()
        warnings = [m for m in caplog.messages if m.startswith("janitor: sweep failed")]
        assert len(warnings) == 1 and "FileNotFoundError" in warnings[0], caplog.messages  # once, not per sweep
        assert not results.exists()  # not silently recreated (it may be a mount that went away)
        st = wait(client, submit(client))
        assert st["state"] == "failed" and "No such file" in st["error"]
        results.mkdir()
        assert client.get("/healthz").status_code == 200
        job_id = submit(client)
        assert wait(client, job_id)["state"] == "done"
        old = time.time() - 60
        orphan = results / ("f" * 32)
        orphan.mkdir()
        os.utime(orphan, (old, old))
        settle(lambda: not orphan.exists())  # the janitor sweeps files again


def test_read_only_results_folder_is_refused_at_start(tmp_path, monkeypatch, capsys):
    results = tmp_path / "ro"
    with tmpfs(results, "ro,size=1m") as mounted:
        if not mounted:
            pytest.skip("cannot mount a read-only tmpfs here (not root); chmod does not stop root's writes")

        def loaded(*a, **kw):
            raise AssertionError("the model was loaded before --results was checked")
        monkeypatch.setattr("vidrd.runtime.cli.model_args.load_model", loaded)
        assert main(["serve", "--preset", "tiny", "--results", str(results), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not writable: Read-only file system" in err[0], err


# ------------------------------------------------------------------------------------------------ connections


def test_oversized_headers_get_431_before_the_api_key(model, tmp_path):
    config = ServeConfig(results=str(tmp_path), api_key="s3cret-key-1", max_header_bytes=4096, **LIMITS)
    with serving(model, config) as (client, _):
        port = port_of(client)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # whole, in one piece
            s.sendall(b"GET /v1/videos/" + b"0" * 32 + b" HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 8000 + b"\r\n\r\n")
            reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 431 "), reply
            assert b"larger than 4096 bytes" in reply
            settle(lambda: s.recv(4096) == b"")  # and closed
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # never finished
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 6000)
            reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 431 "), reply
        sent = 0
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a stream of headers: cut off early
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            with contextlib.suppress(OSError):
                while sent < 64 << 20:
                    s.sendall(b"X-Pad: " + b"a" * 65000 + b"\r\n")
                    sent += 65009
        assert sent < 16 << 20, sent
        assert client.get("/v1/videos/" + "0" * 32).status_code == 401  # headers under the limit reach the key check
        assert client.get("/healthz", headers={"X-Pad": "a" * 3000}).status_code == 200


def test_stalled_downloads_are_cut_off_and_capped(model, tmp_path):
    config = ServeConfig(results=str(tmp_path), max_downloads=2, send_timeout_s=1.0, **LIMITS)
    with serving(model, config) as (client, _):
        job_id = submit(client)
        assert wait(client, job_id)["state"] == "done"
        video_path(tmp_path, job_id, 0, "mp4").write_bytes(b"\0" * (32 << 20))  # more than socket buffers hold
        path = f"/v1/videos/{job_id}/file"
        assert client.get("/healthz").status_code == 200
        before = open_fds()
        stalled = []
        for _ in range(2):  # clients that ask and never read
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port_of(client)))
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(64).startswith(b"HTTP/1.1 200 "), "the download did not start"  # then nothing more
            stalled.append(s)
        t0 = time.monotonic()
        r = client.get(path)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "2 downloads" in r.json()["detail"]
        settle(lambda: client.get(f"/v1/videos/{job_id}/clips/0").status_code == 200, timeout=10)
        assert 0.9 < time.monotonic() - t0 < 10  # the send timeout freed their places
        for s in stalled:  # they were disconnected: reading on ends in EOF or a reset
            s.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while s.recv(1 << 20):
                    pass
            s.close()
        assert len(client.get(path).content) == 32 << 20
        settle(lambda: open_fds() <= before)


# ------------------------------------------------------------------------------------------------ admission


def test_steps_the_models_schedule_has_no_room_for(model):
    """--max-steps 1000 is served (trailing spacing has room), but a leading 1000-step request is a 422 up front."""
    from fastapi.exceptions import RequestValidationError

    from vidrd.runtime.serve.api import VideoRequest, to_spec
    config = ServeConfig(limits=Limits(steps=1000)).for_model(model)
    assert config.scheduler == model.scheduler.cfg
    with pytest.raises(ValueError, match="--max-steps 1001 exceeds"):
        ServeConfig(limits=Limits(steps=1001)).for_model(model)
    assert to_spec(VideoRequest(prompts=["a"], steps=1000, spacing="trailing"), config)
    assert to_spec(VideoRequest(prompts=["a"], steps=999), config)
    with pytest.raises(RequestValidationError) as e:
        to_spec(VideoRequest(prompts=["a"], steps=1000), config)
    err = e.value.errors()[0]
    assert err["loc"] == ("body", "steps") and "at most 999" in err["msg"]


def test_submit_then_cancel_cannot_hold_records(tmp_path):
    registry = Registry(ServeConfig(results=str(tmp_path), queue_size=100, max_records=5), janitor_period_s=3600)
    try:
        spec = {"prompts": ["a"], "format": "mp4", "settings": {"clips": 1, "steps": 1}}
        ids = [f"{i:032x}" for i in range(60)]
        for job_id in ids[:50]:  # a flood of POST + DELETE pairs
            assert registry.submit(job_id, spec) is None
            assert registry.cancel(job_id)["state"] == "cancelled"
            assert len(registry.jobs) <= 5
        st = registry.status(ids[49])  # the latest still read as cancelled, for a short while
        assert st["state"] == "cancelled" and st["expires"] == pytest.approx(st["finished"] + CANCELLED_GRACE_S)
        assert registry.status(ids[0]) is None
        assert registry.sweep(now=time.time() + CANCELLED_GRACE_S + 1) == ids[45:50]
        for job_id in ids[50:55]:  # real jobs are never dropped to make room: the next one waits
            assert registry.submit(job_id, spec) is None
        status, retry, why = registry.submit(ids[55], spec)
        assert status == 429 and retry >= 1 and why == "the service holds 5 job records"
    finally:
        registry.close()


def test_submission_rate_per_client_and_records_bound_over_http(model, tmp_path):
    config = ServeConfig(results=str(tmp_path), submit_rate=0.5, submit_burst=3, max_records=3, ttl_s=30,
                         **LIMITS)
    with serving(model, config) as (client, _):
        body = {"prompts": ["a"], "steps": 1, "clips": 1, **TINY}
        assert client.post("/v1/videos", json={**body, "steps": 0}).status_code == 422  # refusals cost no token
        ids = [client.post("/v1/videos", json=body).json()["id"] for _ in range(3)]
        r = client.post("/v1/videos", json=body)
        assert r.status_code == 429 and r.headers["retry-after"] == "2" and "too many submissions" in r.text
        for job_id in ids:
            assert wait(client, job_id)["state"] == "done"
        time.sleep(2.1)  # one token back
        r = client.post("/v1/videos", json=body)
        assert r.status_code == 429 and "holds 3 job records" in r.text, r.text
        assert 1 <= int(r.headers["retry-after"]) <= 30
        assert "vidrd_jobs_rejected_total 1\n" in client.get("/metrics").text


# ------------------------------------------------------------------------------------------------ bad bodies


BODIES = [  # (what, content-type, body, status)
    ("truncated JSON", "application/json", b'{"prompts": ["a"', 400),
    ("text/plain", "text/plain", b'{"prompts": ["a"]}', 415),
    ("a form", "application/x-www-form-urlencoded", b"prompts=a", 415),
    ("empty prompt", "application/json", b'{"prompts": [""]}', 422),
    ("blank prompt", "application/json", b'{"prompts": ["a", " \\t\\n"]}', 422),
    ("seed over the range", "application/json", b'{"prompts": ["a"], "seed": %d}' % (SEED_MAX + 1), 422),
    ("seed under the range", "application/json", b'{"prompts": ["a"], "seed": %d}' % (SEED_MIN - 1), 422),
    ("huge unknown key", "application/json", b'{"prompts": ["a"], "' + b"k" * 8000 + b'": 1}', 422),
    ("long prompt, lone surrogate", "application/json", b'{"prompts": ["' + b"w" * 250 + b'\\ud800"]}', 422),
]


@pytest.mark.parametrize("what,kind,body,status", BODIES, ids=[b[0] for b in BODIES])
def test_bad_bodies_get_documented_codes_and_short_messages(server, what, kind, body, status):
    client, service = server
    jobs = set(service.registry.jobs)
    r = client.post("/v1/videos", content=body, headers={"content-type": kind})
    assert r.status_code == status, r.text
    assert len(r.content) < 1000, r.text  # nothing of the request is echoed at length
    if status == 422 and "prompt" in what:
        assert r.json()["detail"][0]["loc"][:2] == ["body", "prompts"], r.json()
    assert set(service.registry.jobs) == jobs
    codes = client.get("/openapi.json").json()["paths"]["/v1/videos"]["post"]["responses"]
    assert str(status) in codes


def test_edge_values_accepted(server):
    """The seed range's ends, an empty negative prompt (the official default), a JSON content type with
    parameters or a +json suffix."""
    client, _ = server
    for body, kind in (({"seed": SEED_MAX}, "application/json; charset=utf-8"),
                       ({"seed": SEED_MIN, "negative_prompts": [""]}, "application/vnd.api+json")):
        r = client.post("/v1/videos", content=httpx.Request("POST", "/", json={
            "prompts": ["a"], "steps": 1, "clips": 1, **TINY, **body}).content, headers={"content-type": kind})
        assert r.status_code == 202, r.text
        assert wait(client, r.json()["id"])["state"] == "done"


# ------------------------------------------------------------------------------------------------ signals


def test_repeated_stop_signals_during_shutdown_are_harmless(tmp_path):
    """SIGTERM, another 0.2 s later, then more while it shuts down: one clean shutdown, exit 0, no temp file."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vidrd.runtime.cli", "serve", "--preset", "tiny", "--port",
                             str(port), "--results", str(tmp_path), "--threads", "1", "--max-height", "32",
                             "--max-width", "32", "--max-frames", "4", "--max-steps", "50", "--max-clips", "8",
                             "--max-overlap", "2", "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            t0 = time.monotonic()
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/healthz").status_code == 200:
                        break
                assert proc.poll() is None and time.monotonic() - t0 < 120, "vidrd serve did not come up"
                time.sleep(0.2)
            running = submit(client, steps=50, clips=8)
            wait(client, running, until=lambda st: st["clips_done"] >= 1)
    finally:
        for stop in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
            if proc.poll() is None:
                proc.send_signal(stop)
                time.sleep(0.2)
        _, err = proc.communicate(timeout=60)
    # signals after the first stay ignored until the process has exited: never 134 (abort), 130, killed by a late
    # signal, or a traceback from a cut cleanup
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "terminate called" not in err, err
    assert temp_files(tmp_path) == [] and [p.name for p in tmp_path.rglob(".*")] == []
    assert job_dir(tmp_path, running).is_dir()
