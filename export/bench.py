"""`python -m vidrd.export.bench`: export time and file sizes, then ONNX Runtime vs PyTorch time per UNet call.

Protocol: one process; the export runs first (forced, fp32); then at the same workload (default N=2, F=8, 32x32
latents, i.e. 256x256 px) each backend gets `--warmup` untimed calls and `--runs` timed calls; the row reports
medians. Prints one JSON row.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vidrd.ref.config import PRESETS
from vidrd.ref.weights import random_model

from .onnx_export import export, versions
from .ort import make_session, session_provider
from .rewrite import example_inputs
from vidrd.runtime.precision import cpu_name

from .spec import read_specs


def timed(fn, warmup: int, runs: int) -> list[float]:
    """Milliseconds of `runs` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def bench(preset: str, out: Path, dims: dict, warmup: int, runs: int, threads: int) -> dict:
    """The benchmark row (see the module docstring)."""
    torch.set_num_threads(threads)
    model = random_model(preset, 0)
    t0 = time.perf_counter()
    result = export(model, out, force=True, source={"kind": "preset", "preset": preset, "seed": 0},
                    log=lambda *a: None)
    export_s = time.perf_counter() - t0
    comps = result.manifest["components"]

    spec = read_specs(out)["unet"]
    inputs = example_inputs(spec, dims, model.config)
    sess = make_session(out / spec.file, prefer=("CPUExecutionProvider",), threads=threads)
    feed = {k: v.numpy() for k, v in inputs.items()}
    with torch.inference_mode():
        ref = model.unet(*inputs.values())
        torch_ms = timed(lambda: model.unet(*inputs.values()), warmup, runs)
    got = sess.run(None, feed)[0]
    ort_ms = timed(lambda: sess.run(None, feed), warmup, runs)
    return {
        "bench": "vidrd.export", "preset": preset, "precision": "fp32", "device": "cpu", "cpu": cpu_name(),
        "cpus": os.cpu_count(), "threads": threads, "load_avg_1m": round(os.getloadavg()[0], 2),
        "versions": versions(), "opset": result.manifest["opset"],
        "export_s": round(export_s, 2),
        "export_s_per_component": {k: c["export_seconds"] for k, c in comps.items()},
        "file_mb": {c["file"]: round((c["bytes"] + c["data_bytes"]) / 1e6, 2) for c in comps.values()},
        "unet_workload": {**dims, "pixels": f"{8 * dims['h']}x{8 * dims['w']}", "warmup": warmup, "runs": runs},
        "unet_ms_median": {"torch": round(statistics.median(torch_ms), 1), "ort": round(statistics.median(ort_ms), 1)},
        "unet_ms_all": {"torch": [round(t, 1) for t in torch_ms], "ort": [round(t, 1) for t in ort_ms]},
        "ort_provider": session_provider(sess),
        "ort_vs_torch_max_abs_diff": float(abs(torch.from_numpy(got) - ref).max()),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vidrd.export.bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--out", metavar="DIR", help="export folder (default: a temporary folder, removed afterwards)")
    p.add_argument("--batch", type=int, default=2, help="N (2B under guidance)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--latent", type=int, default=32, help="latent h = w (pixels / 8)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    if min(args.batch, args.frames, args.latent, args.runs, args.threads) < 1 or args.warmup < 0:
        p.error(f"sizes, runs and threads must be positive (got {vars(args)})")
    dims = {"N": args.batch, "F": args.frames, "h": args.latent, "w": args.latent}
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vidrd-bench-"))
    try:
        row = bench(args.preset, out, dims, args.warmup, args.runs, args.threads)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
