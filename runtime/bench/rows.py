"""How the torch UNet's time grows with its batch: what step-level batching of jobs can gain on this machine.

    python -m vidrd.runtime.bench.rows --rows 2,8 --threads 1 --repeats 8 --out rows.jsonl

One UNet call of the embedded vidrd-shapes model (or a random-weight preset) at its own resolution and frames, for
each row count N (a job under guidance is 2 rows: N = 2 is one job, N = 8 four), timed in interleaved rounds
(every N once a round, so drift on a shared machine falls on all of them alike); per N the minimum and median
seconds a call and per row. `gain_vs_first` is the first N's per-row time over each N's: the most that batching
jobs into one UNet call can raise jobs/s when the UNet is all of the work. Prints one JSON row.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def counts(text: str) -> list[int]:
    """argparse type: comma-separated integers >= 1 ("2,8")."""
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated integers >= 1")
    return out


def measure(unet, shape: tuple, context: tuple, rows: list[int], repeats: int, calls: int = 3) -> dict:
    """{N: [seconds a call, one per round]} for inputs of `shape` (C,F,h,w) and a context of `context` (77,D)."""
    g = torch.Generator().manual_seed(0)
    ins = {n: (torch.randn(n, *shape, generator=g), torch.full((n,), 500.0), torch.randn(n, *context, generator=g))
           for n in rows}
    out = {n: [] for n in rows}
    with torch.no_grad():
        for n in rows:  # warm-up: oneDNN primitives, allocator
            unet(*ins[n])
        for _ in range(repeats):
            for n in rows:
                t0 = time.perf_counter()
                for _ in range(calls):
                    unet(*ins[n])
                out[n].append((time.perf_counter() - t0) / calls)
    return out


def summarize(times: dict) -> dict:
    rows = list(times)
    per_row = {n: min(times[n]) / n for n in rows}
    return {str(n): {"min_s": round(min(t), 5), "median_s": round(statistics.median(t), 5),
                     "per_row_min_s": round(per_row[n], 5), "gain_vs_first": round(per_row[rows[0]] / per_row[n], 3)}
            for n, t in times.items()}


def main(argv=None) -> int:
    from vidrd.ref.config import LATENT_FACTOR
    from vidrd.ref.weights import load_dir, random_model
    from vidrd.runtime import shapes
    from vidrd.runtime.bench.service import machine

    p = argparse.ArgumentParser(prog="python -m vidrd.runtime.bench.rows", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded", help="embedded (vidrd-shapes) or a random-weight preset")
    p.add_argument("--rows", type=counts, default="2,4,8,16", help="comma-separated row counts N (2 rows = one job)")
    p.add_argument("--size", type=int, help="height = width in pixels (default: the model's own, 256 for a preset)")
    p.add_argument("--frames", type=int, help="frames a clip (default: the model's own, 8 for a preset)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=8, help="interleaved rounds")
    p.add_argument("--out", metavar="FILE", help="append the JSON row to this file")
    a = p.parse_args(argv)
    rows = a.rows
    if a.threads < 1 or a.repeats < 1:
        p.error(f"--threads {a.threads} and --repeats {a.repeats} must be >= 1")
    torch.set_num_threads(a.threads)
    if a.model == "embedded":
        model, size, frames = load_dir(shapes.MODEL_DIR), shapes.SETTINGS["height"], shapes.SETTINGS["frames"]
    else:
        model, size, frames = random_model(a.model, 0), 256, 8
    size, frames = a.size or size, a.frames or frames
    if size % LATENT_FACTOR or frames < 1:
        p.error(f"--size {size} must be a multiple of {LATENT_FACTOR} and --frames {frames} >= 1")
    cfg, h = model.config, size // LATENT_FACTOR
    times = measure(model.unet.eval(), (cfg.unet.in_channels, frames, h, h), (77, cfg.text.hidden_size), rows,
                    a.repeats)
    row = {"bench": "vidrd.unet_rows", "model": a.model, "size": size, "frames": frames, "repeats": a.repeats,
           "rows": summarize(times), **machine()}
    print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
