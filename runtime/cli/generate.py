"""`vidrd generate`: a long video from a prompt, written as .mp4, .gif or PNG frames."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from vidrd.ref.sampler import check_prompt, check_seed, check_text, shorten

from vidrd.runtime import shapes
from vidrd.runtime.cli.model_args import add_model_args, check_model_args, is_default_model
from vidrd.runtime.cli.args import (add_quality_arg, add_runtime_args, add_sampler_args, apply_args, runtime_options,
                                   sampler_settings)
from vidrd.runtime.options import OFFICIAL_NEGATIVE


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate a video from a prompt (reuse and diffuse for long videos)",
                       description="Generate a video. With no weights given, the embedded vidrd-shapes model is "
                       "used (trained here on videos of one coloured shape moving on a plain background; prompts "
                       f"like {shapes.DEMO_PROMPT!r}), at settings that suit it: "
                       + ", ".join(f"--{k} {v}" for k, v in shapes.SETTINGS.items()) + ".")
    p.add_argument("prompt", nargs="?", help="the text prompt")
    p.add_argument("--prompt", dest="prompts", action="append", default=[], metavar="TEXT",
                   help="a prompt; repeat for a batch (one output file each)")
    p.add_argument("--then", action="append", default=[], metavar="PROMPT",
                   help="the prompt of the next clip: clip k+1 follows the k-th --then, the last one holds for any "
                   "clips after it; --clips defaults to 1 + the number of --then (one prompt, not a batch)")
    p.add_argument("-o", "--out", required=True, help="output: NAME.mp4 (H.264), NAME.gif, or a folder for PNGs")
    p.add_argument("--negative-prompt", default=None,
                   help=f"negative prompt for every video (default {OFFICIAL_NEGATIVE!r}, as the official evaluator; "
                   f"{shapes.NEGATIVE!r} for the embedded model)")
    s = p.add_argument_group("sampler (official defaults)")
    add_sampler_args(s, alternative=shapes.SETTINGS)
    add_quality_arg(s)
    s.add_argument("--seed", type=int, default=42, help="seed of the noise (default 42)")
    o = p.add_argument_group("output and execution")
    o.add_argument("--fps", type=float, default=8.0, help="frames per second (0.1 to 120; gif: at most 100)")
    o.add_argument("--force", action="store_true", help="overwrite existing outputs")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_args(o, reference=True)
    v = p.add_argument_group("previews and drafts (a tiny decoder distilled from the model's VAE)")
    v.add_argument("--preview-dir", metavar="DIR", help="write preview frames of the predicted clean video there "
                   "as they come (clipC_stepS_vV_fFF.png)")
    v.add_argument("--preview-every", type=int, default=5, metavar="K", help="a preview every K steps (default 5)")
    v.add_argument("--decoder", choices=("vae", "tiny"), default="vae",
                   help="decode the final video with the VAE (default) or the tiny decoder (a fast draft)")
    v.add_argument("--tiny-decoder", metavar="FILE", help="the tiny decoder's .safetensors (default: the one that "
                   "ships with the embedded model; others come from `vidrd train-decoder`, or the public TAESD "
                   "decoder weights for SD latents, taesd_decoder.safetensors)")
    add_model_args(p)
    p.set_defaults(func=run)


def outputs(out: str, n: int) -> list[Path]:
    """One path per video: OUT itself for one prompt, OUT-0, OUT-1, ... for a batch."""
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def settings(args):
    """The sampler settings of the flags, validated (ValueError names the flag's value); flags left out take the
    official defaults, or the embedded model's (shapes.SETTINGS) when no model flag is given."""
    return sampler_settings(args, base=shapes.SETTINGS if is_default_model(args) else None)


def negative_prompt(args) -> str:
    if args.negative_prompt is not None:
        return args.negative_prompt
    return shapes.NEGATIVE if is_default_model(args) else OFFICIAL_NEGATIVE


def run(args) -> int:
    from vidrd.runtime.video_io import VideoWriter, check_output

    prompts = ([args.prompt] if args.prompt is not None else []) + args.prompts
    if not prompts:
        raise ValueError(f"give a prompt: vidrd generate \"{shapes.DEMO_PROMPT}\" -o shapes.mp4")
    for i, text in enumerate(prompts):
        check_prompt("prompt" if len(prompts) == 1 else f"prompt {i}", text)
    if args.then and len(prompts) != 1:
        raise ValueError(f"--then needs a single prompt, not a batch of {len(prompts)}: the clips of one video follow "
                         "the prompt and then each --then")
    for i, text in enumerate(args.then):
        check_prompt(f"--then {i + 1}", text)
    check_seed(args.seed, "--seed")
    negative = negative_prompt(args)
    check_text("--negative-prompt", negative)
    if args.then and args.clips is None:
        args.clips = 1 + len(args.then)
    s = settings(args)
    if 1 + len(args.then) > s.clips:
        raise ValueError(f"--clips {s.clips} is fewer than the {1 + len(args.then)} prompts (the prompt and "
                         f"{len(args.then)} --then); give --clips {1 + len(args.then)} or more, or leave it out")
    check_model_args(args)
    options = runtime_options(args)
    paths = outputs(args.out, len(prompts))
    for path in paths:  # everything the writers will need, before the model loads
        check_output(path, args.force, height=s.height, width=s.width, fps=args.fps)
    s, options, _ = apply_args(args, s, options)  # --quality; options resolved (device, dtype checked)
    tiny = tiny_decoder(args) if args.preview_dir or args.decoder == "tiny" else None

    from vidrd.runtime.cli.model_args import load_model
    t0 = time.perf_counter()
    model, what, random = load_model(args, dtype=options.torch_dtype, device=options.device)
    print(f"model: {what} on {options.device} ({options.dtype}), loaded in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    if random:
        print("note: random weights: the video shows what the pipeline does, not what a trained model makes. Use "
              "--weights DIR or --sd/--ckpt/--vae for real weights, or no model flag for the embedded model.",
              file=sys.stderr)
    if is_default_model(args):
        from vidrd.runtime.shapes.data import TEMPLATE, out_of_vocabulary
        for text in prompts + args.then:
            unknown = out_of_vocabulary(text)
            if unknown:
                print(f"warning: {shapes.NAME} does not know the words {shorten(', '.join(unknown))} in "
                      f"{shorten(repr(text))}; it was "
                      f"trained on captions like {TEMPLATE!r}", file=sys.stderr)

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
        on_step = (lambda c, i: bar.update(1)) if bar else None
        from vidrd.runtime.loop import Limits, Request
        from vidrd.runtime.options import open_runtime
        distinct = len(set(prompts + args.then))  # the prompt and --then: a text context each
        rt = open_runtime(model, options, Limits.of(s, len(prompts), distinct))  # the reference sampler too
        try:
            on_preview = attach_tiny(args, rt, tiny, model)
            request = Request(tuple(prompts), tuple(negatives), s, args.seed, clip_prompts=tuple(args.then) or None)
            for clip in rt.generate(request, on_step=on_step, **({"on_preview": on_preview} if on_preview else {})):
                for w, frames in zip(writers, clip.frames):  # stream each clip as soon as it is decoded
                    w.write(frames)
        finally:
            rt.close()
            if getattr(rt, "previews", None) is not None:
                rt.previews.close()
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


def tiny_decoder(args):
    """The tiny decoder of --tiny-decoder, or the embedded model's; ValueError before the model loads."""
    from vidrd.runtime import preview
    if args.preview_dir and args.preview_every < 1:
        raise ValueError(f"--preview-every={args.preview_every} must be >= 1")
    if args.tiny_decoder:
        return preview.load(args.tiny_decoder)
    if not is_default_model(args):
        raise ValueError("--preview-dir and --decoder tiny need --tiny-decoder FILE for this model (make one with "
                         "`vidrd train-decoder`); only the embedded model ships one")
    return preview.load(shapes.MODEL_DIR / "tiny_decoder.safetensors")


def attach_tiny(args, rt, tiny, model):
    """Set up the runtime for --decoder tiny and --preview-dir; the on_preview callback (None without previews)."""
    from vidrd.runtime import preview
    from vidrd.runtime.loop import Runtime
    if tiny is None:
        return None
    if not isinstance(rt, Runtime):
        raise ValueError("--preview-dir and --decoder tiny need the lean runtime, not --backend reference")
    if tiny.latent_channels != model.config.vae.latent_channels:
        raise ValueError(f"the tiny decoder takes {tiny.latent_channels} latent channels, the model's VAE "
                         f"{model.config.vae.latent_channels}: train one for this model with `vidrd train-decoder`")
    if isinstance(tiny, preview.TAESDDecoder):  # the public TAESD weights: this model's latent scale
        tiny.scaling_factor = model.config.vae.scaling_factor
    if args.decoder == "tiny":
        rt.vae = preview.TinyVAE(tiny, rt.vae.dtype, rt.device)
    if not args.preview_dir:
        return None
    from vidrd.runtime.video_io import _write_png
    folder = Path(args.preview_dir)
    folder.mkdir(parents=True, exist_ok=True)
    rt.previews = preview.Previews(tiny, rt.limits, model.config.vae.scaling_factor, args.preview_every,
                                   device=rt.device)

    def on_preview(clip, step, frames):  # (B,F,H,W,3) uint8, on the preview thread
        for v, video in enumerate(frames):
            for f, rgb in enumerate(video):
                _write_png(folder / f"clip{clip}_step{step:03d}_v{v}_f{f:02d}.png", rgb)
    return on_preview
