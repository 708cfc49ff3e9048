"""`vidrd bench`: the runtime against the reference sampler on one workload, in one process (BENCHMARKS.md protocol).

Protocol: build both, run each once as warm-up (excluded: compilation, caches, page faults), then `repeats` timed
runs each, alternating runtime and reference; report medians. Per-stage times come from timers around the backend
calls of the runtime (text, UNet, VAE; on CUDA, events recorded on the stream each call runs on, so timing adds no
synchronisation and the decode keeps overlapping the next clip's denoising), the rest of the loop is `loop_other`
(on CUDA, wall time minus the stage times, which can overlap: the VAE runs beside the UNet); writing is timed by
encoding the clips to an .mp4 in a temporary folder (not without PyAV). One JSON object per run is printed
(machine-readable), plus a summary row.

With a quality preset (`--quality balanced|fast`, runtime/quality.py) the runtime runs the preset's solver, steps,
reuse and dtype while the baseline stays the float32 reference sampler at the workload's own settings (exact), so
the accuracy fields (PSNR, SSIM, latents) measure the preset's video against the exact video of the same seed. The
summary then also has the resolved preset, the UNet calls per kind (full/store/reuse, conditional-only) and the
UNet FLOPs of a whole run counted per kind.
"""
from __future__ import annotations

import importlib.util
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict

import torch

from vidrd.ref.config import LATENT_FACTOR
from vidrd.ref.reuse import FeatureCache
from vidrd.ref.sampler import SamplerSettings, generate

from vidrd.runtime.backends import Backend
from vidrd.runtime.loop import Limits, Request
from vidrd.runtime.bench.metrics import psnr, ssim, strict_json
from vidrd.runtime.options import RuntimeOptions, open_runtime

WORKLOADS = {
    # the CPU workload: small preset, one prompt, 256x256, 8 frames x 3 clips, 10 steps, guidance 10
    "small": dict(preset="small", settings=SamplerSettings(256, 256, 8, 10, 3, 4, 4.0, 0.4, 10.0), batch=1),
    # the GPU workload: released shapes with random weights, 16 frames x 2 clips, 50 steps
    "sd21-base": dict(preset="sd21-base", settings=SamplerSettings(256, 256, 16, 50, 2, 4, 4.0, 0.4, 10.0), batch=1),
    # a seconds-long smoke run (tests, CI)
    "tiny": dict(preset="tiny", settings=SamplerSettings(64, 64, 4, 3, 2, 2, 4.0, 0.4, 10.0), batch=1),
}


class Timed(Backend):
    """Wraps a backend: accumulates seconds per call. On CUDA a pair of timing events on the stream the call is made
    on (the decode thread's stream for the VAE): no device-wide synchronisation, which could fall inside another
    thread's CUDA-graph capture and would serialise the decode with the denoising. Read `seconds` after a sync."""

    def __init__(self, backend: Backend, device):
        self.backend, self.dtype, self.device = backend, backend.dtype, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.reset()

    def check_shapes(self, *args, **kw) -> None:
        self.backend.check_shapes(*args, **kw)

    @property
    def feature_cache(self) -> bool:
        return self.backend.feature_cache

    def reset(self) -> None:
        self.host_seconds, self.calls, self.events = 0.0, 0, []

    @property
    def seconds(self) -> float:
        """Host seconds on the CPU; on CUDA the events' elapsed times (the caller has synchronised)."""
        return self.host_seconds + sum(a.elapsed_time(b) for a, b in self.events) / 1e3

    def __call__(self, *args):
        self.calls += 1
        if not self.cuda:
            t = time.perf_counter()
            self.backend(*args)
            self.host_seconds += time.perf_counter() - t
            return
        if torch.cuda.is_current_stream_capturing():  # events with timing cannot be recorded into a graph
            self.backend(*args)
            return
        stream = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        self.backend(*args)
        end.record(stream)
        self.events.append((start, end))


def unet_flops(model, settings: SamplerSettings, batch: int, device, *, cond_only: bool = False,
               mode: str = "full") -> int:
    """FLOPs of one UNet call, counted by torch.utils.flop_counter: guidance-doubled (or the conditional half alone
    with cond_only), the full UNet, or a feature-reuse call (mode "reuse", after an uncounted "store")."""
    from torch.utils.flop_counter import FlopCounterMode
    n = batch * (2 if settings.cfg and not cond_only else 1)
    shape = (n, model.config.unet.in_channels, settings.frames, settings.height // LATENT_FACTOR,
             settings.width // LATENT_FACTOR)
    x = torch.zeros(shape, dtype=model.dtype, device=device)  # (N,C,F,h,w)
    ctx = torch.zeros(n, 77, model.config.text.hidden_size, dtype=model.dtype, device=device)  # (N,77,D)
    t = torch.full((n,), 981.0, device=device)
    cache = None
    with torch.no_grad():
        if mode == "reuse":
            cache = FeatureCache("store", settings.cache_depth)
            model.unet(x, t, ctx, cache=cache)
            cache.mode = "reuse"
        with FlopCounterMode(display=False) as fc:
            model.unet(x, t, ctx) if cache is None else model.unet(x, t, ctx, cache=cache)
    return fc.get_total_flops()


def unet_calls(settings: SamplerSettings) -> Counter:
    """UNet calls of one generation by (unet mode, conditional-only) from the settings' reuse plan."""
    per_clip = Counter((p.unet, settings.cfg and p.guidance == "cond_reuse") for p in settings.plan())
    return Counter({k: v * settings.clips for k, v in per_clip.items()})


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(workload: str = "small", options: RuntimeOptions = RuntimeOptions(), *, repeats: int = 3,
        weights_seed: int = 0, with_reference: bool = True, log=print, quality: str | None = None,
        explicit=()) -> dict:
    """Benchmark the runtime of `options` against the float32 reference sampler on `workload`; returns the summary
    row (its "config" is `options`). quality: a preset (runtime/quality.py) for the runtime, applied to the workload's
    settings and `options` with the names in `explicit` ("dtype") kept; its line goes to stderr."""
    from vidrd.ref.weights import random_model

    from vidrd.runtime.quality import resolve
    from vidrd.runtime.video_io import VideoWriter

    can_write = importlib.util.find_spec("av") is not None
    if not can_write:
        log("[bench] PyAV is not installed: writing the .mp4 is not timed (write_s is NaN)")
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose one of {sorted(WORKLOADS)}")
    wl = WORKLOADS[workload]
    base: SamplerSettings = wl["settings"]  # the reference sampler's: exact, float32
    s, q = base, None
    if quality is None:
        options = options.resolved()
    else:
        q = resolve(quality, base, options, explicit)
        s, options = q.settings, q.options
        print(f"[bench] {q.line()}", file=sys.stderr)
    dev, dtype = torch.device(options.device), options.torch_dtype
    prompts, negatives = ("a boat sailing on a lake",) * wl["batch"], ("watermark",) * wl["batch"]
    request = Request(prompts, negatives, s, seed=42, float_video=True)
    ref_model = random_model(wl["preset"], weights_seed, device=dev)
    model = ref_model if dtype == torch.float32 else random_model(wl["preset"], weights_seed, dtype=dtype, device=dev)
    rt = open_runtime(model, options, Limits.of(s, wl["batch"]))
    timers = {k: Timed(getattr(rt, k), dev) for k in ("text", "unet", "vae")}
    rt.text, rt.unet, rt.vae = timers["text"], timers["unet"], timers["vae"]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def runtime_once():
        for t in timers.values():
            t.reset()
        sync()
        t0 = time.perf_counter()
        clips = list(rt.generate(request))
        sync()
        wall = time.perf_counter() - t0
        write = math.nan  # not measured without PyAV (GPU images often lack it)
        if can_write:
            with tempfile.TemporaryDirectory() as tmp:
                t1 = time.perf_counter()
                with VideoWriter(os.path.join(tmp, "bench.mp4"), fps=8) as w:
                    for c in clips:
                        w.write(c.frames[0])
                write = time.perf_counter() - t1
        stages = {k: t.seconds for k, t in timers.items()}
        return clips, wall, stages, write

    def reference_once():
        sync()
        t0 = time.perf_counter()
        out = generate(ref_model, list(prompts), list(negatives), base, torch.Generator().manual_seed(42))
        sync()
        return out, time.perf_counter() - t0

    log(f"[bench] warm-up ({workload}, {options.backend} {options.dtype}"
        f"{', compile ' + options.compile if options.compile else ''}, {dev})")
    runtime_once()
    ref_out = reference_once()[0] if with_reference else None
    walls, refs, rows = [], [], []
    frames_out = s.output_frames() * wl["batch"]
    for r in range(repeats):
        clips, wall, stages, write = runtime_once()
        walls.append(wall)
        row = {"run": r, "wall_s": wall, "write_s": write, "text_s": stages["text"], "vae_s": stages["vae"],
               "unet_s": stages["unet"], "unet_calls": timers["unet"].calls,
               "loop_other_s": wall - sum(stages.values()), "s_per_frame": wall / frames_out}
        if with_reference:
            ref_out, ref_wall = reference_once()
            refs.append(ref_wall)
            row["reference_s_per_frame"] = ref_wall / frames_out
        rows.append(row)
        log(strict_json({"kind": "run", **row}))
    summary = _summary(workload, wl, options, dev, model, s, rows, walls, refs, frames_out)
    summary["quality"] = None if q is None else q.summary()
    if q is not None:
        summary["baseline_settings"] = asdict(base)
    if with_reference:
        summary.update(_accuracy(clips, ref_out))
    summary["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    if dev.type == "cuda":
        summary["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    rt.close()
    log(strict_json({"kind": "summary", **summary}))
    return summary


def _summary(workload, wl, options, dev, model, s, rows, walls, refs, frames_out) -> dict:
    med = {k: statistics.median(r[k] for r in rows) for k in ("wall_s", "text_s", "unet_s", "vae_s", "loop_other_s",
                                                               "write_s")}
    calls = rows[0]["unet_calls"]
    flops = unet_flops(model, s, wl["batch"], dev)
    planned = unet_calls(s)
    assert sum(planned.values()) == calls, f"the runtime made {calls} UNet calls, its plan {dict(planned)}"

    def kind_flops(mode: str, cond: bool) -> int:  # a store call is a full call
        if mode != "reuse" and not cond:
            return flops
        return unet_flops(model, s, wl["batch"], dev, cond_only=cond, mode=mode)

    run_flops = sum(n * kind_flops(mode, cond) for (mode, cond), n in planned.items())
    per_call = med["unet_s"] / calls
    out = {"workload": workload, "preset": wl["preset"], "settings": asdict(s), "batch": wl["batch"],
           "config": asdict(options), "device": _device_name(dev), "threads": torch.get_num_threads(),
           **({"cpu": _cpu()} if dev.type == "cpu" else {}),
           "versions": {"torch": torch.__version__, "python": platform.python_version()},
           "repeats": len(rows), "frames_out": frames_out, "median": med,
           "unet_per_call_s": per_call, "vae_per_clip_s": med["vae_s"] / s.clips,
           "s_per_frame": med["wall_s"] / frames_out, "loop_other_fraction": med["loop_other_s"] / med["wall_s"],
           "unet_gflop_per_call": flops / 1e9, "unet_gflop_per_run": run_flops / 1e9,
           "unet_gflops": run_flops / med["unet_s"] / 1e9,
           "unet_calls_by_mode": {m: sum(n for (mode, _), n in planned.items() if mode == m)
                                  for m in ("full", "store", "reuse")},
           "unet_cond_only_calls": sum(n for (_, cond), n in planned.items() if cond)}
    if refs:
        ref = statistics.median(refs)
        out.update(reference_s_per_frame=ref / frames_out, speedup=ref / med["wall_s"])
    return out


def _accuracy(clips, ref) -> dict:
    """PSNR and SSIM of the video and relative error of the final latents against the float32 reference.

    The runtime's clips are on the host; the reference's tensors are where it ran (CUDA on a GPU): both sides are
    compared on the host in float32."""
    video = torch.cat([c.video for c in clips], dim=2).to("cpu", torch.float32)
    latents = torch.stack([c.latents for c in clips]).to("cpu", torch.float32)
    ref_video, ref_latents = (t.to("cpu", torch.float32) for t in ref)
    return {"psnr_db": psnr(video, ref_video), "ssim": ssim(video, ref_video),
            "latents_rel_err": ((latents - ref_latents).norm() / ref_latents.norm()).item(),
            "latents_max_abs_rel": ((latents - ref_latents).abs().max() / ref_latents.abs().max()).item()}


def _cpu() -> dict:
    """What a CPU row depends on: the vector flags, ATen's dispatch level, oneDNN's ISA cap and the bf16 verdict."""
    from vidrd.runtime.precision import cpu_bf16, probe_cpu

    p = probe_cpu()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")
    return {"flags": None if p.flags is None else [f for f in wanted if f in p.flags], "capability": p.capability,
            "onednn_max_cpu_isa": p.onednn_isa, "bf16": cpu_bf16(p)[1]}


def _device_name(dev) -> str:
    from vidrd.runtime.precision import cpu_name
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{cpu_name()} ({os.cpu_count()} cores)"
