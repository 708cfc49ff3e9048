"""The HTTP service (`vidrd serve`) on the tiny preset, on loopback: streaming, parity with `vidrd generate`, load,
faults, bad input, OpenAPI, API key, janitor; and (slow) the Ray Serve deployment with two CPU replicas."""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from tolerances import SERVICE_VS_CLI_MP4_MEAN  # noqa: E402
from vidrd.ref.weights import random_model  # noqa: E402
from vidrd.runtime.cli import main  # noqa: E402
from vidrd.runtime.bench import service as serve_bench  # noqa: E402
from vidrd.runtime.loop import Limits  # noqa: E402
from vidrd.runtime.serve.jobs import Registry, ServeConfig, job_dir  # noqa: E402
from vidrd.runtime.video_io import read_video  # noqa: E402

TINY = {"height": 32, "width": 32, "frames": 4, "overlap": 2}  # 32x32 pixels, 4 frames per clip
LIMITS = dict(queue_size=4, limits=Limits(batch=2, frames=4, height=48, width=48, steps=12, overlap=2, clips=3,
                                          video_prompts=2),
              max_prompt_chars=300, max_body_bytes=16384)
FINISHED = ("done", "failed", "cancelled")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", 0)  # what `vidrd generate --preset tiny` uses (weights seed 0)


@contextlib.contextmanager
def serving(model, config: ServeConfig):
    """A real uvicorn server on 127.0.0.1 and an ephemeral port, in a thread; yields (httpx client, service)."""
    with serve_bench.serving(model, config) as (base, service), httpx.Client(base_url=base, timeout=30) as client:
        yield client, service


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    with serving(model, ServeConfig(results=str(tmp_path_factory.mktemp("results")), **LIMITS)) as s:
        yield s


def wait(client, job_id, until=lambda st: st["state"] in FINISHED, timeout=120.0, seen=None):
    """Poll a job's status until `until(status)`; `seen` collects every status read."""
    t0 = time.monotonic()
    while True:
        st = client.get(f"/v1/videos/{job_id}").json()
        if seen is not None:
            seen.append(st)
        if until(st):
            return st
        assert time.monotonic() - t0 < timeout, f"job {job_id} stuck: {st}"
        time.sleep(0.02)


def submit(client, **body):
    r = client.post("/v1/videos", json={"prompts": ["a boat"], "steps": 2, "clips": 2, **TINY, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_streams_clips_while_running_and_file_equals_vidrd_generate(server, tmp_path):
    client, _ = server
    prompts = ["a boat sailing on a lake", "wood on fire"]
    body = {"prompts": prompts, "height": 48, "width": 32, "frames": 4, "steps": 10, "clips": 3, "overlap": 2,
            "seed": 7, "format": "mp4"}
    r = client.post("/v1/videos", json=body)
    assert r.status_code == 202 and r.headers["location"] == f"/v1/videos/{r.json()['id']}"
    job_id, seen = r.json()["id"], []
    assert client.get(f"/v1/videos/{job_id}/file").status_code == 409  # not done yet
    wait(client, job_id, until=lambda st: st["clips_done"] >= 1, seen=seen)
    clip = client.get(f"/v1/videos/{job_id}/clips/0", params={"video": 1})
    during = client.get(f"/v1/videos/{job_id}").json()
    assert clip.status_code == 200 and clip.headers["content-type"] == "video/mp4"
    assert during["state"] == "running" and during["clips_done"] < 3  # clip 0 played while later clips denoise
    later = client.get(f"/v1/videos/{job_id}/clips/2")
    assert later.status_code == 409 and later.headers["retry-after"] == "1"
    (tmp_path / "clip0.mp4").write_bytes(clip.content)
    assert read_video(tmp_path / "clip0.mp4").shape == (4, 48, 32, 3)
    st = wait(client, job_id, seen=seen)
    assert st["state"] == "done" and st["clips_done"] == 3 and st["steps_done"] == st["steps_total"] == 30
    steps = [s["steps_done"] for s in seen]
    assert steps == sorted(steps) and any(0 < s < 30 for s in steps)  # progress was visible and monotonic
    for v in range(2):
        got = client.get(f"/v1/videos/{job_id}/file", params={"video": v})
        assert got.status_code == 200
        (tmp_path / f"service-{v}.mp4").write_bytes(got.content)
    assert client.get(f"/v1/videos/{job_id}/file", params={"video": 2}).status_code == 404
    # the same request through `vidrd generate` gives the same frames (same VideoWriter, fps, encoder settings)
    args = ["generate", "--prompt", prompts[0], "--prompt", prompts[1], "-o", str(tmp_path / "cli.mp4"), "--height",
            "48", "--width", "32", "--frames", "4", "--steps", "10", "--clips", "3", "--overlap", "2", "--seed", "7",
            "--no-progress", "--preset", "tiny"]
    assert main(args) == 0
    for v in range(2):
        want = read_video(tmp_path / f"cli-{v}.mp4").astype(np.int16)
        got = read_video(tmp_path / f"service-{v}.mp4").astype(np.int16)
        assert want.shape == got.shape == (12, 48, 32, 3)
        # not byte-equal: the service's runtime has buffers sized for its limits (48x48) and runs on the worker
        # thread, so kernels may sum in another order, and H.264 amplifies a one-level change into a block
        diff = np.abs(got - want)
        print(f"service vs vidrd generate, video {v}: mean {diff.mean():.4f} max {diff.max()} "
              f"frac>2 {(diff > 2).mean():.5f}")
        assert diff.mean() <= SERVICE_VS_CLI_MP4_MEAN, diff.mean()


def test_quality_preset_job(server):
    """A request's `quality` fills the settings it leaves out (solver, spacing, reuse); the job runs them."""
    client, _ = server
    st = wait(client, submit(client, quality="fast", steps=6))  # the request: 6 steps, which fast scales to 4
    assert st["state"] == "done" and st["steps_total"] == 2 * 4
    s, q = st["request"]["settings"], st["request"]["quality"]
    assert (s["solver"], s["spacing"], s["steps"], s["cache_interval"], s["guidance_reuse_after"]) == \
        ("dpmpp-2m", "trailing", 4, 1, 1.0)
    assert q["quality"] == "fast" and q["why"]["steps"] == "0.4 x 6 requested, kept within 4..6"
    r = client.post("/v1/videos", json={"prompts": ["a"], "quality": "exact", "cache_interval": 2})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "quality"]
    assert "drop cache_interval" in r.json()["detail"][0]["msg"]


def test_cancel_mid_clip_stops_within_one_step(server):
    client, _ = server
    job_id = submit(client, steps=12, clips=3)
    wait(client, job_id, until=lambda st: st["steps_done"] >= 3)
    r = client.delete(f"/v1/videos/{job_id}")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    at_cancel = r.json()["steps_done"]
    st = wait(client, job_id)
    assert st["state"] == "cancelled" and st["steps_done"] <= at_cancel + 1 < st["steps_total"]
    assert client.get(f"/v1/videos/{job_id}/file").status_code == 409
    assert client.get(f"/v1/videos/{job_id}/clips/2").status_code == 409
    assert client.delete(f"/v1/videos/{job_id}").status_code == 200  # idempotent
    # a queued job is cancelled at once; a finished one cannot be
    blocker, queued = submit(client, steps=12), submit(client)
    r = client.delete(f"/v1/videos/{queued}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert wait(client, blocker)["state"] == "done"
    assert client.delete(f"/v1/videos/{blocker}").status_code == 409
    assert client.get(f"/v1/videos/{queued}").json()["steps_done"] == 0


def test_a_job_failing_in_the_worker_reports_its_error_and_the_next_job_runs(server):
    client, service = server
    job_id = submit(client, steps=10, clips=3)
    wait(client, job_id, until=lambda st: st["clips_done"] >= 1)
    folder = job_dir(service.config.results, job_id)  # the results storage breaks under the running job
    shutil.rmtree(folder)
    folder.write_text("not a folder any more")
    st = wait(client, job_id)
    assert st["state"] == "failed" and re.search(r"NotADirectory|FileNotFound|No such file", st["error"]), st
    assert client.get(f"/v1/videos/{job_id}/file").status_code == 409
    assert wait(client, submit(client))["state"] == "done"  # the runtime was released


def raw_get(port: int, path: str, read: int) -> bytes:
    """GET over a raw socket, read `read` bytes, then reset the connection (a client that goes away)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = s.recv(read)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    s.close()
    return data


def test_clients_that_disconnect_mid_stream(server):
    client, _ = server
    port = int(str(client.base_url).rsplit(":", 1)[1].rstrip("/"))
    running = submit(client, steps=10, clips=3, format="gif")
    wait(client, running, until=lambda st: st["clips_done"] >= 1)
    assert raw_get(port, f"/v1/videos/{running}/clips/0", 64).startswith(b"HTTP/1.1 200")
    done = wait(client, running)
    assert done["state"] == "done"
    for _ in range(3):
        assert raw_get(port, f"/v1/videos/{running}/file", 100).startswith(b"HTTP/1.1 200")
    # a client that sends half a body and leaves
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{")
    s.close()
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get(f"/v1/videos/{running}/file").content[:6] in (b"GIF89a", b"GIF87a")
    assert wait(client, submit(client))["state"] == "done"


BAD = [  # (what, method, path, body or raw bytes, status, field named in the 422)
    ("malformed JSON", "post", "/v1/videos", b'{"prompts": ["a"', 400, None),
    ("not JSON at all", "post", "/v1/videos", b"prompts=a", 400, None),
    ("wrong type", "post", "/v1/videos", {"prompts": ["a"], "steps": "2"}, 422, "steps"),
    ("bool as int", "post", "/v1/videos", {"prompts": ["a"], "temporal_decode": 1}, 422, "temporal_decode"),
    ("prompt not a list", "post", "/v1/videos", {"prompts": "a"}, 422, "prompts"),
    ("no prompts", "post", "/v1/videos", {"prompts": []}, 422, "prompts"),
    ("unknown key", "post", "/v1/videos", {"prompts": ["a"], "stepz": 2}, 422, "stepz"),
    ("height not /8", "post", "/v1/videos", {"prompts": ["a"], "height": 36}, 422, "height"),
    ("zero steps", "post", "/v1/videos", {"prompts": ["a"], "steps": 0}, 422, "steps"),
    ("frames over limit", "post", "/v1/videos", {"prompts": ["a"], "frames": 99}, 422, "frames"),
    ("size over limit", "post", "/v1/videos", {"prompts": ["a"], "height": 32, "width": 512, "frames": 4, "steps": 2},
     422, "width"),
    ("clips over limit", "post", "/v1/videos", {"prompts": ["a"], "clips": 4, "steps": 2, **TINY}, 422, "clips"),
    ("batch over limit", "post", "/v1/videos", {"prompts": ["a", "b", "c"]}, 422, "prompts"),
    ("overlap >= frames", "post", "/v1/videos", {"prompts": ["a"], "clips": 2, "frames": 4, "overlap": 4}, 422,
     "overlap"),
    ("negative guidance", "post", "/v1/videos", {"prompts": ["a"], "guidance_scale": -1.0}, 422, "guidance_scale"),
    ("bad assembly", "post", "/v1/videos", {"prompts": ["a"], "assembly": "glue"}, 422, "assembly"),
    ("bad format", "post", "/v1/videos", {"prompts": ["a"], "format": "avi"}, 422, "format"),
    ("negatives mismatch", "post", "/v1/videos", {"prompts": ["a"], "negative_prompts": ["x", "y"]}, 422,
     "negative_prompts"),
    ("huge prompt", "post", "/v1/videos", {"prompts": ["word " * 5000]}, 413, None),
    ("long prompt", "post", "/v1/videos", {"prompts": ["w" * 301]}, 422, "prompts"),
    ("huge body", "post", "/v1/videos", b"{" + b" " * 100_000 + b"}", 413, None),
    ("unknown job", "get", "/v1/videos/" + "0" * 32, None, 404, None),
    ("unknown job clip", "get", "/v1/videos/" + "0" * 32 + "/clips/0", None, 404, None),
    ("unknown job cancel", "delete", "/v1/videos/" + "0" * 32, None, 404, None),
    ("short id", "get", "/v1/videos/abc", None, 422, None),
    ("upper-case id", "get", "/v1/videos/" + "A" * 32, None, 422, None),
    ("dot-dot id", "get", "/v1/videos/%2e%2e", None, 422, None),
    ("dot-dot file", "get", "/v1/videos/%2e%2e/file", None, 422, None),
    ("traversal", "get", "/v1/videos/..%2F..%2F..%2Fetc%2Fpasswd", None, 404, None),
    ("traversal in clip", "get", "/v1/videos/" + "0" * 32 + "/clips/..%2F..%2Fx", None, 404, None),
    ("negative clip", "get", "/v1/videos/" + "0" * 32 + "/clips/-1", None, 422, None),
    ("no such route", "get", "/v1/jobs", None, 404, None),
    # values that would pass a looser validation and then fail the job (or answer 500)
    ("lone surrogate prompt", "post", "/v1/videos", b'{"prompts": ["a \\ud800 b"]}', 422, "prompts"),
    ("lone surrogate negative", "post", "/v1/videos", b'{"prompts": ["a"], "negative_prompts": ["\\udfff"]}', 422,
     "negative_prompts"),
    ("huge guidance", "post", "/v1/videos", {"prompts": ["a"], "guidance_scale": 1e300}, 422, "guidance_scale"),
    ("huge noise recycle", "post", "/v1/videos", {"prompts": ["a"], "noise_recycle": 1e300}, 422, "noise_recycle"),
    ("tiny fps gif", "post", "/v1/videos", {"prompts": ["a"], "format": "gif", "fps": 0.0004, "steps": 2, **TINY},
     422, "fps"),
    ("tiny fps mp4", "post", "/v1/videos", {"prompts": ["a"], "fps": 0.0004, "steps": 2, **TINY}, 422, "fps"),
    ("gif over 100 fps", "post", "/v1/videos", {"prompts": ["a"], "format": "gif", "fps": 110.0, "steps": 2, **TINY},
     422, "fps"),
    ("deeply nested JSON", "post", "/v1/videos", b'{"prompts": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    # a prompt per clip: the rules of Request.clip_prompts, checked before the job
    ("clip prompts with a batch", "post", "/v1/videos", {"prompts": ["a", "b"], "clip_prompts": ["c"], **TINY}, 422,
     "clip_prompts"),
    ("empty clip prompt", "post", "/v1/videos", {"prompts": ["a"], "clip_prompts": ["c", " "], "clips": 3, **TINY},
     422, "clip_prompts"),
    ("more clip prompts than clips", "post", "/v1/videos", {"prompts": ["a"], "clip_prompts": ["b", "c"], "clips": 2,
                                                           **TINY}, 422, "clip_prompts"),
    ("clip prompts a string", "post", "/v1/videos", {"prompts": ["a"], "clip_prompts": "b", **TINY}, 422,
     "clip_prompts"),
    ("clip prompts over the limit", "post", "/v1/videos", {"prompts": ["a"], "clip_prompts": ["b", "c"], "clips": 3,
                                                          "steps": 2, **TINY}, 422, "clip_prompts"),
    ("negatives mismatch with clip prompts", "post", "/v1/videos",
     {"prompts": ["a"], "negative_prompts": ["x", "y"], "clip_prompts": ["b"], **TINY}, 422, "negative_prompts"),
]


@pytest.mark.parametrize("what,method,path,body,status,field", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_its_4xx(server, what, method, path, body, status, field):
    client, service = server
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else (
        {"json": body} if body is not None else {})
    jobs = set(service.registry.jobs)
    r = client.request(method.upper(), path, **kw)
    assert r.status_code == status, (what, r.text)
    if field is not None:
        assert any(field in map(str, e["loc"]) for e in r.json()["detail"]), r.json()
    assert set(service.registry.jobs) == jobs  # refused before a job was recorded


def test_the_service_refuses_what_its_runtime_would_with_the_runtimes_message(model):
    """One rule, one message: to_spec runs the runtime's own checks (Limits.check, the schedule's check_steps), so
    its 422 names the field with the message the runtime's error starts with."""
    from fastapi.exceptions import RequestValidationError

    from vidrd.ref.sampler import SamplerSettings
    from vidrd.runtime.loop import Request
    from vidrd.runtime.options import open_runtime
    from vidrd.runtime.serve.api import VideoRequest, to_spec
    lim = Limits(batch=2, frames=4, height=32, width=32, steps=1000, overlap=2, clips=3)
    config = ServeConfig(limits=lim).for_model(model)
    rt = open_runtime(model, limits=config.limits)
    small = dict(height=32, width=32, frames=4, steps=2, overlap=2)
    for change, field in ((dict(frames=8), "frames"), (dict(width=40), "width"), (dict(clips=4), "clips"),
                          (dict(clips=2, overlap=3), "overlap"), (dict(prompts=["a", "b", "c"]), "prompts"),
                          (dict(steps=1000), "steps")):  # leading spacing: 999 of the 1000 training timesteps
        body = {"prompts": ["a"], **small, **change}
        with pytest.raises(RequestValidationError) as e:
            to_spec(VideoRequest(**body), config)
        err = e.value.errors()[0]
        assert err["loc"] == ("body", field) and err["msg"].startswith(f"{field if field != 'prompts' else 'batch'}=")
        prompts = body.pop("prompts")
        with pytest.raises(ValueError) as refused:
            rt.generate(Request(tuple(prompts), None, SamplerSettings(**body)))
        assert str(refused.value).startswith(err["msg"]), (err["msg"], str(refused.value))
    assert to_spec(VideoRequest(prompts=["a", "b"], **{**small, "clips": 3}), config)  # at the limits: accepted
    rt.close()


def test_frame_size_the_encoder_refuses_is_a_422_before_the_job():
    from fastapi.exceptions import RequestValidationError

    from vidrd.runtime.serve.api import VideoRequest, to_spec
    config = ServeConfig(limits=Limits(height=64, width=20000, frames=4, steps=2))
    assert to_spec(VideoRequest(prompts=["a"], height=8, width=16384, frames=4, steps=2), config)
    with pytest.raises(RequestValidationError) as e:
        to_spec(VideoRequest(prompts=["a"], height=8, width=16392, frames=4, steps=2), config)
    assert e.value.errors()[0]["loc"] == ("body", "width") and "16392x8" in e.value.errors()[0]["msg"]
    # gif holds wider frames than H.264, and PNG has no such limit: each format is asked for its own
    assert to_spec(VideoRequest(prompts=["a"], height=8, width=16392, frames=4, steps=2, format="gif"), config)


def test_service_keeps_serving_after_bad_input(server):
    client, _ = server
    with httpx.Client(base_url=client.base_url) as c:  # a chunked body (no Content-Length) over the limit
        r = c.post("/v1/videos", content=iter([b'{"prompts": ["'] + [b"x" * 4096] * 8 + [b'"]}']),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/healthz").status_code == 200
    assert wait(client, submit(client))["state"] == "done"


def test_openapi_lists_the_routes_and_codes(server):
    client, _ = server
    paths = client.get("/openapi.json").json()["paths"]
    codes = {p: {m: sorted(int(c) for c in op["responses"]) for m, op in ms.items()} for p, ms in paths.items()}
    assert codes == {"/v1/videos": {"post": [202, 400, 408, 413, 415, 422, 429, 503]},
                     "/v1/videos/{job_id}": {"get": [200, 404, 422], "delete": [200, 202, 404, 409, 422]},
                     "/v1/videos/{job_id}/clips/{k}": {"get": [200, 404, 409, 422, 503]},
                     "/v1/videos/{job_id}/file": {"get": [200, 404, 409, 422, 503]},
                     "/v1/videos/{job_id}/events": {"get": [200, 404, 422]},
                     "/v1/videos/{job_id}/preview": {"get": [200, 404, 409, 422]},
                     "/healthz": {"get": [200, 503]}, "/metrics": {"get": [200]}}
    post = paths["/v1/videos"]["post"]
    assert "Retry-After" in post["responses"]["429"]["headers"]
    clip = paths["/v1/videos/{job_id}/clips/{k}"]["get"]
    assert set(clip["responses"]["200"]["content"]) == {"video/mp4", "image/gif"}
    assert {p["name"] for p in clip["parameters"]} == {"job_id", "k", "video"}
    assert set(paths["/v1/videos/{job_id}/events"]["get"]["responses"]["200"]["content"]) == {"text/event-stream"}
    assert set(paths["/v1/videos/{job_id}/preview"]["get"]["responses"]["200"]["content"]) == {"image/png"}
    # every status a test above saw is documented for its route
    for what, method, path, _, status, _ in BAD:
        if status not in (404, 413) and path.startswith("/v1/videos/"):
            route = "/v1/videos/{job_id}" + ("/file" if path.endswith("/file") else "")
            route = "/v1/videos/{job_id}/clips/{k}" if "/clips/" in path else route
            assert status in codes[route][method], what


def test_metrics_prometheus_text(server):
    client, _ = server
    wait(client, submit(client))
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    sample = re.compile(r'^[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? -?[0-9.e+]+$')
    values = {}
    for line in r.text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["vidrd_queue_depth"] == 0 and values['vidrd_jobs{state="done"}'] >= 1
    for stage in ("queue_wait", "first_clip", "denoise_step", "run", "total"):
        assert values[f'vidrd_stage_seconds_count{{stage="{stage}"}}'] >= 1
        assert values[f'vidrd_stage_seconds_bucket{{stage="{stage}",le="+Inf"}}'] == \
            values[f'vidrd_stage_seconds_count{{stage="{stage}"}}']
    assert values["vidrd_frames_total"] > 0 and values["vidrd_frames_per_second"] > 0


def test_api_key(model, tmp_path):
    config = ServeConfig(results=str(tmp_path), api_key="s3cret-key-1", **LIMITS)
    with serving(model, config) as (client, _):
        body = {"prompts": ["a"], "steps": 1, "clips": 1, **TINY}
        assert client.post("/v1/videos", json=body).status_code == 401
        # the key is checked before the body is read or parsed: no 422 or 413 tells a stranger anything
        bad = client.post("/v1/videos", content=b'{"prompts": ["a"', headers={"content-type": "application/json"})
        assert bad.status_code == 401, bad.text
        huge = client.post("/v1/videos", content=b"x" * 100_000, headers={"content-type": "application/json"})
        assert huge.status_code == 401, huge.text
        assert client.post("/v1/videos", json=body, headers={"X-API-Key": "wrong-key-1"}).status_code == 401
        assert client.post("/v1/videos", json=body, headers={"Authorization": "Basic czNjcmV0"}).status_code == 401
        r = client.post("/v1/videos", json=body, headers={"Authorization": "Bearer s3cret-key-1"})
        assert r.status_code == 202
        assert client.get(f"/v1/videos/{r.json()['id']}", headers={"X-API-Key": "s3cret-key-1"}).status_code == 200
        assert client.get(f"/v1/videos/{r.json()['id']}").status_code == 401
        assert client.get("/healthz").status_code == 200 and client.get("/metrics").status_code == 200
        spec = client.get("/openapi.json").json()
        assert 401 in map(int, spec["paths"]["/v1/videos/{job_id}"]["get"]["responses"])
        assert {"HTTPBearer", "APIKeyHeader"} <= set(spec["components"]["securitySchemes"])


def test_slow_clients_are_cut_off(model, tmp_path):
    """A client that dribbles its headers loses the connection; one that stalls its body gets 408; others go on."""
    config = ServeConfig(results=str(tmp_path), read_timeout_s=1.0, **LIMITS)
    with serving(model, config) as (client, _):
        port = int(str(client.base_url).rsplit(":", 1)[1].rstrip("/"))
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            assert s.recv(1024) == b""  # closed by the server
        assert 0.9 < time.monotonic() - t0 < 5
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{")
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert client.get("/healthz").status_code == 200
        assert wait(client, submit(client))["state"] == "done"


def test_janitor_deletes_expired_jobs_and_orphans_only(tmp_path):
    registry = Registry(ServeConfig(results=str(tmp_path), ttl_s=60), janitor_period_s=3600)
    try:
        spec = {"prompts": ["a"], "format": "mp4", "settings": {"clips": 1, "steps": 1}}
        job_id, open_id, orphan = "a" * 32, "b" * 32, "c" * 32
        for i in (job_id, open_id):
            assert registry.submit(i, spec) is None
            (tmp_path / i).mkdir()
        registry.take(job_id, "test")
        registry.finish(job_id, "done", frames=4)
        (tmp_path / orphan).mkdir()
        (tmp_path / "keep-me").mkdir()
        old = time.time() - 120
        for name in (orphan, "keep-me", open_id):
            os.utime(tmp_path / name, (old, old))
        assert registry.sweep() == [] and (tmp_path / job_id).exists()  # not expired yet
        assert not (tmp_path / orphan).exists()  # nobody's folder, older than the TTL
        assert registry.sweep(now=time.time() + 61) == [job_id]
        assert not (tmp_path / job_id).exists() and registry.status(job_id) is None
        assert (tmp_path / open_id).exists() and (tmp_path / "keep-me").exists()  # queued jobs never expire
    finally:
        registry.close()


def test_load_20_clients_over_a_small_queue(model, tmp_path):
    """24 clients at once, queue of 3: accepted jobs all end (done, or cancelled), refusals are 429 + Retry-After."""
    n_clients = 24
    config = ServeConfig(results=str(tmp_path), submit_burst=1000, **{**LIMITS, "queue_size": 3})  # one address
    body = {"prompts": ["a boat"], "steps": 2, "clips": 2, **TINY}
    with serving(model, config) as (client, service):
        results, wall = serve_bench.load(str(client.base_url), n_clients, body, cancel_every=6)
        metrics = client.get("/metrics").text
        known = set(service.registry.jobs)
    assert not [r for r in results if "error" in r]
    assert all(set(r["codes"][:-1]) <= {429} and r["codes"][-1] == 202 for r in results)  # every refusal: 429
    assert all(int(ra) >= 1 for r in results for ra in r.get("retry_after", []))
    ids = [r["id"] for r in results]
    assert len(set(ids)) == n_clients and known == set(ids)  # nothing lost, nothing duplicated
    rejected = sum(r["rejected"] for r in results)
    assert rejected > 0 and f"vidrd_jobs_rejected_total {rejected}\n" in metrics
    for r in results:
        # a cancel stops a job at its next step; one that lands after the last step (during the last decode, so
        # steps_done == steps_total in the cancel's answer) or after the end (409) cannot, and the job is done
        late = r["cancel"] and (r["cancel_status"] == 409 or r["cancel_at"][0] == r["cancel_at"][1])
        if r["cancel"] and not late:
            assert r["cancel_status"] in (200, 202) and r["state"] == "cancelled", r
        else:
            assert r["state"] == "done" and r["bytes"] > 0, r
    row = {"bench": "vidrd.serve (test)", "clients": n_clients, "queue": 3, **serve_bench.summarize(results, wall)}
    print("\n" + json.dumps(row))


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_vidrd_serve_command(tmp_path, stop):
    """The CLI end to end in a subprocess: starts, serves a job, and on SIGINT or SIGTERM (docker stop, systemd)
    stops the running job (it stays open in the job store) and exits cleanly, leaving no temporary file."""
    assert main(["serve", "--max-height", "30"]) == 2  # a bad limit fails before anything loads
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
            assert wait(client, submit(client))["state"] == "done"
            assert client.post("/v1/videos", json={"prompts": ["a"], "steps": 51}).status_code == 422
            running = submit(client, steps=50, clips=8)
            st = wait(client, running, until=lambda st: st["steps_done"] >= 1)
            assert st["state"] == "running"
    finally:
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "serving preset tiny" in err and "Traceback" not in err
    leftovers = [p.name for p in tmp_path.rglob(".*")]
    assert leftovers == [], leftovers  # the running job's temporary video was dropped


# ------------------------------------------------------------------------------------------------ Ray Serve


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
def test_ray_serve_two_replicas_shared_registry_and_a_killed_replica(tmp_path):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from vidrd.runtime.options import RuntimeOptions
    from vidrd.runtime.serve.ray import build, start_registry

    # metrics every second so that the autoscaler reacts within the test
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "1"
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "1"
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 2**20, logging_level="warning")
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(results=str(tmp_path), **{**LIMITS, "queue_size": 8})
        start_registry(config)
        model_args = dict(weights=None, sd=None, ckpt=None, vae=None, preset="tiny", weights_seed=0)
        app = build(config, model_args, RuntimeOptions(), min_replicas=1, max_replicas=2,
                    autoscaling={"upscale_delay_s": 0, "look_back_period_s": 2, "metrics_interval_s": 1})
        serve.run(app, name="vidrd", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            # one replica to start with; a backlog of 8 jobs makes the autoscaler add the second one
            ids = [submit(client, steps=12, clips=3, seed=i) for i in range(8)]
            states = [wait(client, i, timeout=300) for i in ids]
            assert [s["state"] for s in states] == ["done"] * 8, states
            workers = {s["worker"] for s in states}
            assert len(workers) == 2, workers  # jobs ran on both replicas
            # files written by either replica are served through the ingress: shared results folder + registry
            assert all(client.get(f"/v1/videos/{i}/file").status_code == 200 for i in ids)
            # cancel through the registry
            job = submit(client, steps=12, clips=3)
            wait(client, job, until=lambda st: st["steps_done"] >= 2)
            at = client.delete(f"/v1/videos/{job}").json()["steps_done"]
            st = wait(client, job)
            assert st["state"] == "cancelled" and st["steps_done"] <= at + 1
            # a replica killed mid-job: that job fails cleanly (or is retried), and later jobs still run
            job = submit(client, steps=12, clips=3)
            st = wait(client, job, until=lambda st: st["steps_done"] >= 2)
            os.kill(int(st["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
            st = wait(client, job, timeout=240)
            # Serve does not retry a call whose replica died: the job fails, once, saying why
            assert st["state"] == "failed" and "lost" in st["error"] and st["attempts"] == 1, st
            print(f"\nkilled replica's job: {st['state']} ({st['error']}), attempts {st['attempts']}")
            assert wait(client, submit(client), timeout=240)["state"] == "done"
            assert client.get("/metrics").status_code == 200
    finally:
        serve.shutdown()
        ray.shutdown()
        for name in ("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
                     "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"):
            os.environ.pop(name, None)


@pytest.mark.slow
def test_ray_serve_replicas_share_a_postgresql_store_and_a_killed_replicas_job_resumes(tmp_path, pg_url):
    """--ray with --jobs-db postgresql://: no registry actor; the ingress answers from the database, both replicas
    claim jobs there, and the job of a replica killed mid-job is taken over by the other after its lease expired
    and resumes from its last clip."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from vidrd.runtime.options import RuntimeOptions
    from vidrd.runtime.serve.ray import REGISTRY, NAMESPACE, build

    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=100 * 2**20, logging_level="warning")
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(results=str(tmp_path), jobs_db=pg_url, lease_s=5.0, **{**LIMITS, "queue_size": 8})
        model_args = dict(weights=None, sd=None, ckpt=None, vae=None, preset="tiny", weights_seed=0)
        serve.run(build(config, model_args, RuntimeOptions(), min_replicas=2, max_replicas=2), name="vidrd",
                  route_prefix="/")
        with pytest.raises(ValueError):
            ray.get_actor(REGISTRY, namespace=NAMESPACE)  # the database is the registry
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            ids = [submit(client, steps=12, clips=3, seed=i) for i in range(4)]
            states = [wait(client, i, timeout=300) for i in ids]
            assert [s["state"] for s in states] == ["done"] * 4, states
            assert len({s["worker"] for s in states}) == 2  # jobs ran on both replicas
            assert all(client.get(f"/v1/videos/{i}/file").status_code == 200 for i in ids)
            job = submit(client, steps=12, clips=3)  # cancel through the database
            wait(client, job, until=lambda st: st["steps_done"] >= 2)
            assert client.delete(f"/v1/videos/{job}").status_code == 202
            assert wait(client, job)["state"] == "cancelled"
            # a replica killed after its job's first clip: the other replica takes the job once the lease expired
            job = submit(client, steps=12, clips=3, seed=0)
            st = wait(client, job, until=lambda st: st["clips_done"] >= 1)
            os.kill(int(st["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
            end = wait(client, job, timeout=240)
            assert end["state"] == "done" and end["attempts"] == 2 and end["worker"] != st["worker"], end
            print(f"\nkilled replica's job: {end['state']} on {end['worker']}, attempts {end['attempts']}")
            resumed, whole = (read_video(job_dir(tmp_path, i) / "video-0.mp4") for i in (job, ids[0]))
            assert resumed.shape == whole.shape and abs(resumed.astype(float) - whole).mean() <= SERVICE_VS_CLI_MP4_MEAN
            assert 'vidrd_jobs{state="done"} 5' in client.get("/metrics").text
    finally:
        serve.shutdown()
        ray.shutdown()
