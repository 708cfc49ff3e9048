"""Benchmark the fused GroupNorm+SiLU and GEGLU kernels against the unfused torch ops on SD2.1 video UNet shapes.

python -m vidrd.kernels.bench_fused [--res 256 512] [--frames 16] [--dtype fp16] [--check]
prints one JSON row per shape: ms and GB/s of the fused kernel and of the torch ops, where GB/s counts the bytes a
single pass must move (GroupNorm: read x, write out; GEGLU: read (M, 2I), write (M, I)), so the two GB/s compare
directly and the ratio is the speedup. --check only compares (also on odd shapes) and exits 1 on a mismatch.
Needs CUDA; on a machine without it, it prints one line and exits 2.
"""
import argparse
import json
import sys

import torch

from .bench import DTYPES, LEVELS, time_ms

# max abs error / max(1, max |torch ops' output|) of the fused kernels on CUDA, per dtype: fp32 differs in summation
# order only; fp16/bf16 round the output once, the torch ops also round x + temb, the norm and gelu (a few unit
# roundoffs: fp16 4.9e-4, bf16 3.9e-3).
TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}
GROUPS = 32


def shapes(res, frames, batch=2):
    """(name, op, shape): ResNet-block GroupNorm (B,C,F,h,w) and feed-forward GEGLU (B F h w, 2I) per UNet level."""
    out = []
    for ch, _, down in LEVELS:
        side = res // 8 // down
        tag = f"{res}px/{ch}ch"
        out.append((f"group_norm_silu {tag}", "gn", (batch, ch, frames, side, side)))
        out.append((f"geglu {tag}", "geglu", (batch * frames * side * side, 2 * 4 * ch)))
    return out


ODD = [("odd gn", "gn", (1, 96, 5, 13, 11)), ("odd gn", "gn", (3, 64, 1, 7, 9)),
       ("odd geglu", "geglu", (1000, 2 * 200)), ("odd geglu", "geglu", (7, 2 * 1280))]


def make_case(op, shape, dtype, extra):
    """(fused call, unfused call, bytes of one pass, why the fused call would fall back or None) on CUDA; GroupNorm
    input in the frame-major layout that a per-frame conv returns; extra: temb (GroupNorm) or bias (GEGLU)."""
    from . import fused as fz
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=dtype, generator=g)
    if op == "gn":
        b, c, f, h, w = shape
        x = torch.randn(b, f, c, h, w, **kw).transpose(1, 2)  # (B,C,F,h,w) view of (B,F,C,h,w) memory
        weight, bias = torch.randn(c, **kw), torch.randn(c, **kw)
        temb = torch.randn(b, c, **kw) if extra else None
        args = (x, weight, bias, GROUPS, 1e-5, temb)
        return (lambda: fz.group_norm_silu(*args)), (lambda: fz.group_norm_silu_reference(*args)), 2 * x.nbytes, \
            fz._gn_unsupported(x, weight, bias, fz._new_like(x))
    x = torch.randn(shape, **kw)
    bias = torch.randn(shape[1], **kw) if extra else None
    return (lambda: fz.geglu(x, bias)), (lambda: fz.geglu_reference(x, bias)), x.nbytes * 3 // 2, \
        fz._geglu_unsupported(x, bias)


def run_one(name, op, shape, dtype, extra, check):
    """One JSON-able row: errors (ok: no fallback, rel_err within TOL), and unless check, ms and GB/s of both."""
    fused, unfused, nbytes, fallback = make_case(op, shape, dtype, extra)
    with torch.no_grad():
        got, want = fused().float(), unfused().float()
        err = float((got - want).abs().max())
        rel = err / max(1.0, float(want.abs().max()))
        row = dict(shape=name, op=op, dims=list(shape), dtype=str(dtype).split(".")[-1], extra=extra,
                   fallback=fallback, max_abs_err=err, rel_err=rel, ok=fallback is None and rel <= TOL[dtype])
        if not check:
            t_f, t_u = time_ms(fused), time_ms(unfused)
            row.update(fused_ms=round(t_f, 4), unfused_ms=round(t_u, 4), fused_gbs=round(nbytes / t_f / 1e6, 1),
                       unfused_gbs=round(nbytes / t_u / 1e6, 1), speedup=round(t_u / t_f, 3))
    return row


def main(argv=None):
    """CLI entry point; returns a process exit code."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--res", type=int, nargs="+", default=[256, 512], help="video side in pixels")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--no-extra", action="store_true", help="GroupNorm without temb, GEGLU without bias")
    p.add_argument("--check", action="store_true", help="only compare with the torch ops (odd shapes too)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("vidrd.kernels.bench_fused needs a CUDA GPU (none found); nothing to measure.", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("vidrd.kernels.bench_fused needs triton (pip install 'vidrd[kernels]').", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    print(json.dumps(dict(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                          torch=torch.__version__, triton=triton.__version__)), flush=True)
    todo = [s for res in args.res for s in shapes(res, args.frames)] + (ODD if args.check else [])
    failed = 0
    for name, op, shape in todo:
        row = run_one(name, op, shape, dtype, not args.no_extra, args.check)
        failed += not row["ok"]
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
