"""`vidrd build-engines`: one TensorRT engine per exported component, skipped when its sidecar says it is current."""
from __future__ import annotations

import sys

from vidrd.export.engines import PRECISIONS, Shapes, TensorRTUnavailable, parse_range


def register(sub) -> None:
    p = sub.add_parser("build-engines", help="build TensorRT engines from a `vidrd export` folder (NVIDIA GPU)",
                       description="Build one TensorRT engine (<component>.plan + a .plan.json sidecar) per exported "
                       "component, with an optimisation profile covering the batch, frames and sizes asked for. "
                       "Ranges are N, MIN:MAX (opt = MIN) or MIN:OPT:MAX. Up-to-date engines are skipped.")
    p.add_argument("--onnx", required=True, metavar="DIR", help="the export folder (`vidrd export --out DIR`)")
    p.add_argument("--out", required=True, metavar="DIR", help="engine folder (created; holds timing.cache too)")
    p.add_argument("--precision", required=True, choices=list(PRECISIONS),
                   help="fp16/bf16 from an fp32 export: builder flags and fp16/bf16 I/O; from an fp16 export: "
                   "strongly typed")
    p.add_argument("--batch", default="1:4", metavar="RANGE",
                   help="prompts per request B (default 1:4); the text encoder and UNet see 2B under guidance")
    p.add_argument("--frames", default="8", metavar="RANGE", help="frames per clip F (default 8: pinned)")
    p.add_argument("--size", default="256:512", metavar="RANGE",
                   help="height and width in pixels (default 256:512); latents are size/8")
    p.add_argument("--static", action="store_true",
                   help="min = opt = max at the opt shape: one shape per engine, replayed as a CUDA graph")
    p.add_argument("--no-guidance", action="store_true",
                   help="engines for guidance_scale <= 1 (text encoder and UNet see B, not 2B)")
    p.add_argument("--components", metavar="LIST", help="comma-separated subset of the exported components "
                   "(default: all of them)")
    p.add_argument("--force", action="store_true", help="rebuild engines that are up to date")
    p.set_defaults(func=run)


def run(args) -> int:
    from vidrd.export.engines import build_all

    shapes = Shapes(parse_range("--batch", args.batch), parse_range("--frames", args.frames),
                    parse_range("--size", args.size), args.static, not args.no_guidance)
    comps = [c for c in args.components.split(",") if c] if args.components is not None else None
    if comps == []:
        raise ValueError("--components: empty list")
    try:
        built = build_all(args.onnx, args.out, shapes, args.precision, comps, force=args.force)
    except TensorRTUnavailable as e:  # not a bad flag value, but the same plain one-line report
        print(f"vidrd build-engines: error: {e}", file=sys.stderr)
        return 2
    n = sum(not b.skipped for b in built)
    print(f"{n} engine(s) built, {len(built) - n} up to date, in {args.out}")
    return 0
