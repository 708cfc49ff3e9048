"""Compile every kernel plan in configs.json for sm_80 / sm_90 without a GPU (triton.compile + GPUTarget).

Run as `python -m vidrd.kernels.aot [--json]` (`--fused 90`: the fused GroupNorm+SiLU and GEGLU kernels instead)
with TRITON_INTERPRET unset: under the interpreter even
triton.language helpers (tl.max, tl.cdiv) are interpreted functions that the compiler cannot lower.
Compiles through Triton's whole NVIDIA pipeline (ttir, ttgir, llir, ptx, cubin via its bundled ptxas)
and checks the shared memory each kernel needs against the GPUs that entry can run on.
"""
import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch

from .ops import load_configs, plan

# Max dynamic shared memory per block: A100 163 KiB, H100 227 KiB; 'default' also serves
# sm_86 / sm_89 / sm_120 (99 KiB).
SMEM = {"sm_80": 166912, "sm_90": 232448, "default": 101376}
ARCHES = (80, 90)  # 'default' compiles for both; an 'sm_XY' entry for its own arch
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# (path, D, Lq, Lk) per head-dim bucket: one per path (pow2 and padded D, even and ragged L); None
# means the longest L the temporal path takes. FULL adds more shape variants of the same configs.
SHAPES = {
    "64": [("spatial", 64, 4096, 4096), ("cross", 64, 1024, 77), ("temporal", 40, None, None)],
    "128": [("spatial", 80, 1000, 1000), ("cross", 80, 256, 77), ("temporal", 80, None, None)],
    "256": [("spatial", 160, 1000, 1000), ("cross", 160, 64, 77), ("temporal", 160, None, None)],
}
FULL = {"64": [("spatial", 40, 1000, 1000), ("temporal", 64, 16, 16)],
        "128": [("spatial", 128, 1024, 1024)], "256": [("temporal", 256, 16, 16)]}


def cases(full=False):
    """Every (config key, arch, dtype, path, D, Lq, Lk) to compile: each config entry at least once."""
    out = []
    for key, entry in load_configs().items():
        if key.startswith("_"):
            continue
        for arch in ARCHES if key == "default" else (int(key[3:]),):
            for dtype in DTYPES:
                for b, shapes in SHAPES.items():
                    for path, d, lq, lk in shapes + (FULL[b] if full else []):
                        if lq is None:
                            lq = lk = entry["temporal"][b]["BLOCK_N"]
                        out.append(dict(key=key, arch=arch, dtype=dtype, path=path, d=d, lq=lq, lk=lk))
    return out


def _arg_values(name, n, h, lq, lk, d):
    """Scalar launch arguments of kernel `name` for contiguous (N,H,L,D) tensors, by argument name."""
    q = (h * lq * d, lq * d, d, 1)
    kv = (h * lk * d, lk * d, d, 1)
    strides = dict(zip(["sqn", "sqh", "sqm", "sqd", "skn", "skh", "skl", "skd",
                        "svn", "svh", "svl", "svd", "son", "soh", "som", "sod"], q + kv + kv + q))
    return dict(strides, S=n * h, H=h, LQ=lq, LK=lk)


def _compile_until(src, target, opts, stop):
    """Run triton.compile's stage pipeline up to and including `stop`; returns the metadata dict."""
    from triton._C.libtriton import ir
    from triton.compiler.compiler import make_backend

    backend = make_backend(target)
    options = backend.parse_options(opts)
    stages = {}
    backend.add_stages(stages, options, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options),
                         backend.get_module_map(), context)
    metadata = {}
    for ext, lower in stages.items():
        module = lower(module, metadata)
        if ext == stop:
            break
    return metadata


def specialize(fn, values, consts):
    """(signature, constexprs, attrs) for triton.compile, mimicking the launcher's specialization of `values`
    (argument name -> '*fp16'-style pointer type, float or int): ints equal to 1 become constants, pointers and
    multiples of 16 get tt.divisibility 16."""
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        v = values.get(arg)
        if arg in consts:
            sig[arg] = "constexpr"
        elif isinstance(v, str):
            sig[arg] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[arg] = "fp32"
        elif v == 1:
            sig[arg] = "constexpr"
            consts = dict(consts, **{arg: 1})
        else:
            sig[arg] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_case(case, stop="cubin"):
    """Compile one case through stage `stop` ('cubin': all of triton.compile; 'llir': through
    shared-memory allocation and LLVM IR); the case plus ok, shared (bytes), smem_limit, seconds, error."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import flash
    t0 = time.time()
    row = dict(case, stop=stop)
    try:
        name, consts, opts = plan(case["key"], DTYPES[case["dtype"]], case["d"], case["lq"], case["lk"])
        fn = flash.compilable(getattr(flash, name))
        values = _arg_values(name, 2, 5, case["lq"], case["lk"], case["d"])
        values.update({p: "*" + case["dtype"] for p in ("Q", "K", "V", "O")}, qk_scale=0.125)
        sig, consts, attrs = specialize(fn, values, consts)
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        target = GPUTarget("cuda", case["arch"], 32)
        if stop == "cubin":
            kernel = triton.compile(src, target=target, options=opts)
            shared, done = kernel.metadata.shared, "cubin" in kernel.asm
        else:
            shared, done = _compile_until(src, target, opts, stop)["shared"], True
        limit = SMEM.get(case["key"], SMEM["default"])
        row.update(kernel=name, opts=opts, shared=shared, smem_limit=limit, ok=done and shared <= limit, error=None)
    except Exception as e:  # report, do not stop the sweep
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
    row["seconds"] = round(time.time() - t0, 2)
    return row


def _run(job):
    return compile_case(*job)


def compile_all(full=False, stop="cubin", workers=None):
    """compile_case over cases(full), in parallel processes; stop: a stage name, or 'auto' for
    cubin on the fp16 sm_XY entries and llir elsewhere. A list of result rows."""
    jobs = []
    for c in cases(full):
        s = stop if stop != "auto" else ("cubin" if c["dtype"] == "fp16" and c["key"] != "default" else "llir")
        jobs.append((c, s))
    workers = workers or min(8, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_run, jobs))


# The fused kernels (kernels/fused.py) on SD2.1 video UNet shapes: GroupNorm + SiLU on a 256px level-0 block
# (B=2, C=320, G=32, F=8, 32x32) in the frame-major layout a per-frame conv returns, channels-last-3d and contiguous;
# GEGLU on its feed-forward (B F h w = 16384 rows, I = 1280). fp16 covers every variant, bf16 and fp32 the main one.
GN_SHAPE = (2, 320, 8, 32, 32)
GEGLU_SHAPE = (16384, 2 * 1280)


def fused_cases(arch=90):
    """Every (kernel, dtype, layout, with temb / bias) of the fused kernels to compile for sm_<arch>."""
    out = []
    for dtype in DTYPES:
        variants = [("frame-major", True)]
        if dtype == "fp16":
            variants += [("channels-last", False), ("contiguous", True)]
        for layout, temb in variants:
            for kernel in ("gn_stats", "gn_apply"):
                out.append(dict(arch=arch, dtype=dtype, kernel=kernel, layout=layout, extra=temb))
        for bias in (True, False) if dtype == "fp16" else (True,):
            out.append(dict(arch=arch, dtype=dtype, kernel="geglu_fwd", layout="rows", extra=bias))
    return out


def _fused_values(case):
    """(kernel module name, keyword arguments) of one fused case, built by the wrapper from meta tensors."""
    from . import fused
    dtype = DTYPES[case["dtype"]]
    meta = dict(dtype=dtype, device="meta")
    if case["kernel"] == "geglu_fwd":
        x = torch.empty(GEGLU_SHAPE, **meta)
        bias = torch.empty(GEGLU_SHAPE[1], **meta) if case["extra"] else None
        return "geglu", fused.geglu_args(x, bias, torch.empty(GEGLU_SHAPE[0], GEGLU_SHAPE[1] // 2, **meta))[1]
    b, c, f, h, w = GN_SHAPE
    if case["layout"] == "frame-major":  # (B,F,C,h,w) memory seen as (B,C,F,h,w)
        x = torch.empty(b, f, c, h, w, **meta).transpose(1, 2)
    elif case["layout"] == "channels-last":
        x = torch.empty(GN_SHAPE, **meta).contiguous(memory_format=torch.channels_last_3d)
    else:
        x = torch.empty(GN_SHAPE, **meta)
    weight, bias = torch.empty(c, **meta), torch.empty(c, **meta)
    temb = torch.empty(b, c, **meta) if case["extra"] else None
    _, stats, apply, _ = fused.gn_args(x, weight, bias, 32, 1e-5, temb, torch.empty_like(x))
    return "groupnorm", dict(stats if case["kernel"] == "gn_stats" else apply, PART=torch.empty(1, **meta))


def compile_fused_case(case, stop="cubin"):
    """Compile one fused case like compile_case: the case plus ok, shared, smem_limit, seconds, error."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    from .flash import compilable
    from .fused import NUM_WARPS
    t0 = time.time()
    row = dict(case, stop=stop)
    try:
        module, kwargs = _fused_values(case)
        fn = compilable(getattr(importlib.import_module(f".{module}", __package__), case["kernel"]))
        pointer = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
        values = {k: pointer[v.dtype] if k != "PART" else "*fp32" for k, v in kwargs.items()
                  if isinstance(v, torch.Tensor)}
        values.update({k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
        consts = {k: values[k] for k, p in zip(fn.arg_names, fn.params) if p.is_constexpr}
        sig, consts, attrs = specialize(fn, values, consts)
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        target, opts = GPUTarget("cuda", case["arch"], 32), dict(num_warps=NUM_WARPS)
        if stop == "cubin":
            kernel = triton.compile(src, target=target, options=opts)
            shared, done = kernel.metadata.shared, "cubin" in kernel.asm
        else:
            shared, done = _compile_until(src, target, opts, stop)["shared"], True
        limit = SMEM[f"sm_{case['arch']}"]
        row.update(shared=shared, smem_limit=limit, ok=done and shared <= limit, error=None)
    except Exception as e:  # report, do not stop the sweep
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
    row["seconds"] = round(time.time() - t0, 2)
    return row


def _run_fused(job):
    return compile_fused_case(*job)


def compile_fused(arch=90, stop="cubin", workers=None):
    """compile_fused_case over fused_cases(arch), in parallel processes. A list of result rows."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_run_fused, [(c, stop) for c in fused_cases(arch)]))


def main(argv=None):
    """CLI: print one row per case (JSON with --json); exit 1 if any failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print all rows as one JSON list")
    p.add_argument("--full", action="store_true", help="also compile more shape variants per config")
    p.add_argument("--stop", default="cubin", choices=["ttgir", "llir", "ptx", "cubin", "auto"],
                   help="last stage to run (default cubin: the whole of triton.compile)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--fused", type=int, metavar="ARCH", choices=ARCHES, default=None,
                   help="compile the fused GroupNorm+SiLU and GEGLU kernels for sm_ARCH instead (stop 'auto': cubin)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("vidrd.kernels.aot: unset TRITON_INTERPRET (the interpreter cannot compile kernels)")
    if args.fused:
        rows = compile_fused(args.fused, "cubin" if args.stop == "auto" else args.stop, args.workers)
    else:
        rows = compile_all(args.full, args.stop, args.workers)
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(json.dumps(r))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
