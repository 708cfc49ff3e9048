"""`vidrd export`: write the components of a model into a folder as ONNX files or AOTInductor packages, and/or
check an existing export."""
from __future__ import annotations

from pathlib import Path

from vidrd.export.spec import COMPONENTS, PRECISIONS

FORMATS = ("onnx", "aoti")

from vidrd.runtime.cli.model_args import add_model_args, load_model


def register(sub) -> None:
    p = sub.add_parser("export", help="export text encoder, UNet and VAE decoders to ONNX (TensorRT-ready) or "
                       "AOTInductor packages", description="Export each component to ONNX (or, with --format aoti, "
                       "an AOTInductor package) with its spec in manifest.json. Without model flags, a folder that "
                       "holds an export is re-checked against the model it came from.")
    add_model_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; other files are kept)")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (default: for onnxruntime and TensorRT) "
                   "or aoti (AOTInductor packages for --backend aoti; compiling takes minutes)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), help="weights and float I/O dtype (default: the "
                   "folder's previous export, else fp32; bf16 for --format aoti only)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="--format aoti: the device the packages run on "
                   "(default: cuda when available)")
    p.add_argument("--components", default=",".join(COMPONENTS), metavar="LIST",
                   help=f"comma-separated subset of {','.join(COMPONENTS)}")
    p.add_argument("--check", action="store_true", help="after exporting (or finding it up to date), run the "
                   "checker, the TensorRT op check and ONNX Runtime against PyTorch (aoti: the packages against "
                   "PyTorch)")
    p.add_argument("--check-only", action="store_true", help="check the folder as it is, without exporting")
    p.add_argument("--force", action="store_true", help="redo an up-to-date export; replace files not from vidrd")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime (default: library's)")
    p.set_defaults(func=run)


def _source(args) -> dict:
    """How to load the model again (recorded in the manifest, used by a later --check without model flags)."""
    if args.weights:
        return {"kind": "weights", "weights": str(Path(args.weights).resolve())}
    if args.sd:
        return {"kind": "checkpoint", "sd": str(Path(args.sd).resolve()), "ckpt": str(Path(args.ckpt).resolve()),
                "vae": str(Path(args.vae).resolve()) if args.vae else None}
    from vidrd.ref.weights import DEFAULT_PRESET
    return {"kind": "preset", "preset": args.preset or DEFAULT_PRESET, "seed": args.weights_seed}


def _from_source(args, source: dict) -> None:
    """Fill the model flags of `args` from a manifest's source record."""
    kind = source.get("kind")
    if kind == "weights":
        args.weights = source["weights"]
    elif kind == "checkpoint":
        args.sd, args.ckpt, args.vae = source["sd"], source["ckpt"], source.get("vae")
    elif kind == "preset":
        args.preset, args.weights_seed = source["preset"], source["seed"]
    else:
        raise ValueError(f"the manifest in {args.out} does not say which model it came from; pass model flags")


def run(args) -> int:
    import torch

    from vidrd.export import aoti_export, onnx_export

    aoti = args.format == "aoti"
    exporter = aoti_export if aoti else onnx_export
    if args.device and not aoti:
        raise ValueError("--device applies to --format aoti (ONNX files are exported on the CPU for any device)")

    comps = tuple(c for c in args.components.split(",") if c)
    unknown = [c for c in comps if c not in COMPONENTS]
    if unknown or not comps:
        raise ValueError(f"--components: unknown {unknown or 'empty list'}; choose from {','.join(COMPONENTS)}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        previous = exporter.read_manifest(out) if out.is_dir() else None
    except ValueError:
        if not args.force:
            raise
        previous = None
    if not (args.weights or args.sd or args.ckpt or args.preset) and previous is not None:
        _from_source(args, previous.get("source", {}))
        print(f"model: from the manifest in {out} ({previous['source']})")
    precision = args.precision or (previous or {}).get("precision", "fp32")
    device = args.device or (previous or {}).get("device") or ("cuda" if aoti and torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here (AOTInductor packages for a GPU are compiled on "
                         "one)")
    if args.check_only and previous is None:
        raise FileNotFoundError(f"no export in {out} to check (make one with `vidrd export --out {out}`)")

    model, desc, _ = load_model(args, device=device)  # float32: the exporter casts a copy for fp16/bf16
    print(f"model: {desc}")
    if not args.check_only:
        exporter.export(model, out, precision=precision, source=_source(args), components=comps, force=args.force)
    if args.check or args.check_only:
        if aoti:
            aoti_export.check(out, model, components=comps)
        else:
            from vidrd.export.check import check_export
            check_export(out, model, components=comps, threads=args.threads)
        print(f"check passed: {out}")
    return 0

