"""Load benchmark of `vidrd serve`: N concurrent HTTP clients over a bounded queue; prints one JSON row.

    python -m vidrd.runtime.bench.service --clients 24 --queue 3 --threads 1

Protocol: one in-process service (uvicorn on 127.0.0.1, an ephemeral port) on a random-weight preset; every client
submits one job at the same moment, on each 429 waits 50-100% of its Retry-After (spread by client) and retries
until accepted, polls the status every 0.1 s until the job ends and downloads the file; every `--cancel-every`-th
client cancels its job right after acceptance. Latency is first submission to job end as the client sees it
(queueing and retries included); throughput is finished jobs over the wall time. No warm-up is excluded: on the
torch backend the first job costs about as much as later ones.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


@contextlib.contextmanager
def serving(model, config, options=None, tiny=None):
    """A LocalService (a runtime of RuntimeOptions `options`, default torch; previews by the tiny decoder `tiny`)
    behind a real uvicorn server on 127.0.0.1:<ephemeral>, in a thread; yields (url, service)."""
    import uvicorn

    from vidrd.runtime.options import RuntimeOptions, open_runtime
    from vidrd.runtime.serve.api import make_app
    from vidrd.runtime.serve.limits import http_protocol
    from vidrd.runtime.serve.worker import LocalService

    config = config.for_model(model)  # as `vidrd serve` does
    service = LocalService(open_runtime(model, options or RuntimeOptions(), config.limits), config, tiny=tiny)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(make_app(service, config), log_level="warning",
                                           http=http_protocol(config)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="vidrd-uvicorn")
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", service
    finally:
        server.should_exit = True
        thread.join(10)
        service.close()
        sock.close()


def one_client(base: str, i: int, body: dict, cancel: bool, timeout: float = 300.0, poll_s: float = 0.1) -> dict:
    """Submit (retrying on 429), optionally cancel, wait for the end, download the file."""
    import httpx

    out = {"i": i, "rejected": 0, "cancel": cancel, "codes": []}
    with httpx.Client(base_url=base, timeout=60) as c:
        t0 = time.perf_counter()
        while True:
            r = c.post("/v1/videos", json={**body, "seed": i})
            out["codes"].append(r.status_code)
            if r.status_code != 429:
                break
            out["rejected"] += 1
            out.setdefault("retry_after", []).append(r.headers.get("retry-after"))
            time.sleep(float(r.headers["retry-after"]) * (0.5 + 0.05 * (i * 7 % 10)))  # spread the retries
        if r.status_code != 202:
            out["error"] = r.text
            return out
        out["id"] = r.json()["id"]
        if cancel:
            r = c.delete(f"/v1/videos/{out['id']}")
            out["cancel_status"] = r.status_code
            if r.status_code in (200, 202):  # how far the job was when the cancel landed
                out["cancel_at"] = (r.json()["steps_done"], r.json()["steps_total"])
        while True:
            st = c.get(f"/v1/videos/{out['id']}").json()
            if st["state"] in ("done", "failed", "cancelled"):
                break
            if time.perf_counter() - t0 > timeout:
                out["error"] = f"timed out: {st}"
                return out
            time.sleep(poll_s)
        out["state"], out["latency_s"] = st["state"], time.perf_counter() - t0
        if st["state"] == "done":
            out["bytes"] = len(c.get(f"/v1/videos/{out['id']}/file").content)
    return out


def load(base: str, clients: int, body: dict, cancel_every: int = 0, poll_s: float = 0.1):
    """Run `clients` clients at once; (their results, wall seconds)."""
    def run(i: int) -> dict:
        return one_client(base, i, body, cancel_every > 0 and i % cancel_every == cancel_every - 1, poll_s=poll_s)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(run, range(clients)))
    return results, time.perf_counter() - t0


def summarize(results: list[dict], wall: float) -> dict:
    done = [r["latency_s"] for r in results if r.get("state") == "done"]
    return {"done": len(done), "cancelled": sum(r.get("state") == "cancelled" for r in results),
            "errors": sum("error" in r for r in results), "rejected_429": sum(r["rejected"] for r in results),
            "p50_s": round(float(np.percentile(done, 50)), 3) if done else None,
            "p95_s": round(float(np.percentile(done, 95)), 3) if done else None,
            "jobs_per_s": round(len(done) / wall, 3), "wall_s": round(wall, 2)}


def machine() -> dict:
    import torch
    from vidrd.runtime.precision import cpu_name
    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vidrd.runtime.bench.service", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=24)
    p.add_argument("--queue", type=int, default=3)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, default=32, help="height = width in pixels")
    p.add_argument("--frames", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--clips", type=int, default=2)
    p.add_argument("--format", choices=("mp4", "gif"), default="mp4")
    p.add_argument("--cancel-every", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the runtime")
    args = p.parse_args(argv)

    import tempfile

    import torch

    from vidrd.ref.weights import random_model

    from vidrd.runtime.loop import Limits
    from vidrd.runtime.serve.jobs import ServeConfig

    torch.set_num_threads(args.threads)
    body = {"prompts": ["a boat sailing on a lake"], "height": args.size, "width": args.size, "frames": args.frames,
            "steps": args.steps, "clips": args.clips, "overlap": min(2, args.frames - 1), "format": args.format}
    with tempfile.TemporaryDirectory() as tmp:
        limits = Limits(height=args.size, width=args.size, frames=args.frames, steps=args.steps,
                        overlap=min(2, args.frames - 1), clips=args.clips)
        config = ServeConfig(results=tmp, queue_size=args.queue, limits=limits,
                             submit_rate=1e9, submit_burst=10**9)  # every client is 127.0.0.1: no per-client rate
        with serving(random_model(args.preset, 0), config) as (base, _):
            results, wall = load(base, args.clients, body, args.cancel_every)
    row = {"bench": "vidrd.serve", "clients": args.clients, "queue": args.queue, "cancel_every": args.cancel_every,
           "workload": {"preset": args.preset, **{k: v for k, v in body.items() if k != "prompts"}},
           **summarize(results, wall), **machine()}
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
