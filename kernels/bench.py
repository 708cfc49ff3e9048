"""Benchmark vidrd.kernels.attention against torch SDPA on the SD2.1-base video UNet shapes (needs CUDA).

python -m vidrd.kernels.bench [--res 256 512] [--frames 16] [--dtype fp16] [--sweep | --check]
prints one JSON row per shape: ms and TFLOP/s (4*N*H*Lq*Lk*D / time) of ours and of SDPA.
--sweep times candidate tiles per shape and prints the best, to update configs.json.
--check only compares with SDPA (plus odd shapes) and exits 1 on a mismatch.
"""
import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

# SD2.1-base attention levels: (channels, heads, latent downsampling); head dim 64 everywhere.
LEVELS = [(320, 5, 1), (640, 10, 2), (1280, 20, 4), (1280, 20, 8)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TEXT_TOKENS = 77


def shapes(res, frames, batch=2):
    """(name, N, H, Lq, Lk, D) for spatial, cross and temporal attention at every level."""
    out = []
    for ch, heads, down in LEVELS:
        side = res // 8 // down
        tokens = side * side
        tag = f"{res}px/{ch}ch"
        out.append((f"spatial {tag}", batch * frames, heads, tokens, tokens, 64))
        out.append((f"cross {tag}", batch * frames, heads, tokens, TEXT_TOKENS, 64))
        out.append((f"temporal {tag}", batch * tokens, heads, frames, frames, 64))
    return out


def make_inputs(n, h, lq, lk, d, dtype, layout):
    """q (N,H,Lq,D), k, v (N,H,Lk,D) on CUDA; 'nlhd' = views of (N, L, H*D) like the UNet's."""
    def one(length):
        if layout == "nlhd":  # (N, L, H*D) -> (N, L, H, D) -> (N, H, L, D) view
            return torch.randn(n, length, h * d, device="cuda", dtype=dtype).view(n, length, h, d).transpose(1, 2)
        return torch.randn(n, h, length, d, device="cuda", dtype=dtype)
    return one(lq), one(lk), one(lk)


def check_one(name, n, h, lq, lk, d, dtype, layout):
    """Correctness only: max |ours - SDPA| for one shape, with the path the wrapper took."""
    from . import ops
    q, k, v = make_inputs(n, h, lq, lk, d, dtype, layout)
    err = float((ops.attention(q, k, v).float() - F.scaled_dot_product_attention(q, k, v).float()).abs().max())
    kernel, consts, _ = ops.plan(ops.gpu_key(q.device.index), dtype, d, lq, lk)
    return dict(shape=name, N=n, H=h, Lq=lq, Lk=lk, D=d, dtype=str(dtype).split(".")[-1], kernel=kernel,
                consts={k: v for k, v in consts.items() if k.startswith(("BLOCK", "GROUP"))},
                max_abs_err=err, ok=err <= TOL[dtype])


TOL = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-4}


def time_ms(fn):
    """Median milliseconds per call (triton.testing.do_bench)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100)


def bench_one(name, n, h, lq, lk, d, dtype, layout):
    """One JSON-able row: ours vs SDPA for one shape."""
    from .ops import attention
    q, k, v = make_inputs(n, h, lq, lk, d, dtype, layout)
    ours = attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    flops = 4.0 * n * h * lq * lk * d
    t_ours = time_ms(lambda: attention(q, k, v))
    t_sdpa = time_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    return dict(shape=name, N=n, H=h, Lq=lq, Lk=lk, D=d, dtype=str(dtype).split(".")[-1], layout=layout,
                ours_ms=round(t_ours, 4), sdpa_ms=round(t_sdpa, 4),
                ours_tflops=round(flops / t_ours / 1e9, 2), sdpa_tflops=round(flops / t_sdpa / 1e9, 2),
                speedup=round(t_sdpa / t_ours, 3), max_abs_err=float((ours.float() - ref.float()).abs().max()))


# Candidate tiles for --sweep, per path.
SWEEP = {
    "spatial": dict(BLOCK_M=[64, 128], BLOCK_N=[32, 64, 128], num_warps=[4, 8], num_stages=[2, 3, 4]),
    "cross": dict(BLOCK_M=[64, 128], BLOCK_N=[128], num_warps=[4, 8], num_stages=[1, 2]),
    "temporal": dict(BLOCK_M=[32, 64, 128, 256], BLOCK_N=[32], num_warps=[2, 4, 8], num_stages=[1]),
}


def path_of(entry, lq, lk, bucket):
    """Which path configs.json sends (Lq, Lk) to."""
    t = entry["temporal"][bucket]["BLOCK_N"]
    if lq <= t and lk <= t:
        return "temporal"
    return "cross" if lk <= entry["cross"][bucket]["BLOCK_N"] else "spatial"


def sweep_one(name, n, h, lq, lk, d, dtype, layout):
    """Time every SWEEP candidate for this shape's path by editing the loaded config in place."""
    from . import ops
    key = ops.gpu_key(torch.cuda.current_device())
    entry = ops.load_configs()[key]
    bucket = ops.bucket(ops.head_block(d))
    path = path_of(entry, lq, lk, bucket)
    saved = dict(entry[path][bucket])
    q, k, v = make_inputs(n, h, lq, lk, d, dtype, layout)
    ref = F.scaled_dot_product_attention(q, k, v)
    tried = []
    grid = SWEEP[path]
    try:
        for values in itertools.product(*grid.values()):
            cand = dict(zip(grid.keys(), values))
            entry[path][bucket] = {**saved, **cand} if dtype != torch.float32 else {**saved, "fp32": cand}
            try:
                out = ops.attention(q, k, v)
                torch.cuda.synchronize()
            except Exception as e:  # out of shared memory / registers: skip this candidate
                tried.append(dict(cand, error=type(e).__name__))
                continue
            if (out.float() - ref.float()).abs().max() > 0.05:
                tried.append(dict(cand, error="wrong result"))
                continue
            tried.append(dict(cand, ms=round(time_ms(lambda: ops.attention(q, k, v)), 4)))
    finally:
        entry[path][bucket] = saved
    ok = [t for t in tried if "ms" in t]
    best = min(ok, key=lambda t: t["ms"]) if ok else None
    return dict(shape=name, gpu=key, path=path, bucket=bucket, current=saved, best=best, tried=len(tried))


def main(argv=None):
    """CLI entry point; returns a process exit code."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--res", type=int, nargs="+", default=[256, 512], help="video side in pixels")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--layout", choices=["nlhd", "nhld"], default="nlhd",
                   help="nlhd: strided views as the UNet passes them; nhld: contiguous")
    p.add_argument("--sweep", action="store_true", help="time candidate tiles and print the best per shape")
    p.add_argument("--check", action="store_true", help="only compare with SDPA (odd head dims too); exit 1 on error")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("vidrd.kernels.bench needs a CUDA GPU (none found); nothing to measure.", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("vidrd.kernels.bench needs triton (pip install 'vidrd[kernels]').", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    print(json.dumps(dict(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                          torch=torch.__version__, triton=triton.__version__)), flush=True)
    run = check_one if args.check else sweep_one if args.sweep else bench_one
    todo = [s for res in args.res for s in shapes(res, args.frames)]
    if args.check:  # ragged lengths and padded head dims as well
        todo += [("odd", 3, 8, 300, 77, 40), ("odd", 3, 8, 1000, 1000, 80), ("odd", 64, 8, 7, 7, 160),
                 ("odd", 2, 2, 4096, 4096, 128), ("odd", 2, 2, 200, 333, 256), ("odd", 100, 3, 24, 24, 64)]
    failed = 0
    for shape in todo:
        row = run(*shape, dtype, args.layout)
        failed += not row.get("ok", True)
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
