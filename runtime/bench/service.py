"""Load benchmark of `vidrd serve`: N concurrent HTTP clients over a bounded queue; prints one JSON row.

    vidrd serve-bench --clients 4 --batch-jobs 4 --workload embedded --out rows.jsonl
    python -m vidrd.runtime.bench.service --clients 24 --queue 3 --cancel-every 6 --threads 1

Protocol: one in-process service (uvicorn on 127.0.0.1, an ephemeral port) on a workload's model (`WORKLOADS`: the
embedded vidrd-shapes model with its own settings, or a random-weight preset); every client submits one job (its
own seed and one of a few prompts) at the same moment, on each 429 waits 50-100% of its Retry-After (spread by
client) and retries until accepted, polls the status every 0.1 s until the job ends and downloads the file; every
`--cancel-every`-th client cancels its job right after acceptance. Latency is first submission to job end as the
client sees it (queueing and retries included), time to first clip is first submission to the first status that
shows a finished clip; throughput is finished jobs over the wall time. `batch_sizes` counts the finished clips of
jobs by the number of jobs in their UNet batch (`--batch-jobs`). No warm-up is excluded: on the torch backend the
first job costs about as much as later ones.
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
    service = LocalService(open_runtime(model, options or RuntimeOptions(), config.runtime_limits()), config, tiny=tiny)
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


PROMPTS = ("a red circle moving right on a black background", "a blue square moving down on a black background",
           "a green triangle moving left on a black background", "a yellow circle moving up on a black background")


def one_client(base: str, i: int, body: dict, cancel: bool, timeout: float = 600.0, poll_s: float = 0.1) -> dict:
    """Submit (retrying on 429), optionally cancel, wait for the end, download the file."""
    import httpx

    out = {"i": i, "rejected": 0, "cancel": cancel, "codes": []}
    body = {**body, "seed": i, "prompts": body.get("prompts") or [PROMPTS[i % len(PROMPTS)]]}
    with httpx.Client(base_url=base, timeout=60) as c:
        t0 = time.perf_counter()
        while True:
            r = c.post("/v1/videos", json=body)
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
            if st["clips_done"] > 0 and "first_clip_s" not in out:
                out["first_clip_s"] = time.perf_counter() - t0
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


def percentile(values, q: float) -> float | None:
    """The q-th percentile of `values` (linear interpolation) to 3 decimals; None when there are none."""
    return round(float(np.percentile(values, q)), 3) if values else None


def summarize(results: list[dict], wall: float) -> dict:
    done = [r["latency_s"] for r in results if r.get("state") == "done"]
    first = [r["first_clip_s"] for r in results if r.get("state") == "done" and "first_clip_s" in r]

    pct = percentile
    return {"done": len(done), "cancelled": sum(r.get("state") == "cancelled" for r in results),
            "errors": sum("error" in r for r in results), "rejected_429": sum(r["rejected"] for r in results),
            "p50_s": pct(done, 50), "p95_s": pct(done, 95), "first_clip_p50_s": pct(first, 50),
            "first_clip_p95_s": pct(first, 95), "jobs_per_s": float(f"{len(done) / wall:.4g}"), "wall_s": round(wall, 2)}


def machine() -> dict:
    import torch
    from vidrd.runtime.precision import cpu_name, probe_cpu
    flags = probe_cpu().flags
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "cpu_flags": None if flags is None else
            [f for f in wanted if f in flags], "load_avg_1m": round(os.getloadavg()[0], 2),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


# name: (model: "embedded" or a random-weight preset, request body). embedded: the model `vidrd serve` runs without a
# model flag, with the settings it gives requests that leave them out (64x64, 8 frames, 25 steps x 3 clips); small:
# `vidrd bench`'s CPU workload (256x256, 8 frames, 10 steps x 3 clips); tiny: seconds-long smoke runs.
WORKLOADS = {
    "embedded": ("embedded", {}),
    "small": ("small", {"height": 256, "width": 256, "frames": 8, "steps": 10, "clips": 3, "overlap": 4}),
    "tiny": ("tiny", {"height": 32, "width": 32, "frames": 4, "steps": 2, "clips": 2, "overlap": 2}),
    # the GPU benchmark's shapes (BENCHMARKS.md, GPU check): SD2.1-base at 256x256, 16 frames, 20 steps x 2 clips
    "sd21-base": ("sd21-base", {"height": 256, "width": 256, "frames": 16, "steps": 20, "clips": 2, "overlap": 4}),
}


def workload_model(name: str, dtype=None, device="cpu"):
    """(model, its own sampler defaults, its negative prompt) of a workload: the embedded model with its settings,
    or a preset's seeded random weights (None, None: the official defaults and negative prompt)."""
    import torch

    from vidrd.ref.weights import load_dir, random_model
    from vidrd.runtime import shapes

    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {sorted(WORKLOADS)}")
    which, dtype = WORKLOADS[name][0], dtype or torch.float32
    if which == "embedded":
        return load_dir(shapes.MODEL_DIR, dtype=dtype, device=device), dict(shapes.SETTINGS), shapes.NEGATIVE
    return random_model(which, 0, dtype=dtype, device=device), None, None


def workload(name: str, results: str, clients: int, queue: int, batch_jobs: int, **override):
    """(model, ServeConfig, request body) of a workload; `override`: body fields (size, frames, ...) to change."""
    from dataclasses import replace

    from vidrd.ref.sampler import SamplerSettings
    from vidrd.runtime.loop import Limits
    from vidrd.runtime.serve.jobs import ServeConfig

    model, defaults, negative = workload_model(name)
    body = {**WORKLOADS[name][1], **{k: v for k, v in override.items() if v is not None}, "format": "mp4"}
    config = ServeConfig(results=results, queue_size=queue, submit_rate=1e9, submit_burst=10**9,  # one address
                         batch_jobs=batch_jobs, max_records=max(2000, 2 * clients))
    if defaults is not None:
        config = replace(config, defaults=tuple(defaults.items()), negative_prompt=negative)
    s = SamplerSettings(**{**dict(config.defaults), **{k: v for k, v in body.items() if k != "format"}})
    limits = Limits(height=s.height, width=s.width, frames=s.frames, steps=s.steps, overlap=max(s.overlap, 1),
                    clips=s.clips)
    return model, replace(config, limits=limits), body


def add_args(p) -> None:
    p.add_argument("--clients", type=int, default=4, help="clients submitting one job each at the same moment")
    p.add_argument("--batch-jobs", type=int, default=1, metavar="K", help="the service's --batch-jobs")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="embedded")
    p.add_argument("--queue", type=int, help="the service's --queue-size (default: --clients, so no 429)")
    p.add_argument("--size", type=int, help="height = width in pixels (default: the workload's)")
    p.add_argument("--frames", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--clips", type=int)
    p.add_argument("--cancel-every", type=int, default=0, help="every N-th client cancels its job (0: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the runtime")
    p.add_argument("--out", metavar="FILE", help="append the JSON row to this file")


def run(args) -> dict:
    """One benchmark run of the flags of add_args: its JSON row (printed, and appended to --out)."""
    import tempfile

    import torch

    for name in ("clients", "batch_jobs", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    torch.set_num_threads(args.threads)
    queue = args.queue or args.clients
    with tempfile.TemporaryDirectory() as tmp:
        model, config, body = workload(args.workload, tmp, args.clients, queue, args.batch_jobs,
                                       height=args.size, width=args.size, frames=args.frames, steps=args.steps,
                                       clips=args.clips)
        with serving(model, config) as (base, service):
            results, wall = load(base, args.clients, body, args.cancel_every)
            sizes = dict(sorted(service.registry.batch_sizes.items()))
    row = {"bench": "vidrd.serve", "clients": args.clients, "batch_jobs": args.batch_jobs, "queue": queue,
           "cancel_every": args.cancel_every, "workload": {"name": args.workload, **body},
           **summarize(results, wall), "batch_sizes": {str(k): v for k, v in sizes.items()}, **machine()}
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vidrd.runtime.bench.service", description=__doc__.split("\n")[0])
    add_args(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
