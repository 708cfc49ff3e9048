"""Webhooks (callbacks.py): a request's callback_url gets clip and end events in order, with retries and a timeout,
from threads that never hold the worker; bad and private URLs are 422 with no traffic sent; --no-callbacks refuses.
Every receiver is a local server on 127.0.0.1."""
import contextlib
import http.server
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_service import LIMITS, TINY, serving, wait  # noqa: E402
from vidrd.ref.weights import random_model  # noqa: E402
from vidrd.runtime.cli import parser  # noqa: E402
from vidrd.runtime.cli.serve import config_from  # noqa: E402
from vidrd.runtime.serve import callbacks  # noqa: E402
from vidrd.runtime.serve.jobs import ServeConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", 0)


@contextlib.contextmanager
def receiver(fail_first: int = 0):
    """An HTTP server on 127.0.0.1 that answers 500 to its first `fail_first` POSTs and 200 after; yields (url,
    posts): every POST's decoded JSON body and the status it got, in arrival order."""
    posts = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status = 500 if len(posts) < fail_first else 200
            posts.append((body, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook?x=1", posts
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def until(check, timeout: float) -> float:
    """Seconds until `check()` is true; fails after `timeout`."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - t0


def post(client, **body) -> str:
    r = client.post("/v1/videos", json={"prompts": ["a boat"], "steps": 2, "clips": 2, **TINY, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def config(tmp_path, **kw) -> ServeConfig:
    return ServeConfig(results=str(tmp_path / "results"), **LIMITS, **kw)


def test_clip_and_done_events_arrive_in_order(model, tmp_path):
    with receiver() as (url, posts), serving(model, config(tmp_path, allow_private_callbacks=True)) as (client, _):
        job = post(client, clips=2, callback_url=url)
        assert client.get(f"/v1/videos/{job}").json()["request"]["callback_url"] == url  # kept in the spec
        assert wait(client, job)["state"] == "done"
        until(lambda: len(posts) == 3, 10)
    assert [(b["event"], b["state"], b["clips_done"]) for b, _ in posts] == [
        ("clip", "running", 1), ("clip", "running", 2), ("done", "done", 2)]
    # a clip is published after the next clip's first step: progress is at least its clips' share
    progress = [b["progress"] for b, _ in posts]
    assert 0.5 <= progress[0] <= progress[1] == progress[2] == 1.0, progress
    assert all(b["id"] == job and b["error"] is None and set(b) == {"id", "event", "state", "clips_done",
                                                                    "progress", "error"} for b, _ in posts)


def test_a_failing_receiver_gets_the_event_after_retries(model, tmp_path):
    cfg = config(tmp_path, allow_private_callbacks=True, callback_timeout_s=2.0, callback_retries=3)
    with receiver(fail_first=2) as (url, posts), serving(model, cfg) as (client, service):
        job = post(client, clips=1, callback_url=url)
        assert wait(client, job)["state"] == "done"
        until(lambda: service.registry.callbacks.delivered == 2, 10)  # backoff 0.5 s + 1 s
    assert [(b["event"], status) for b, status in posts] == [("clip", 500), ("clip", 500), ("clip", 200),
                                                             ("done", 200)]
    assert service.registry.callbacks.failed == 0


def test_a_receiver_that_never_answers_is_given_up_without_stalling_the_job(model, tmp_path):
    timeout_s, retries = 0.3, 2
    bound = (retries + 1) * timeout_s + sum(callbacks.BACKOFF_S * 2 ** i for i in range(retries))  # per event
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        cfg = config(tmp_path, allow_private_callbacks=True, callback_timeout_s=timeout_s, callback_retries=retries)
        with serving(model, cfg) as (client, service):
            t0 = time.monotonic()
            job = post(client, clips=2, callback_url=url)
            assert wait(client, job)["state"] == "done"
            ran = time.monotonic() - t0
            sender = service.registry.callbacks
            assert sender.failed == 0  # the job ended while its first event was still being tried
            waited = until(lambda: sender.failed == 3, 3 * bound + 5)
            assert sender.delivered == 0
    print(f"job {ran:.2f} s; 3 events given up {ran + waited:.2f} s after submission (bound {bound:.2f} s each)")
    assert ran + waited <= 3 * bound + 5


@pytest.fixture(scope="module")
def strict(model, tmp_path_factory):
    """A service with the default policy: no callbacks to private addresses."""
    with serving(model, ServeConfig(results=str(tmp_path_factory.mktemp("results")), **LIMITS)) as s:
        yield s


@pytest.mark.parametrize("url, says", [
    ("ftp://example.com/hook", "http:// or https://"),
    ("not a url", "http:// or https://"),
    ("http:///no-host", "http:// or https://"),
    ("http://example.com:99999/", "not a URL"),
    ("http://localhost:9/", "loopback"),
    ("http://[::1]:9/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://10.1.2.3/", "private"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
])
def test_bad_and_private_callback_urls_are_422(strict, url, says):
    client, service = strict
    jobs = set(service.registry.jobs)
    r = client.post("/v1/videos", json={"prompts": ["a"], "steps": 2, "clips": 1, **TINY, "callback_url": url})
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "callback_url"] and says in err["msg"], err
    assert set(service.registry.jobs) == jobs


def test_a_private_receiver_gets_no_traffic(strict):
    client, _ = strict
    with receiver() as (url, posts):
        r = client.post("/v1/videos", json={"prompts": ["a"], "steps": 2, "clips": 1, **TINY, "callback_url": url})
        assert r.status_code == 422 and "loopback" in r.text
        time.sleep(0.2)
    assert posts == []


def test_a_name_resolving_to_a_private_address_is_refused_at_send_time(monkeypatch):
    """DNS rebinding: the name passed the submit-time check; the address it resolves to when sending is checked,
    and the connection would go to that checked address."""
    calls = []

    def fake(host, port, type=0):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    assert callbacks.check_url("http://hooks.example.com/x", allow_private=False)
    with pytest.raises(ValueError, match="hooks.example.com resolves to 127.0.0.1 is a loopback"):
        callbacks.post("http://hooks.example.com/x", b"{}", 1.0, allow_private=False)
    assert callbacks.resolve("hooks.example.com", 80, allow_private=True) == "127.0.0.1"
    assert calls == ["hooks.example.com"] * 2


def test_no_callbacks_refuses_requests_with_a_callback_url(strict, model, tmp_path):
    args = parser().parse_args(["serve", "--no-callbacks", "--results", str(tmp_path)])
    assert config_from(args).callbacks is False
    assert config_from(parser().parse_args(["serve", "--allow-private-callbacks"])).allow_private_callbacks
    with serving(model, config(tmp_path, callbacks=False)) as (client, service):
        assert service.registry.callbacks is None
        r = client.post("/v1/videos", json={"prompts": ["a"], "steps": 2, "clips": 1, **TINY,
                                            "callback_url": "https://example.com/hook"})
        assert r.status_code == 422 and "--no-callbacks" in r.json()["detail"][0]["msg"], r.text
        assert post(client, clips=1)  # without one, as ever
