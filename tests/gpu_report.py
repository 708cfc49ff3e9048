"""The GPU check's report: one Markdown table of every section (`markdown`) and the one-line gist of each
(`gist`), for BENCHMARKS.md and the console."""
from __future__ import annotations

import statistics


def markdown(report: dict) -> str:
    """The report as Markdown: one row per section, then the benchmark rows (for BENCHMARKS.md)."""
    m = report["machine"]
    lines = [f"GPU check on {m['gpu']} (sm {m['capability']}, {m['gpu_memory_gb']} GB), torch {m['torch']} "
             f"(CUDA {m['cuda']}), triton {m['triton']}, onnxruntime {m['onnxruntime']}, tensorrt {m['tensorrt']}; "
             f"{report['total_s']:.0f} s in all.", "", "| section | status | seconds | result |", "|---|---|---|---|"]
    for name, r in report["sections"].items():
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {gist(name, r)} |")
    bench = [(name, row) for name, r in report["sections"].items() for row in r.get("rows", [])]
    if bench:
        lines += ["", "| section | workload | config | s/frame | reference s/frame | speed-up | PSNR dB | latents rel "
                  "err | peak CUDA MB |", "|---|---|---|---|---|---|---|---|---|"]
        for name, row in bench:
            cfg = " ".join(f"{k}={v}" for k, v in row["config"].items())
            if "s_per_frame" not in row:
                lines.append(f"| {name} | | {cfg} | {row.get('error') or row.get('non_finite')} | | | | | |")
                continue
            lines.append(f"| {name} | {row['workload']} | {cfg} | {_f(row['s_per_frame'])} | "
                         f"{_f(row['reference_s_per_frame'])} | {_f(row['speedup'])} | {_f(row['psnr_db'])} | "
                         f"{_f(row['latents_rel_err'])} | {_f(row['peak_cuda_mb'])} |")
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def gist(name: str, r: dict) -> str:
    """One cell saying what a section found."""
    if r["status"] in ("skipped", "timeout") or "error" in r and "rows" not in r:
        return (r.get("reason") or r.get("error") or "").replace("|", "/").replace("\n", " ")[:300]
    if name == "parity":
        worst = max(r["max_rel_err"].items(), key=lambda kv: kv[1])
        tol = r["tolerance"]
        return (f"{len(r['max_rel_err'])} tensors, worst {worst[0]} {worst[1]:.2e} (tol {tol['networks']}/"
                f"{tol['pipelines']})")
    if name == "gpu_tests":
        return f"{r['summary']}; skipped: {'; '.join(r['skipped'])[:200] or 'none'}"
    if name == "kernels":
        sp = [t["speedup"] for t in r["timings"]]
        return (f"{r['checked_shapes']} shapes, {len(r['mismatches'])} mismatches, max err {r['max_abs_err']}; "
                f"speed-up vs SDPA median {statistics.median(sp):.2f}" if sp else "no timings")
    if name == "triton_unet":
        return "; ".join(f"{k}: rel err {v['rel_l2_err']:.1e}, {v['triton_ms']:.1f} vs {v['sdpa_ms']:.1f} ms"
                         for k, v in r["unet"].items())
    if name == "sd21_base":
        return f"best: {r['best']}"
    if name in ("onnxruntime", "tensorrt"):
        return ", ".join(f"{k} {_f(v)}" for k, v in r.items() if k.startswith("psnr"))
    if name == "aoti":
        u = r["sd21_unet"]
        return (f"tiny PSNR {_f(r['tiny_psnr_db_vs_torch'])} dB; sd21 UNet {_f(u['aoti_bf16_ms'])} vs eager "
                f"{_f(u['eager_bf16_ms'])} ms (compile {_f(r['sd21_unet_compile_s'])} s)")
    if name == "fp8":
        return (f"UNet {_f(r['fp8_row']['ms'])} vs bf16 {_f(r['bf16']['ms'])} ms (row scales), video PSNR "
                f"{_f(r['video_psnr_db_vs_bf16'])} dB")
    if name == "batch":
        from vidrd.runtime.bench.batched import gist as batch_gist
        return batch_gist(r)
    return f"{len(r.get('rows', []))} runs (table below)"
