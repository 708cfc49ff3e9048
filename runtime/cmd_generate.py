"""`vidrd generate`: a long video from a prompt, written as .mp4, .gif or PNG frames."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from vidrd.ref.sampler import ASSEMBLIES, CONTINUATIONS, SOLVERS, SamplerSettings, check_text

from . import shapes
from .model_args import add_model_args, check_model_args, is_default_model

DEFAULTS = SamplerSettings()
OFFICIAL_NEGATIVE = "watermark"  # the official evaluator hard-codes this negative prompt (SPEC §4.14)
BACKENDS = ("torch", "onnxruntime", "tensorrt", "reference")


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate a video from a prompt (reuse and diffuse for long videos)",
                       description="Generate a video. With no weights given, the embedded vidrd-shapes model is "
                       "used (trained here on videos of one coloured shape moving on a plain background; prompts "
                       f"like {shapes.DEMO_PROMPT!r}), at settings that suit it: "
                       + ", ".join(f"--{k} {v}" for k, v in shapes.SETTINGS.items()) + ".")
    p.add_argument("prompt", nargs="?", help="the text prompt")
    p.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT",
                   help="a prompt; repeat for a batch (one output file each)")
    p.add_argument("-o", "--out", required=True, help="output: NAME.mp4 (H.264), NAME.gif, or a folder for PNGs")
    p.add_argument("--negative-prompt", default=None,
                   help=f"negative prompt for every video (default {OFFICIAL_NEGATIVE!r}, as the official evaluator; "
                   f"{shapes.NEGATIVE!r} for the embedded model)")
    s = p.add_argument_group("sampler (official defaults)")
    embedded = shapes.SETTINGS
    s.add_argument("--height", type=int, help=f"default {DEFAULTS.height} ({embedded['height']} for the embedded model)")
    s.add_argument("--width", type=int, help=f"default {DEFAULTS.width} ({embedded['width']} for the embedded model)")
    s.add_argument("--frames", type=int, help=f"frames per clip (default {DEFAULTS.frames})")
    s.add_argument("--steps", type=int, help=f"denoising steps per clip (default {DEFAULTS.steps}; "
                   f"{embedded['steps']} for the embedded model)")
    s.add_argument("--clips", type=int, help=f"clips in total, 1 = no extension (default {DEFAULTS.clips}; "
                   f"{embedded['clips']} for the embedded model)")
    s.add_argument("--overlap", type=int, default=DEFAULTS.overlap, help="frames shared with the previous clip")
    s.add_argument("--noise-recycle", type=float, default=DEFAULTS.noise_recycle,
                   help="weight of the previous clip's reversed noise in a new clip's noise")
    s.add_argument("--denoise-guidance", type=float, default=DEFAULTS.denoise_guidance,
                   help="fraction of steps during which overlap frames are pinned (staged guidance)")
    s.add_argument("--guidance-scale", type=float, default=DEFAULTS.guidance_scale)
    s.add_argument("--noise-prior", type=float, default=DEFAULTS.noise_prior,
                   help="progressive noise prior (frame correlation); unit variance per frame")
    s.add_argument("--temporal-decode", action="store_true",
                   help="decode with the temporal VAE layers (paper) instead of per frame (official code)")
    s.add_argument("--assembly", choices=ASSEMBLIES, default=DEFAULTS.assembly,
                   help="official: every clip whole; trim: later clips without their overlap frames")
    s.add_argument("--continuation", choices=CONTINUATIONS, default=DEFAULTS.continuation,
                   help="official: a new clip replays the previous clip's end backwards (the paper's reversed "
                   "noise and overlap); forward: it continues in the same frame order (use with --assembly trim)")
    s.add_argument("--solver", choices=SOLVERS, default=DEFAULTS.solver,
                   help="ddim (official) or dpmpp-2m (DPM-Solver++(2M): similar quality in fewer --steps)")
    s.add_argument("--seed", type=int, default=42)
    o = p.add_argument_group("output and execution")
    o.add_argument("--fps", type=float, default=8.0, help="frames per second (0.1 to 120; gif: at most 100)")
    o.add_argument("--force", action="store_true", help="overwrite existing outputs")
    o.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch (default), onnxruntime (--onnx), tensorrt (--engines) run the lean runtime; "
                   "reference runs the readable reference sampler")
    o.add_argument("--unet-backend", choices=BACKENDS[:3], help="another backend for the UNet only")
    o.add_argument("--vae-backend", choices=BACKENDS[:3], help="another backend for the VAE decoder only")
    o.add_argument("--onnx", metavar="DIR", help="exported ONNX files (`vidrd export`), for onnxruntime")
    o.add_argument("--engines", metavar="DIR", help="TensorRT engines (`vidrd build-engines`), for tensorrt")
    o.add_argument("--compile", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the UNet (torch backend); reduce-overhead uses CUDA graphs on a GPU")
    o.add_argument("--attention", choices=("sdpa", "math", "triton"), default="sdpa",
                   help="attention kernels of the torch backend's UNet (triton needs a GPU)")
    o.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    o.add_argument("--vae-dtype", choices=("fp32", "bf16", "fp16"),
                   help="the VAE decoder's dtype (default: --dtype; fp32 for --dtype fp16, the SD VAE overflows in fp16)")
    o.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    p.set_defaults(func=run)


def outputs(out: str, n: int) -> list[Path]:
    """One path per video: OUT itself for one prompt, OUT-0, OUT-1, ... for a batch."""
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def settings(args) -> SamplerSettings:
    """The sampler settings of the flags, validated (ValueError names the flag's value); flags left out take the
    official defaults, or the embedded model's (shapes.SETTINGS) when no model flag is given."""
    base = shapes.SETTINGS if is_default_model(args) else {}
    sized = {k: getattr(args, k) if getattr(args, k) is not None else base.get(k, getattr(DEFAULTS, k))
             for k in ("height", "width", "frames", "steps", "clips")}
    s = SamplerSettings(**sized, overlap=args.overlap, noise_recycle=args.noise_recycle,
                        denoise_guidance=args.denoise_guidance, guidance_scale=args.guidance_scale,
                        noise_prior=args.noise_prior, temporal_decode=args.temporal_decode, assembly=args.assembly,
                        continuation=args.continuation, solver=args.solver)
    s.validate()
    return s


def negative_prompt(args) -> str:
    if args.negative_prompt is not None:
        return args.negative_prompt
    return shapes.NEGATIVE if is_default_model(args) else OFFICIAL_NEGATIVE


def run(args) -> int:
    import torch

    from vidrd.ref.sampler import generate

    from .video_io import VideoWriter, check_output, to_uint8

    prompts = ([args.prompt] if args.prompt else []) + args.prompts
    if not prompts:
        raise ValueError(f"give a prompt: vidrd generate \"{shapes.DEMO_PROMPT}\" -o shapes.mp4")
    for i, text in enumerate(prompts):
        check_text("prompt" if len(prompts) == 1 else f"prompt {i}", text)
    negative = negative_prompt(args)
    check_text("--negative-prompt", negative)
    s = settings(args)
    check_model_args(args)
    kinds = {args.backend, args.unet_backend, args.vae_backend} - {None}
    if args.backend == "reference" and len(kinds) > 1:
        raise ValueError("--unet-backend/--vae-backend choose runtime backends; they do not apply to --backend reference")
    if "onnxruntime" in kinds and not args.onnx:
        raise ValueError("the onnxruntime backend needs --onnx DIR (make it with `vidrd export --out DIR`)")
    if "tensorrt" in kinds and not args.engines:
        raise ValueError("the tensorrt backend needs --engines DIR (make it with `vidrd build-engines`)")
    if args.compile and args.backend == "reference":
        raise ValueError("--compile applies to the torch backend, not --backend reference")
    paths = outputs(args.out, len(prompts))
    for path in paths:  # everything the writers will need, before the model loads
        check_output(path, args.force, height=s.height, width=s.width, fps=args.fps)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype, vae_dtype = dtypes[args.dtype], args.vae_dtype and dtypes[args.vae_dtype]
    if torch.float16 in (dtype, vae_dtype) and device == "cpu":
        raise ValueError("--dtype fp16 needs a GPU; use fp32 or bf16 on the CPU")

    from .model_args import load_model
    t0 = time.perf_counter()
    model, what, random = load_model(args, dtype=dtype, device=device)
    print(f"model: {what} on {device} ({args.dtype}), loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if random:
        print("note: random weights: the video shows what the pipeline does, not what a trained model makes. Use "
              "--weights DIR or --sd/--ckpt/--vae for real weights, or no model flag for the embedded model.",
              file=sys.stderr)
    if is_default_model(args):
        from .shapes.data import TEMPLATE, out_of_vocabulary
        for text in prompts:
            unknown = out_of_vocabulary(text)
            if unknown:
                print(f"warning: {shapes.NAME} does not know the words {', '.join(unknown)} in {text!r}; it was "
                      f"trained on captions like {TEMPLATE!r}", file=sys.stderr)
    s.validate(model)

    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=s.clips * s.steps, unit="step", desc="denoising", file=sys.stderr)
    t0 = time.perf_counter()
    negatives = [negative] * len(prompts)
    writers = []
    try:
        for path in paths:
            writers.append(VideoWriter(path, fps=args.fps, force=args.force))
        if args.backend == "reference":
            generator = torch.Generator().manual_seed(args.seed)
            video, _ = generate(model, prompts, negatives, height=s.height, width=s.width, frames=s.frames,
                                steps=s.steps, clips=s.clips, overlap=s.overlap, noise_recycle=s.noise_recycle,
                                denoise_guidance=s.denoise_guidance, guidance_scale=s.guidance_scale,
                                generator=generator, temporal_decode=s.temporal_decode, noise_prior=s.noise_prior,
                                assembly=s.assembly, continuation=s.continuation, solver=s.solver,
                                callback=(lambda c, i: bar.update(1)) if bar else None)
            for w, v in zip(writers, video):
                w.write(to_uint8(v))
        else:
            from .loop import Limits, Request, create
            limits = Limits(len(prompts), s.frames, s.height, s.width, s.steps, max(s.overlap, 1))
            rt = create(model, args.backend, unet=args.unet_backend, vae=args.vae_backend, limits=limits,
                        device=device, dtype=dtype, export_dir=args.onnx, engine_dir=args.engines,
                        compile=args.compile, attention=args.attention, vae_dtype=vae_dtype)
            try:
                request = Request(tuple(prompts), tuple(negatives), s, args.seed)
                for clip in rt.generate(request, on_step=(lambda c, i: bar.update(1)) if bar else None):
                    for w, frames in zip(writers, clip.frames):  # stream each clip as soon as it is decoded
                        w.write(frames)
            finally:
                rt.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        if bar:
            bar.close()
    try:
        for w in writers:
            w.close()  # publishes the file; on failure it drops its own temporary output
    except BaseException:
        for w in writers:
            w.abort()  # the ones not published yet
        raise
    for path, w in zip(paths, writers):
        print(f"wrote {path} ({w.frames_written} frames, {s.width}x{s.height}, {args.fps:g} fps)", file=sys.stderr)
    print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
