"""Step-level batching without HTTP: N jobs run K at a time (vidrd.runtime.Batch, newcomers joining at clip
boundaries as `vidrd serve --batch-jobs K` admits them) against the same N jobs one after another
(Runtime.generate), on any device. `vidrd serve-bench` measures the service; this measures what the batch itself
gains, where FastAPI is not installed (the GPU check's `batch` section) or HTTP would blur a small effect.

    python -m vidrd.runtime.bench.batched --workload small --jobs 8 --batch-jobs 1,2,4,8 --device cuda --dtype bf16

Every job is submitted at t = 0 (its own seed, one of serve-bench's prompts). Per K: jobs/s over the wall time,
latency p50/p95 (t = 0 to the job's last clip), time to first clip, and how far each job's frames are from the same
job at K = 1 (uint8 levels: the batch sums its matrices in another order, tests/tolerances.py). One JSON row per K,
the K = 1 row first (it is the reference), after one untimed warm-up job. K = 1 runs Runtime.generate itself, the
path `--batch-jobs 1` takes.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from vidrd.ref.sampler import SamplerSettings

from .rows import counts
from .service import PROMPTS, WORKLOADS, machine, percentile, workload_model


def setup(workload: str, device: str, dtype: str, **override):
    """(model on `device`, SamplerSettings, negative prompt) of a serve-bench workload; override: steps, clips..."""
    from vidrd.runtime.options import OFFICIAL_NEGATIVE, RuntimeOptions

    model, defaults, negative = workload_model(workload, RuntimeOptions(dtype=dtype).torch_dtype, device)
    fields = {**(defaults or {}), **WORKLOADS[workload][1], **{k: v for k, v in override.items() if v is not None}}
    return model, SamplerSettings(**fields), OFFICIAL_NEGATIVE if negative is None else negative


def requests(s: SamplerSettings, jobs: int, negative: str):
    from vidrd.runtime.loop import Request
    return [Request((PROMPTS[i % len(PROMPTS)],), (negative,), s, seed=i) for i in range(jobs)]


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_k(model, s: SamplerSettings, reqs: list, k: int, device: str, dtype: str) -> tuple[dict, list]:
    """One measurement: (row, each job's frames (T,H,W,3) uint8)."""
    from vidrd.runtime.batch import Batch
    from vidrd.runtime.loop import Limits
    from vidrd.runtime.options import RuntimeOptions, open_runtime

    limits = Limits.of(s, batch=k)
    rt = open_runtime(model, RuntimeOptions(device=device, dtype=dtype), limits)
    list(rt.generate(replace(reqs[0], seed=10**6)))  # warm-up (kernels, allocator), not timed
    _sync(device)
    frames = [[] for _ in reqs]
    first, end = [None] * len(reqs), [None] * len(reqs)
    sizes: dict[int, int] = {}
    t0 = time.perf_counter()
    if k == 1:
        for i, r in enumerate(reqs):
            for clip in rt.generate(r):
                frames[i].append(clip.frames[0])
                first[i] = first[i] or time.perf_counter() - t0
            end[i] = time.perf_counter() - t0
    else:
        batch, waiting = Batch(rt, k), list(enumerate(reqs))
        while waiting or batch.members:
            while waiting and len(batch.members) < k:  # newcomers join between clips
                i, r = waiting.pop(0)
                batch.admit(r, tag=i)
            size = len(batch.members)
            for m in batch.run_clip():
                if m.error is not None:
                    raise RuntimeError(f"job {m.tag} failed in the batch") from m.error
                frames[m.tag].append(m.out.frames[0])
                sizes[size] = sizes.get(size, 0) + 1
                now = time.perf_counter() - t0
                first[m.tag] = first[m.tag] or now
                if m.done:
                    end[m.tag] = now
    _sync(device)
    wall = time.perf_counter() - t0
    rt.close()
    videos = [np.concatenate(f) for f in frames]  # (T,H,W,3) each
    row = {"batch_jobs": k, "jobs": len(reqs), "jobs_per_s": round(len(reqs) / wall, 4), "wall_s": round(wall, 3),
           "p50_s": percentile(end, 50), "p95_s": percentile(end, 95), "first_clip_p50_s": percentile(first, 50),
           "batch_sizes": sizes or {1: len(reqs) * s.clips}}
    return row, videos


def run(workload: str, jobs: int, ks: list[int], device: str = "cpu", dtype: str = "fp32", **override) -> list[dict]:
    """The rows of one benchmark: K = 1 first (the reference for speed and frames), then each other K."""
    model, s, negative = setup(workload, device, dtype, **override)
    reqs = requests(s, jobs, negative)
    rows, ref = [], None
    for k in [1] + [k for k in ks if k != 1]:
        row, videos = run_k(model, s, reqs, k, device, dtype)
        if ref is None:
            ref = videos
        diff = [np.abs(v.astype(np.int16) - w.astype(np.int16)) for v, w in zip(videos, ref)]
        row.update(vs_k1=round(rows[0]["wall_s"] / row["wall_s"], 3) if rows else 1.0,
                   frames_max_levels=int(max(d.max() for d in diff)),
                   frames_mean_levels=round(float(np.mean([d.mean() for d in diff])), 5))
        rows.append({"bench": "vidrd.batched", "workload": workload, "device": device, "dtype": dtype,
                     "settings": {"height": s.height, "width": s.width, "frames": s.frames, "steps": s.steps,
                                  "clips": s.clips}, **row})
    return rows


def gpu_check() -> dict:
    """The GPU check's `batch` section (`./dev gpu-check --only batch`): 8 jobs at K = 1, 2, 4, 8 on CUDA in bf16, for
    the `small` workload and the `sd21-base` shapes (random weights), the target's setting (8 jobs, K = 8 >= 3x)."""
    out = {"status": "ok", "batched": []}
    for workload in ("small", "sd21-base"):
        out["batched"] += run(workload, 8, [1, 2, 4, 8], "cuda", "bf16")
    return out


def gist(r: dict) -> str:
    """One cell of the GPU check's table: each workload's best K against K = 1."""
    best = {}
    for row in r["batched"]:
        if row["workload"] not in best or row["vs_k1"] > best[row["workload"]]["vs_k1"]:
            best[row["workload"]] = row
    return "; ".join(f"{w}: K={b['batch_jobs']} {b['vs_k1']:.2f}x jobs/s of K=1, frames within "
                     f"{b['frames_max_levels']} levels" for w, b in best.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vidrd.runtime.bench.batched", description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="embedded")
    p.add_argument("--jobs", type=int, default=4, help="jobs submitted at t = 0")
    p.add_argument("--batch-jobs", type=counts, default="1,4", metavar="K,K",
                   help="comma-separated K (1 is always run first)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--steps", type=int)
    p.add_argument("--clips", type=int)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", metavar="FILE", help="append the JSON rows to this file")
    a = p.parse_args(argv)
    if a.jobs < 1 or a.threads < 1:
        p.error(f"--jobs {a.jobs} and --threads {a.threads} must be >= 1")
    torch.set_num_threads(a.threads)
    rows = run(a.workload, a.jobs, a.batch_jobs, a.device, a.dtype, steps=a.steps, clips=a.clips)
    for row in rows:
        row.update(machine())
        print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
