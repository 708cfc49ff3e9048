"""Live events (Server-Sent Events) and previews of the service: the event hub on its own, the Ray path's polling,
and a real service on the tiny preset with a seeded tiny decoder (previews every 2 steps)."""
import asyncio
import contextlib
import json

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_service import LIMITS, TINY, wait  # noqa: E402
from vidrd.ref.weights import random_model  # noqa: E402
from vidrd.runtime.bench import service as serve_bench  # noqa: E402
from vidrd.runtime import preview  # noqa: E402
from vidrd.runtime.serve import events  # noqa: E402
from vidrd.runtime.serve.jobs import ServeConfig  # noqa: E402
from vidrd.runtime.video_io import read_video  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LONG = {"prompts": ["a boat"], "steps": 12, "clips": 3, **TINY}  # holds the worker while a test looks at a job


@contextlib.contextmanager
def serving(model, config: ServeConfig, tiny=None):
    """test_service.serving with previews by the tiny decoder `tiny`: yields (httpx client, service)."""
    with serve_bench.serving(model, config, tiny=tiny) as (base, service), \
            httpx.Client(base_url=base, timeout=30) as client:
        yield client, service


def parse(chunks) -> list[tuple[int, str, dict]]:
    """(id, event, data) of each event in SSE text; comments skipped."""
    out = []
    for block in "".join(chunks).split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
    return out


def stream(client, job_id, **headers) -> list[tuple[int, str, dict]]:
    with client.stream("GET", f"/v1/videos/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return parse(r.iter_text())


def post(client, **body) -> str:
    r = client.post("/v1/videos", json={"prompts": ["a boat"], "steps": 4, "clips": 2, **TINY, **body})
    assert r.status_code == 202, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = random_model("tiny", 0)
    torch.manual_seed(0)
    tiny = preview.TinyDecoder(model.config.vae.latent_channels).eval()
    config = ServeConfig(results=str(tmp_path_factory.mktemp("results")), preview_every=2, **LIMITS)
    with serving(model, config, tiny=tiny) as s:
        yield s


def test_stream_order_progress_and_a_late_client(server):
    client, _ = server
    post(client, **LONG)  # the worker is busy: the next job waits in the queue
    job_id = post(client)
    got = stream(client, job_id, **{"Last-Event-ID": "0"})  # from its first event, which the ring still holds
    names = [name for _, name, _ in got]
    assert names[:2] == ["queued", "started"] and names[-1] == "done", names
    assert [d["clip"] for _, name, d in got if name == "clip"] == [0, 1]
    assert "preview" in names and set(names) <= {"queued", "started", "step", "preview", "clip", "done"}
    assert [i for i, _, _ in got] == list(range(1, len(got) + 1))
    steps = [d["steps_done"] for _, _, d in got]
    assert steps == sorted(steps) and steps[-1] == got[-1][2]["steps_total"] == 8
    assert got[-1][2]["state"] == "done" and got[-1][2]["clips_done"] == 2
    # a client connecting after the end: the current state as one event, then the end
    late = stream(client, job_id)
    assert [name for _, name, _ in late] == ["status", "done"]
    assert late[0][2] == {"id": job_id, "state": "done", "clips_done": 2, "steps_done": 8, "steps_total": 8,
                          "error": None}


def test_a_new_client_gets_the_state_first_and_a_cancel_ends_the_stream(server):
    client, _ = server
    job_id = post(client, **LONG)
    wait(client, job_id, until=lambda st: st["steps_done"] >= 2)
    with client.stream("GET", f"/v1/videos/{job_id}/events") as r:
        lines = r.iter_lines()
        first = parse(["\n".join(iter(lines.__next__, "")) + "\n\n"])  # up to the blank line after it
        assert first[0][1] == "status" and first[0][2]["state"] == "running" and first[0][2]["steps_done"] >= 2
        assert client.delete(f"/v1/videos/{job_id}").status_code == 202
        got = parse(["\n".join(lines) + "\n\n"])
    assert got[-1][1] == "cancelled" and got[-1][2]["state"] == "cancelled"
    assert all(i > first[0][0] for i, _, _ in got)


def test_preview_409_before_200_png_after_404_unknown(server, tmp_path):
    client, _ = server
    post(client, **LONG)
    job_id = post(client, **LONG)  # queued behind the first
    r = client.get(f"/v1/videos/{job_id}/preview")
    assert r.status_code == 409 and r.headers["retry-after"] == "1"
    with client.stream("GET", f"/v1/videos/{job_id}/events") as s:
        for line in s.iter_lines():
            if line == "event: preview":
                break
        r = client.get(f"/v1/videos/{job_id}/preview")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert int(r.headers["x-preview-step"]) % 2 == 0
    (tmp_path / "p.png").write_bytes(r.content)
    assert read_video(tmp_path / "p.png").shape == (1, 32, 32, 3)  # the middle frame of video 0
    assert client.get(f"/v1/videos/{job_id}/preview", params={"video": 1}).status_code == 404
    assert wait(client, job_id)["state"] == "done"
    r = client.get(f"/v1/videos/{job_id}/preview")  # ended: its video is there, no preview is kept
    assert r.status_code == 409 and "retry-after" not in r.headers
    unknown = "0" * 32
    assert client.get(f"/v1/videos/{unknown}/preview").status_code == 404
    assert client.get(f"/v1/videos/{unknown}/events").status_code == 404


def test_api_key_guards_the_events(tmp_path):
    config = ServeConfig(results=str(tmp_path), api_key="s3cret-key-1", **LIMITS)
    with serving(random_model("tiny", 0), config) as (client, _):
        key = {"X-API-Key": "s3cret-key-1"}
        r = client.post("/v1/videos", json={"prompts": ["a"], "steps": 1, "clips": 1, **TINY}, headers=key)
        job_id = r.json()["id"]
        assert client.get(f"/v1/videos/{job_id}/events").status_code == 401
        assert stream(client, job_id, **key)[-1][1] == "done"
        r = client.get(f"/v1/videos/{job_id}/preview", headers=key)  # this service has no tiny decoder
        assert r.status_code == 409 and "retry-after" not in r.headers


def _data(state="running", clips=0, steps=0):
    return {"id": "j", "state": state, "clips_done": clips, "steps_done": steps, "steps_total": 8, "error": None}


async def _collect(agen) -> list:
    return parse([chunk.decode() async for chunk in agen])


def test_hub_throttles_steps_rings_and_forgets():
    hub = events.Hub()
    hub.publish("j", "started", _data())
    for i in range(5):  # within STEP_INTERVAL_S: only the first is kept
        hub.publish("j", "step", _data(steps=i + 1))
    frames = np.arange(2 * 3 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 4, 3)  # (B,F,H,W,3)
    hub.preview("j", 0, 2, frames, _data(steps=2))
    clip, step, middle = hub.latest("j")
    assert (clip, step) == (0, 2) and (middle == frames[:, 1]).all()
    ring = hub._channels["j"].ring
    assert [name for _, name, _ in ring] == ["started", "step", "preview"]
    for k in range(events.RING + 3):
        hub.publish("j", "clip", _data(clips=k + 1))
    # a client that missed more than the ring holds gets the latest event, then what follows
    agen = hub.stream("j", _data(clips=3), last_id=1)

    async def run():
        task = asyncio.ensure_future(_collect(agen))
        await asyncio.sleep(0.05)
        hub.publish("j", "done", _data("done", 3, 8))
        return await task
    got = asyncio.run(run())
    assert [(i, name) for i, name, _ in got] == [(events.RING + 6, "status"), (events.RING + 7, "done")]
    assert got[0][2]["clips_done"] == events.RING + 3  # the hub's latest, newer than the caller's status
    assert hub.latest("j") is None and "j" not in hub._channels  # ended: only its end event is kept
    hub.publish("j", "step", _data(steps=8))  # nothing follows an end
    assert [name for _, name, _ in asyncio.run(_collect(hub.stream("j", _data())))] == ["status", "done"]
    hub.publish("k", "queued", _data("queued"))
    hub.forget(["j", "k"])
    assert hub._channels == {} and not hub._ended


def test_polling_makes_the_same_events_for_ray():
    states = iter([_data(), _data(clips=1, steps=4), _data("done", 2, 8)])

    async def status(job_id):
        return next(states)
    got = asyncio.run(_collect(events.poll(status, "j", _data("queued"), interval_s=0.001)))
    assert [(name, d.get("clip")) for _, name, d in got] == [
        ("status", None), ("started", None), ("clip", 0), ("step", None), ("clip", 1), ("done", None)]
