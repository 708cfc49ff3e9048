"""Crash test of `vidrd serve`: kill -9 under a load of clients, restart, check every accepted job; one JSON row.

    python -m vidrd.runtime.bench.crash --kills 5 --clients 10 --out crash.json

Protocol: `vidrd serve` (tiny preset, small limits, one torch thread) runs as a subprocess on a free 127.0.0.1 port
over a temporary results folder and its jobs.db. Each client thread submits `--jobs-per-client` jobs one after
another (32x32, 4 frames, 2-4 clips, seeded), cancels a `--cancel-fraction` of them after a random delay, and polls
each until it ends; a request that meets a dead server is retried until `--max-wall`. A killer thread SIGKILLs the
server at seeded random moments (a uniform gap after each restart is healthy) and restarts it on the same folder and
port. Every job asks for webhooks to a local receiver (--allow-private-callbacks): more than one `done` event for a
job is a job run twice to completion.

At the end, against the last server: every accepted job (a 202 the client read) must be `done` with every video
decodable and as long as its clips together, or `cancelled` when a cancel was answered 200/202; anything else
(404, failed, open at the deadline, a bad video) is lost. Submissions the server recorded but whose 202 a kill
swallowed are counted from jobs.db as unacknowledged (they run like any other job).
"""
from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

FINISHED = ("done", "failed", "cancelled")
BODY = {"prompts": ["a boat sailing on a lake"], "height": 32, "width": 32, "frames": 4, "overlap": 2, "steps": 4}
LIMITS = ["--max-height", "32", "--max-width", "32", "--max-frames", "4", "--max-overlap", "2", "--max-steps", "4",
          "--max-clips", "4", "--max-batch", "1", "--queue-size", "100", "--submit-rate", "1000",
          "--submit-burst", "1000"]


class Server:
    """`vidrd serve` as a subprocess on a fixed port and results folder; start() waits for /healthz."""

    def __init__(self, results: Path, port: int, threads: int):
        self.results, self.port, self.threads = results, port, threads
        self.base, self.proc, self.starts = f"http://127.0.0.1:{port}", None, []

    def start(self, timeout_s: float = 120.0) -> None:
        import httpx

        t0 = time.monotonic()
        log = open(self.results.parent / "serve.log", "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "vidrd.runtime.cli", "serve", "--preset", "tiny",
                                      "--port", str(self.port), "--results", str(self.results), "--threads",
                                      str(self.threads), "--log-level", "warning", "--allow-private-callbacks",
                                      *LIMITS], stdout=log, stderr=log)
        log.close()
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.base}/healthz", timeout=5).status_code == 200:
                    break
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"vidrd serve did not come up; see {self.results.parent / 'serve.log'}")
            time.sleep(0.1)
        self.starts.append(time.monotonic() - t0)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@contextlib.contextmanager
def receiver():
    """Webhook receiver on 127.0.0.1: yields (url, events), events a list of (job id, event)."""
    events, lock = [], threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                events.append((body["id"], body["event"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", events
    finally:
        server.shutdown()
        server.server_close()


def call(client, deadline: float, method: str, path: str, **kw):
    """One request, retried while the server is down (killed, restarting); None past the deadline."""
    import httpx

    while time.monotonic() < deadline:
        try:
            return client.request(method, path, **kw)
        except httpx.TransportError:
            time.sleep(0.1)
    return None


def one_client(base: str, i: int, jobs: int, cancel_fraction: float, callback: str, seed: int,
               deadline: float) -> list[dict]:
    """Submit `jobs` jobs one after another, cancel some, wait for each to end; a record per accepted job."""
    import httpx

    rng, out = random.Random(seed * 1000 + i), []
    with httpx.Client(base_url=base, timeout=30) as c:
        for n in range(jobs):
            body = {**BODY, "clips": rng.randint(2, 4), "seed": i * 100 + n, "callback_url": callback}
            r = call(c, deadline, "POST", "/v1/videos", json=body)
            if r is None or r.status_code != 202:
                out.append({"client": i, "refused": None if r is None else r.status_code})
                continue
            job = {"client": i, "id": r.json()["id"], "clips": body["clips"], "cancel": rng.random() < cancel_fraction}
            if job["cancel"]:
                time.sleep(rng.uniform(0.0, 2.0))
                r = call(c, deadline, "DELETE", f"/v1/videos/{job['id']}")
                job["cancel_status"] = None if r is None else r.status_code
            while (r := call(c, deadline, "GET", f"/v1/videos/{job['id']}")) is not None:
                if r.status_code != 200 or r.json()["state"] in FINISHED:
                    break
                time.sleep(0.1)
            out.append(job)
    return out


def check(base: str, job: dict, tmp: Path) -> str:
    """The job's outcome as the last server gives it: done, cancelled, or why it is lost."""
    import httpx

    from vidrd.runtime.video_io import read_video

    with httpx.Client(base_url=base, timeout=30) as c:
        r = c.get(f"/v1/videos/{job['id']}")
        if r.status_code != 200:
            return f"lost: status {r.status_code}"
        st = r.json()
        if job.get("cancel_status") in (200, 202) or (job["cancel"] and st["state"] == "cancelled"):
            # a cancel answered must hold; one whose answer a kill swallowed may have landed or not
            return "cancelled" if st["state"] == "cancelled" else f"lost: cancel answered, then {st['state']}"
        if st["state"] != "done":
            return f"lost: {st['state']} ({st['error']})"
        frames = 0
        for k in range(job["clips"]):
            (tmp / "clip.mp4").write_bytes(c.get(f"/v1/videos/{job['id']}/clips/{k}").content)
            frames += len(read_video(tmp / "clip.mp4"))
        (tmp / "video.mp4").write_bytes(c.get(f"/v1/videos/{job['id']}/file").content)
        try:
            video = read_video(tmp / "video.mp4")
        except Exception as e:  # noqa: BLE001 - any decode error is a bad video
            return f"lost: video not decodable ({type(e).__name__})"
        if len(video) != frames or video.shape[1:] != (BODY["height"], BODY["width"], 3):
            return f"lost: video {video.shape}, clips have {frames} frames"
        return "done"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vidrd.runtime.bench.crash", description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--jobs-per-client", type=int, default=4)
    p.add_argument("--cancel-fraction", type=float, default=0.25)
    p.add_argument("--gap", type=float, nargs=2, default=(0.5, 3.0), metavar=("LO", "HI"),
                   help="seconds between a restart being healthy and the next kill (uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--max-wall", type=float, default=300.0, help="seconds; jobs still open then are lost")
    p.add_argument("--out", help="also append the JSON row to this file")
    args = p.parse_args(argv)
    from concurrent.futures import ThreadPoolExecutor

    from vidrd.runtime.precision import cpu_name

    rng, t0 = random.Random(args.seed), time.monotonic()
    deadline = t0 + args.max_wall
    with tempfile.TemporaryDirectory() as tmp, receiver() as (callback, events):
        tmp = Path(tmp)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = Server(tmp / "results", port, args.threads)
        server.start()
        kills, busy = [], threading.Event()
        busy.set()

        def killer():
            while len(kills) < args.kills and busy.is_set():
                time.sleep(rng.uniform(*args.gap))
                if not busy.is_set() or time.monotonic() > deadline:
                    return
                kills.append(round(time.monotonic() - t0, 2))
                server.kill()
                server.start()

        k = threading.Thread(target=killer, daemon=True, name="killer")
        k.start()
        with ThreadPoolExecutor(args.clients) as pool:
            runs = list(pool.map(lambda i: one_client(server.base, i, args.jobs_per_client, args.cancel_fraction,
                                                      callback, args.seed, deadline), range(args.clients)))
        busy.clear()
        k.join()
        jobs = [j for run in runs for j in run if "id" in j]
        for j in jobs:
            j["outcome"] = check(server.base, j, tmp)
        outcomes = Counter(j["outcome"] for j in jobs)
        time.sleep(1.0)  # the last done events in flight
        rc = server.stop()
        with contextlib.closing(sqlite3.connect(tmp / "results" / "jobs.db")) as db:
            recorded = {row[0] for row in db.execute("SELECT id FROM jobs")}
            resumed = db.execute("SELECT COUNT(*) FROM jobs WHERE attempts > 1").fetchone()[0]
        done_events = Counter(job for job, event in events if event == "done")
        ids = {j["id"] for j in jobs}
        row = {"bench": "vidrd.serve crash", "kills": len(kills), "kill_at_s": kills, "clients": args.clients,
               "jobs_accepted": len(jobs), "refused": sum("refused" in j for run in runs for j in run),
               "done": outcomes["done"], "cancelled": outcomes["cancelled"],
               "cancel_asked": sum(j.get("cancel_status") in (200, 202) for j in jobs),
               "lost": sum(n for o, n in outcomes.items() if o.startswith("lost")),
               "lost_why": sorted(o for o in outcomes if o.startswith("lost")),
               "duplicates": sum(n > 1 for n in done_events.values()),
               "resumed": resumed, "unacknowledged": len(recorded - ids),
               # done events a kill swallowed before they were sent (webhooks are held in memory)
               "done_events_missing": sum(j["outcome"] == "done" and j["id"] not in done_events for j in jobs),
               "restart_s_mean": round(sum(server.starts[1:]) / max(1, len(server.starts) - 1), 2),
               "clean_exit": rc == 0, "wall_s": round(time.monotonic() - t0, 1), "seed": args.seed,
               "workload": {"preset": "tiny", **{k: v for k, v in BODY.items() if k != "prompts"}, "clips": "2-4",
                            "jobs_per_client": args.jobs_per_client, "cancel_fraction": args.cancel_fraction,
                            "gap_s": list(args.gap)},
               "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}}
    line = json.dumps(row)
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0 if row["lost"] == row["duplicates"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
