"""`./dev gpu-check`: every GPU path of vidrd on one CUDA machine, in one command: a JSON report and a Markdown table.

    python tests/gpu_check.py [--out DIR] [--only parity,kernels,...] [--budget-min 19]

Sections (SECTIONS, in this order): the fixture parity cases on CUDA in float32; the GPU tests of tests/
(pytest -m gpu); the Triton kernels against SDPA; the UNet with Triton attention against SDPA; bf16 and fp16 against fp32 (quality
numbers); torch.compile reduce-overhead; the ONNX Runtime and TensorRT backends (when a CUDA onnxruntime or TensorRT
is installed); AOTInductor packages (tiny runtime, sd21-base UNet) and --dtype fp8 (sm 8.9+; `--only aoti,fp8` fits a
15-minute GPU loan); step-level batching of 8 jobs (batch); the sd21-base benchmark workload (float32 reference
against the GPU configurations, best marked).
Each section runs in a process of its own with a time limit, so a CUDA fault or a hang costs that section only; the
whole run keeps within --budget-min minutes and reports every section it skipped, and why.

Needs only torch with CUDA (plus triton, onnx, onnxruntime where a section uses them): no PyAV, no FastAPI, no
network. On a machine without a CUDA GPU it says so in one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from vidrd.runtime.bench.batched import gpu_check as batch  # step-level batching of 8 jobs, K = 1..8
from vidrd.runtime.bench.metrics import psnr

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling modules
from gpu_report import gist, markdown  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the checkout (tests/ and the fixtures are found from here)


def tolerances():
    """The suite's one table of tolerances (tests/tolerances.py, beside this file), where this check's bounds are
    written with their reasons (GPU_NETWORKS, GPU_PIPELINES, ...)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import tolerances as table
    return table


class Skip(Exception):
    """A section that cannot run on this machine; the message says why."""


def fixtures_dir() -> Path | None:
    """vidrd-tiny fixtures: $VIDRD_FIXTURES, ../shared/fixtures (dev machines, CI), ./shared/fixtures (GPU machines)."""
    for base in (os.environ.get("VIDRD_FIXTURES"), ROOT.parent / "shared" / "fixtures", ROOT / "shared" / "fixtures"):
        if base and (Path(base) / "vidrd-tiny" / "golden.safetensors").is_file():
            return Path(base) / "vidrd-tiny"
    return None


def _rel_max(a, b) -> float:
    """max |a - b| relative to max(1, max |b|), both on the host in float32 (the tests' `close`)."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def _cuda_ms(fn, reps: int = 5) -> float:
    """Median milliseconds of fn() on the current stream (CUDA events), after one warm-up call."""
    import torch
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _bench_row(summary: dict) -> dict:
    """The numbers of a `vidrd bench` summary that go into the report."""
    keys = ("workload", "s_per_frame", "reference_s_per_frame", "speedup", "psnr_db", "latents_rel_err",
            "unet_per_call_s", "vae_per_clip_s", "unet_gflops", "peak_cuda_mb")
    row = {k: summary.get(k) for k in keys}
    row["config"] = {k: v for k, v in summary["config"].items() if v not in (None, "sdpa", "torch") and
                     k != "device"} or {"dtype": "fp32"}
    return row


def _bench(workload: str, repeats: int = 1, with_reference: bool = True, quality: str | None = None,
           **options) -> dict:
    from vidrd.runtime.bench.runtime import run
    from vidrd.runtime.options import RuntimeOptions
    summary = run(workload, RuntimeOptions(device="cuda", **options), repeats=repeats, with_reference=with_reference,
                  log=lambda *a: print(*a, flush=True), quality=quality, explicit=tuple(options))
    row = _bench_row(summary)
    if quality is not None:
        q = summary["quality"]
        row["config"] = {"quality": quality, **row["config"]}
        row.update(ssim=summary.get("ssim"), unet_calls_by_mode=summary["unet_calls_by_mode"],
                   unet_cond_only_calls=summary["unet_cond_only_calls"],
                   resolved={k: q[k] for k in ("solver", "steps", "requested_steps", "cache_interval", "cache_from",
                                               "cache_until", "guidance_reuse_after", "dtype")})
    return row


# ------------------------------------------------------------------------------------------------------- sections

def parity() -> dict:
    """The fixture cases (golden tensors of the official code) on CUDA in float32, TF32 off."""
    import torch
    from safetensors.torch import load_file

    from vidrd.ref.loading import load_official
    from vidrd.ref.sampler import SamplerSettings
    from vidrd.ref.text import tokenize

    from vidrd.runtime.loop import Limits, Request
    from vidrd.runtime.options import open_runtime

    fx = fixtures_dir()
    if fx is None:
        raise Skip("fixtures not found (../shared/fixtures/vidrd-tiny, ./shared/fixtures/vidrd-tiny or "
                   "$VIDRD_FIXTURES)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    golden, cases = load_file(str(fx / "golden.safetensors")), json.loads((fx / "cases.json").read_text())["cases"]
    model = load_official(fx / "sd", fx / "ModelT2V.pth", fx / "vae_finetuned", device="cuda")
    g = {k: v.cuda() for k, v in golden.items()}
    errs = {}
    with torch.no_grad():
        ids = tokenize(model.tokenizer, cases["text"]["prompts"]).cuda()
        errs["text.embeddings"] = _rel_max(model.text_encoder(ids), g["text.embeddings"])
        for t in (981, 501, 1):
            errs[f"unet.t{t}.out"] = _rel_max(model.unet(g["unet.sample"], t, g["unet.context"]), g[f"unet.t{t}.out"])
        errs["unet.f1.out"] = _rel_max(model.unet(g["unet.sample"][:, :, :1], 981, g["unet.context"]), g["unet.f1.out"])
        z = g["vae.latents"]  # (1,C,F,h,w)
        b, c, f, h, w = z.shape
        zf = z.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # ((B F),C,h,w)
        errs["vae.decode_per_frame"] = _rel_max(model.vae.decode(zf, num_frames=1), g["vae.decode_per_frame"])
        errs["vae.decode_temporal"] = _rel_max(model.vae.decode(zf, num_frames=f), g["vae.decode_temporal"])
    rt = open_runtime(model, limits=Limits(batch=2, frames=8, height=64, width=64, steps=10, overlap=4))
    try:
        for name in ("single_clip", "three_clips", "batch_two"):
            cs = cases[f"pipe.{name}"]
            s = SamplerSettings(height=cs["height"], width=cs["width"], frames=cs["num_frames"],
                                steps=cs["num_inference_steps"], clips=cs.get("num_generated_clips", 1),
                                overlap=cs.get("extend_overlap_frames", 4),
                                noise_recycle=cs.get("extend_noise_recycle", 4),
                                denoise_guidance=cs.get("extend_denoise_guidance", 0.4),
                                guidance_scale=cs["guidance_scale"])
            neg = None if cs["negative_prompt"] is None else tuple(cs["negative_prompt"])
            clips = list(rt.generate(Request(tuple(cs["prompt"]), neg, s, cs["seed"], float_video=True)))
            errs[f"pipe.{name}.video"] = _rel_max(torch.cat([c.video for c in clips], 2), golden[f"pipe.{name}.video"])
            latents = torch.stack([c.latents for c in clips])
            ref = golden[f"pipe.{name}.final_latents"]
            errs[f"pipe.{name}.final_latents"] = (latents - ref).abs().max().item() / ref.abs().max().item()
    finally:
        rt.close()
    tol = tolerances()
    bad = {k: v for k, v in errs.items() if v > (tol.GPU_PIPELINES if k.startswith("pipe.") else tol.GPU_NETWORKS)}
    return {"status": "fail" if bad else "ok", "max_rel_err": errs, "tolerance": {"networks": tol.GPU_NETWORKS,
            "pipelines": tol.GPU_PIPELINES}, "over_tolerance": bad}


def gpu_tests() -> dict:
    """The tests of tests/ marked gpu, with the compiled Triton kernels (TRITON_INTERPRET=0) and slow tests on."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text())
    env = {**os.environ, "TRITON_INTERPRET": "0", "VIDRD_SLOW": "1"}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider", *files]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    out = res.stdout + res.stderr
    print(out, flush=True)
    lines = out.strip().splitlines()
    skipped = [ln.split(" ", 2)[-1] for ln in lines if ln.startswith("SKIPPED")]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    summary = next((ln.strip("= ") for ln in reversed(lines) if " in " in ln and ("passed" in ln or "failed" in ln
                    or "skipped" in ln or "error" in ln)), lines[-1] if lines else "no output")
    return {"status": "ok" if res.returncode == 0 else "fail", "command": " ".join(cmd[2:]), "summary": summary,
            "skipped": skipped, "failed": failed}


def kernels() -> dict:
    """Triton attention against SDPA on the sd21-base shapes (python -m vidrd.kernels.bench)."""
    rows, timings = [], []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for dtype in ("fp16", "bf16", "fp32"):
        res = subprocess.run([sys.executable, "-m", "vidrd.kernels.bench", "--check", "--res", "256", "512",
                              "--frames", "16", "--dtype", dtype], env=env, capture_output=True, text=True)
        print(res.stdout[-3000:], res.stderr[-3000:], flush=True)
        rows += [dict(json.loads(ln), dtype=dtype) for ln in res.stdout.splitlines() if '"max_abs_err"' in ln]
        if res.returncode not in (0, 1):
            raise RuntimeError(f"vidrd.kernels.bench --check --dtype {dtype} exited {res.returncode}: "
                               f"{res.stderr.strip()[-500:]}")
    for dtype in ("fp16", "bf16"):
        res = subprocess.run([sys.executable, "-m", "vidrd.kernels.bench", "--res", "256", "512", "--frames", "16",
                              "--dtype", dtype], env=env, capture_output=True, text=True)
        timings += [json.loads(ln) for ln in res.stdout.splitlines() if '"speedup"' in ln]
    bad = [r for r in rows if not r.get("ok", True)]
    return {"status": "fail" if bad or not rows else "ok", "checked_shapes": len(rows),
            "mismatches": bad, "max_abs_err": {d: max((r["max_abs_err"] for r in rows if r["dtype"] == d),
                                                     default=None) for d in ("fp16", "bf16", "fp32")},
            "timings": [{k: t[k] for k in ("shape", "dtype", "ours_ms", "sdpa_ms", "ours_tflops", "sdpa_tflops",
                                            "speedup")} for t in timings]}


def triton_unet() -> dict:
    """The UNet with attention='triton' against SDPA: the tiny preset in fp32, sd21-base in fp16 and bf16."""
    import torch

    from vidrd.ref.attention import set_attention
    from vidrd.ref.weights import random_model

    # TF32 off: with TF32 convolutions (cuDNN's default) the 1e-6 attention differences flip TF32 roundings of the
    # next layers' inputs, which reads as ~1e-3 in float32 (seen on an H200) and is not the kernels' error
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    for preset, dtype, frames, side in (("tiny", torch.float32, 8, 32), ("sd21-base", torch.float16, 16, 32),
                                        ("sd21-base", torch.bfloat16, 16, 32)):
        model = random_model(preset, 0, dtype=dtype, device="cuda")
        g = torch.Generator(device="cuda").manual_seed(0)
        c = model.config.unet.in_channels
        x = torch.randn(2, c, frames, side, side, device="cuda", generator=g).to(dtype)  # (2B,C,F,h,w)
        ctx = torch.randn(2, 77, model.config.text.hidden_size, device="cuda", generator=g).to(dtype)
        ts = torch.full((2,), 981.0, device="cuda")
        res = {}
        with torch.no_grad():
            for attn in ("sdpa", "triton"):
                set_attention(model.unet, attn)
                res[attn] = (model.unet(x, ts, ctx).float(), _cuda_ms(lambda: model.unet(x, ts, ctx)))
        ref, got = res["sdpa"][0], res["triton"][0]
        name = f"{preset} {str(dtype).split('.')[-1]} (2,{c},{frames},{side},{side})"
        out[name] = {"rel_l2_err": ((got - ref).norm() / ref.norm()).item(), "sdpa_ms": res["sdpa"][1],
                     "triton_ms": res["triton"][1],
                     "tol": tolerances().GPU_TRITON_UNET_REL_L2[str(dtype).split(".")[-1]]}
        del model, res
        torch.cuda.empty_cache()
    bad = [k for k, v in out.items() if not v["rel_l2_err"] <= v["tol"]]
    return {"status": "fail" if bad else "ok", "unet": out, "over_tolerance": bad}


def precision() -> dict:
    """bf16 and fp16 runtimes against the float32 reference on the `small` workload: PSNR and latent error."""
    from vidrd.runtime.loop import NonFiniteOutput

    rows = []
    for cfg in ({"dtype": "fp32"}, {"dtype": "bf16"}, {"dtype": "fp16"}, {"dtype": "fp16", "vae_dtype": "fp16"}):
        try:
            rows.append(_bench("small", **cfg))
        except NonFiniteOutput as e:  # the guard doing its job: report it, it is a finding about fp16 VAEs
            rows.append({"config": cfg, "non_finite": str(e)})
    return {"status": "ok", "rows": rows}


def compiled() -> dict:
    """torch.compile mode='reduce-overhead' (CUDA graphs) in fp32 and bf16 on the `small` workload."""
    rows = [_bench("small", repeats=2, dtype=d, compile="reduce-overhead") for d in ("fp32", "bf16")]
    least = tolerances().GPU_BACKEND_PSNR_DB
    bad = [r for r in rows if r["config"].get("dtype", "fp32") == "fp32" and not r["psnr_db"] > least]
    return {"status": "fail" if bad else "ok", "rows": rows,
            "note": f"fp32 must stay within {least} dB PSNR of the reference"}


def presets() -> dict:
    """The quality presets on the sd21-base workload: same-run speed-up and PSNR/SSIM against the exact
    float32 reference at the workload's 50 requested steps; bf16 alone (exact schedule) for comparison, and `fast`
    without --fast-ops (what those kernels give on a GPU)."""
    rows = []
    for quality, cfg in (("fast", {}), ("fast", {"fast_ops": False}), ("balanced", {}), ("exact", {"dtype": "bf16"})):
        try:
            rows.append(_bench("sd21-base", quality=quality, **cfg))
        except Exception as e:  # one preset failing must not hide the others' numbers
            traceback.print_exc()
            rows.append({"config": {"quality": quality, **cfg}, "error": f"{type(e).__name__}: {e}"[:400]})
    return {"status": "fail" if any("error" in r for r in rows) else "ok", "rows": rows}


def _tiny_export(tmp: Path):
    from vidrd.export.onnx_export import export
    from vidrd.ref.weights import random_model

    model = random_model("tiny", 0)
    export(model, tmp / "onnx", source={"kind": "preset", "preset": "tiny", "seed": 0}, log=lambda *a: None)
    return model, tmp / "onnx"


def _runtime_video(model, backend: str, dtype="fp32", **options):
    """One tiny request (2 clips, 3 steps, 256 px) through the runtime on CUDA: video (B,3,T,H,W) float32."""
    import torch

    from vidrd.ref.loading import to
    from vidrd.ref.sampler import SamplerSettings

    from vidrd.runtime.loop import Limits, Request
    from vidrd.runtime.options import RuntimeOptions, open_runtime

    s = SamplerSettings(height=256, width=256, frames=8, steps=3, clips=2, overlap=4)
    rt = open_runtime(to(model, device="cuda"), RuntimeOptions(backend, dtype=dtype, device="cuda", **options),
                      Limits(1, 8, 256, 256, 3, 4))
    try:
        t0 = time.perf_counter()
        video = torch.cat([c.video for c in rt.generate(Request(("a boat",), ("watermark",), s, 42, True))], 2)
        return video, time.perf_counter() - t0
    finally:
        rt.close()


def onnxruntime() -> dict:
    """The onnxruntime backend on CUDA (CUDA or TensorRT execution provider) against the torch backend."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise Skip(f"onnxruntime is not installed ({e})") from None
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise Skip(f"onnxruntime {ort.__version__} is the CPU build (providers {providers}): install onnxruntime-gpu")
    with tempfile.TemporaryDirectory() as tmp:
        model, onnx_dir = _tiny_export(Path(tmp))
        ref, t_ref = _runtime_video(model, "torch")
        got, t_ort = _runtime_video(model, "onnxruntime", export_dir=onnx_dir)
    db = psnr(got, ref)
    return {"status": "ok" if db > tolerances().GPU_BACKEND_PSNR_DB else "fail", "providers": providers,
            "psnr_db_vs_torch": db,
            "seconds": {"torch": t_ref, "onnxruntime": t_ort}}


def tensorrt() -> dict:
    """TensorRT engines (fp32 dynamic for every component; fp16 static UNet with CUDA graphs) against torch."""
    try:
        import tensorrt as trt
        import polygraphy.backend.trt  # noqa: F401
    except ImportError as e:
        raise Skip(f"TensorRT or polygraphy is not installed ({e}): pip install tensorrt-cu12 'vidrd[tensorrt]'") \
            from None
    from vidrd.export.engines import Shapes, build_all

    out = {"tensorrt": trt.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        model, onnx_dir = _tiny_export(Path(tmp))
        ref, t_ref = _runtime_video(model, "torch")
        t0 = time.perf_counter()
        build_all(onnx_dir, Path(tmp) / "fp32", Shapes((1, 1, 2), (8, 8, 8), (256, 256, 256)), "fp32", log=print)
        build_all(onnx_dir, Path(tmp) / "fp16", Shapes((1, 1, 1), (8, 8, 8), (256, 256, 256), static=True), "fp16",
                  components=["unet"], log=print)
        out["build_s"] = time.perf_counter() - t0
        got, t32 = _runtime_video(model, "tensorrt", engine_dir=Path(tmp) / "fp32")
        half, t16 = _runtime_video(model, "torch", "fp16", unet_backend="tensorrt", engine_dir=Path(tmp) / "fp16")
    out.update(psnr_db_fp32_vs_torch=psnr(got, ref), psnr_db_fp16_static_unet_vs_torch=psnr(half, ref),
               seconds={"torch": t_ref, "tensorrt_fp32": t32, "tensorrt_fp16_static_unet": t16})
    return {"status": "ok" if out["psnr_db_fp32_vs_torch"] > tolerances().GPU_BACKEND_PSNR_DB else "fail", **out}


def _unet_inputs(model, frames: int = 16, side: int = 32):
    """Seeded sd21-base UNet inputs on CUDA under guidance: sample (2,C,F,h,w), timestep (2,), context (2,77,D)."""
    import torch
    g = torch.Generator(device="cuda").manual_seed(0)
    dtype = model.unet.conv_in.weight.dtype
    x = torch.randn(2, model.config.unet.in_channels, frames, side, side, device="cuda", generator=g).to(dtype)
    ctx = torch.randn(2, 77, model.config.unet.cross_attention_dim, device="cuda", generator=g).to(dtype)
    return x, torch.full((2,), 981.0, device="cuda"), ctx


def aoti() -> dict:
    """AOTInductor packages on CUDA: the tiny preset exported and bound by the runtime (against the torch backend),
    then the sd21-base UNet as a static bf16 package at 256x256, 16 frames, batch 2 against bf16 eager SDPA."""
    import torch

    from vidrd.export import aoti_export
    from vidrd.export.spec import Dim
    from vidrd.ref.loading import to
    from vidrd.ref.weights import random_model
    from vidrd.runtime.backends.aoti import load_package

    out = {}
    # the request _runtime_video makes (1 prompt under guidance, 8 frames, 256 px): UNet static, text and VAE not
    ranges = {"text_encoder": {"B": Dim(1, 2, 2)},
              "unet": {"N": Dim(2, 2, 2), "F": Dim(8, 8, 8), "h": Dim(32, 32, 32, 8), "w": Dim(32, 32, 32, 8)},
              "vae_decoder": {"N": Dim(1, 8, 8), "h": Dim(32, 32, 32), "w": Dim(32, 32, 32)}}
    with tempfile.TemporaryDirectory() as tmp:
        model = to(random_model("tiny", 0), device="cuda")
        res = aoti_export.export(model, Path(tmp) / "tiny", components=tuple(ranges), ranges=ranges, log=print)
        out["tiny_compile_s"] = {k: v["compile_seconds"] for k, v in res.manifest["components"].items()}
        ref, t_ref = _runtime_video(model, "torch")
        got, t_aoti = _runtime_video(model, "aoti", export_dir=Path(tmp) / "tiny")
        out["tiny_psnr_db_vs_torch"], out["tiny_seconds"] = psnr(got, ref), {"torch": t_ref, "aoti": t_aoti}
        del model
        big = random_model("sd21-base", 0, device="cuda")  # float32: the exporter casts a bf16 copy
        unet = {"N": Dim(2, 2, 2), "F": Dim(16, 16, 16), "h": Dim(32, 32, 32, 8), "w": Dim(32, 32, 32, 8)}
        res = aoti_export.export(big, Path(tmp) / "sd21", precision="bf16", components=("unet",),
                                 ranges={"unet": unet}, log=print)
        out["sd21_unet_compile_s"] = res.manifest["components"]["unet"]["compile_seconds"]
        big.unet.to(torch.bfloat16)
        fn = load_package(Path(tmp) / "sd21" / "unet.pt2", torch.device("cuda"))
        x, ts, ctx = _unet_inputs(big)
        with torch.no_grad():
            want, got = big.unet(x, ts, ctx).float(), fn(x, ts, ctx).float()
            eager_ms, aoti_ms = _cuda_ms(lambda: big.unet(x, ts, ctx)), _cuda_ms(lambda: fn(x, ts, ctx))
    out["sd21_unet"] = {"shape": list(x.shape), "eager_bf16_ms": eager_ms, "aoti_bf16_ms": aoti_ms,
                        "speedup": eager_ms / aoti_ms, "rel_l2_err": ((got - want).norm() / want.norm()).item()}
    least = tolerances().GPU_BACKEND_PSNR_DB
    return {"status": "ok" if out["tiny_psnr_db_vs_torch"] > least else "fail", **out,
            "note": f"tiny: the aoti runtime within {least} dB PSNR of torch; sd21: one UNet call, median of 5"}


def fp8() -> dict:
    """--dtype fp8 on sd21-base: UNet call speed (per-row and per-tensor scales, eager and compiled) against bf16,
    and PSNR of a 10-step video against the bf16 runtime's."""
    import torch

    from vidrd.ref.sampler import SamplerSettings
    from vidrd.ref.weights import random_model
    from vidrd.runtime.backends.fp8 import fp8_copy
    from vidrd.runtime.loop import Limits, Request
    from vidrd.runtime.options import RuntimeOptions, open_runtime
    from vidrd.runtime.precision import fp8_support

    ok, reason = fp8_support("cuda")
    if not ok:
        raise Skip(reason)
    t0 = time.perf_counter()
    model = random_model("sd21-base", 0, dtype=torch.bfloat16, device="cuda")
    x, ts, ctx = _unet_inputs(model)
    calls = {"bf16": model.unet, "fp8_row": fp8_copy(model.unet, "row"), "fp8_tensor": fp8_copy(model.unet, "tensor")}
    out, ref = {"shape": list(x.shape), "fp8_reason": reason}, None
    with torch.no_grad():
        for name, net in calls.items():
            y = net(x, ts, ctx).float()
            ref = y if ref is None else ref
            out[name] = {"ms": _cuda_ms(lambda: net(x, ts, ctx)), "rel_l2_err": ((y - ref).norm() / ref.norm()).item()}
        if time.perf_counter() - t0 < 90:  # compiled: inductor fuses the activations' quantization into one kernel
            for name in ("bf16", "fp8_row"):
                fn = torch.compile(calls[name], dynamic=False)
                fn(x, ts, ctx)
                out[name]["compiled_ms"] = _cuda_ms(lambda: fn(x, ts, ctx))
    del calls
    torch.cuda.empty_cache()
    s = SamplerSettings(height=256, width=256, frames=16, steps=10)
    videos = {}
    for dtype in ("bf16", "fp8"):
        rt = open_runtime(model, RuntimeOptions(dtype=dtype, device="cuda"), Limits(1, 16, 256, 256, 10, 4))
        try:
            videos[dtype] = torch.cat([c.video for c in rt.generate(Request(("a boat",), None, s, 42, True))], 2)
        finally:
            rt.close()
    out["video_psnr_db_vs_bf16"] = psnr(videos["fp8"], videos["bf16"])
    out["speedup_eager_row"] = out["bf16"]["ms"] / out["fp8_row"]["ms"]
    least = tolerances().GPU_FP8_PSNR_DB
    return {"status": "ok" if out["video_psnr_db_vs_bf16"] >= least else "fail", **out,
            "gate": f"video PSNR >= {least} dB against bf16"}


def sd21_base() -> dict:
    """The sd21-base bench workload: the float32 reference sampler against the GPU configurations; best marked."""
    configs = [{"dtype": "fp32"}, {"dtype": "bf16"}, {"dtype": "fp16"}, {"dtype": "fp16", "attention": "triton"},
               {"dtype": "fp16", "compile": "reduce-overhead"}]
    rows = []
    for cfg in configs:
        try:
            rows.append(_bench("sd21-base", **cfg))
        except Exception as e:  # one configuration failing must not hide the others' numbers
            traceback.print_exc()
            rows.append({"config": cfg, "error": f"{type(e).__name__}: {e}"[:400]})
    least = tolerances().GPU_BEST_PSNR_DB
    ok = [r for r in rows if "s_per_frame" in r and r.get("psnr_db", 0) > least]
    best = min(ok, key=lambda r: r["s_per_frame"]) if ok else None
    return {"status": "ok" if best and not any("error" in r for r in rows) else "fail", "rows": rows,
            "best": best and best["config"], "best_rule": f"lowest s/frame among runs within {least} dB PSNR of the "
            "float32 reference"}


# name, time limit (s), function
SECTIONS = [("parity", 240, parity), ("presets", 420, presets), ("gpu_tests", 480, gpu_tests), ("kernels", 240, kernels),
            ("triton_unet", 180, triton_unet), ("precision", 240, precision), ("compile", 360, compiled),
            ("onnxruntime", 240, onnxruntime), ("tensorrt", 480, tensorrt), ("aoti", 480, aoti), ("fp8", 240, fp8),
            ("batch", 300, batch), ("sd21_base", 600, sd21_base)]


# ------------------------------------------------------------------------------------------------------- driver

def run_section(name: str, result: Path) -> int:
    """Child process: run one section and write its result (status ok, fail or skipped) as JSON."""
    fn = dict((n, f) for n, _, f in SECTIONS)[name]
    t0 = time.perf_counter()
    try:
        res = fn()
    except Skip as e:
        res = {"status": "skipped", "reason": str(e)}
    except Exception as e:
        traceback.print_exc()
        res = {"status": "fail", "error": f"{type(e).__name__}: {e}"[:2000]}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    from vidrd.runtime.bench.metrics import strict_json
    result.write_text(strict_json(res, indent=1, default=str))
    return 0


def machine() -> dict:
    """What this machine offers: GPU, versions, and which optional stacks are there."""
    import importlib.util

    import torch
    info = {"gpu": torch.cuda.get_device_name(), "capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for mod in ("triton", "onnx", "onnxruntime", "tensorrt", "transformers", "av", "fastapi"):
        if importlib.util.find_spec(mod) is None:
            info[mod] = None
            continue
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # a broken optional install: name it, do not stop
            info[mod] = f"broken: {type(e).__name__}: {e}"[:200]
    if info["onnxruntime"] and not str(info["onnxruntime"]).startswith("broken"):
        import onnxruntime
        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/gpu-check", help="folder for gpu-check.json, gpu-check.md, gpu-check.log")
    p.add_argument("--only", help="comma-separated sections: " + ",".join(n for n, _, _ in SECTIONS))
    p.add_argument("--budget-min", type=float, default=19.0, help="stop starting sections after this many minutes")
    p.add_argument("--section", help=argparse.SUPPRESS)  # child process: run this section ...
    p.add_argument("--result", help=argparse.SUPPRESS)  # ... and write its result here
    args = p.parse_args(argv)
    if args.section:
        return run_section(args.section, Path(args.result))

    import torch
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU on this machine (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}): nothing checked; run it on a machine with an NVIDIA GPU",
              file=sys.stderr)
        return 2
    names = [n for n, _, _ in SECTIONS]
    only = names if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in names]
    if unknown:
        print(f"gpu-check: unknown sections {unknown}; choose from {names}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    deadline = t0 + 60 * args.budget_min
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "sections": {}}
    print(json.dumps({"machine": report["machine"]}), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not the interpreter
    env["PYTHONUNBUFFERED"] = "1"
    log_path = out / "gpu-check.log"
    log_path.write_text("")
    for name, limit, fn in SECTIONS:
        if name not in only:
            continue
        left = deadline - time.monotonic()
        if left < 30:
            report["sections"][name] = {"status": "skipped", "reason": f"time budget of {args.budget_min:g} min used"}
            continue
        limit = min(limit, left)
        print(f"[gpu-check] {name} (up to {limit:.0f} s): {fn.__doc__.splitlines()[0]}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            res_file = Path(tmp) / "result.json"
            t1 = time.monotonic()
            with open(log_path, "a") as log:
                log.write(f"\n===== {name} =====\n")
                log.flush()
                try:
                    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--section", name,
                                           "--result", str(res_file)], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, timeout=limit)
                    res = json.loads(res_file.read_text()) if res_file.is_file() else \
                        {"status": "fail", "error": f"the section's process exited {proc.returncode} without a "
                                                    f"result (crash? see gpu-check.log)"}
                except subprocess.TimeoutExpired:
                    res = {"status": "timeout", "reason": f"stopped after {limit:.0f} s (see gpu-check.log)"}
            res.setdefault("seconds", round(time.monotonic() - t1, 1))
        report["sections"][name] = res
        print(f"[gpu-check] {name}: {res['status']} ({res['seconds']} s) {gist(name, res)}", flush=True)
    report["total_s"] = round(time.monotonic() - t0, 1)
    report["skipped"] = {n: r.get("reason") for n, r in report["sections"].items() if r["status"] == "skipped"}
    from vidrd.runtime.bench.metrics import strict_json
    (out / "gpu-check.json").write_text(strict_json(report, indent=1, default=str))
    md = markdown(report)
    (out / "gpu-check.md").write_text(md)
    print(md)
    for n, why in report["skipped"].items():
        print(f"skipped {n}: {why}")
    print(f"wrote {out / 'gpu-check.json'}, {out / 'gpu-check.md'}, {log_path}")
    return 1 if any(r["status"] in ("fail", "timeout") for r in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
