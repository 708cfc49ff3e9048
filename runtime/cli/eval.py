"""`vidrd eval`: the fixed prompt set x seeds through a backend and sampler settings, scored by the shapes harness
(vidrd.runtime.shapes.evaluate); prints the JSON report or writes it to --out."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from vidrd.ref.outputs import check_target
from vidrd.ref.sampler import check_seed
from vidrd.runtime.cli.model_args import add_model_args, check_model_args
from vidrd.runtime.cli.args import (add_quality_arg, add_runtime_args, add_sampler_args, apply_args, runtime_options,
                                   sampler_settings)
from vidrd.runtime.shapes.evaluate import EVAL_SETTINGS, NEGATIVE, evaluate, prompt_set, story_set, write_atomic


def register(sub) -> None:
    p = sub.add_parser("eval", help="score a model on shapes captions (colour, shape, direction, motion) as JSON",
                       description="Generate a fixed set of shapes captions (trained and held-out) x seeds with "
                       "any backend and sampler settings, and score every video with the quality harness: colour, "
                       "shape, background and direction accuracy, direction consistency across clips, motion "
                       "smoothness and continuity at clip boundaries. Prints the JSON report or writes it to --out.")
    p.add_argument("--samples", type=int, default=16, help="prompt x seed samples in all: a multiple of the "
                   "number of seeds, each seed running samples/seeds prompts of the fixed set (default 16)")
    p.add_argument("--seeds", default="0", help="comma-separated generation seeds (default 0)")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the fixed prompt set (default 0)")
    p.add_argument("--stories", action="store_true", help="stories instead of single captions: a caption per clip, "
                   "the direction turning at every clip (right, then down, ...), each clip scored against its own "
                   "(one prompt a request: --batch 1)")
    p.add_argument("--batch", type=int, default=1, help="prompts per request (the noise depends on it)")
    p.add_argument("--negative-prompt", default=NEGATIVE)
    s = p.add_argument_group("sampler (the issue's evaluation setting: 64x64, 8 frames, 3 clips, official defaults)")
    add_sampler_args(s, EVAL_SETTINGS)
    add_quality_arg(s)
    o = p.add_argument_group("execution and output")
    add_runtime_args(o, reference=True)
    o.add_argument("--out", metavar="FILE", help="write the JSON report here (atomically) instead of stdout")
    o.add_argument("--force", action="store_true", help="overwrite --out")
    o.add_argument("--no-progress", action="store_true")
    add_model_args(p)
    p.set_defaults(func=run)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2") from None
    for seed in seeds:
        check_seed(seed, "--seeds")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} repeats a seed")
    return seeds


def run(args) -> int:
    from vidrd.runtime.cli.model_args import load_model

    seeds = parse_seeds(args.seeds)
    if args.samples < 1 or args.samples % len(seeds):
        raise ValueError(f"--samples {args.samples} must be a positive multiple of the {len(seeds)} seed(s)")
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch} must be >= 1")
    s = sampler_settings(args, EVAL_SETTINGS)
    if args.stories and (args.batch != 1 or s.clips < 2):
        raise ValueError(f"--stories needs --batch 1 (got {args.batch}; a prompt per clip is a one-prompt request) "
                         f"and --clips >= 2 (got {s.clips})")
    check_model_args(args)
    options = runtime_options(args)
    out = Path(args.out) if args.out else None
    if out is not None:  # before any work: a report that cannot be written is an error now, not after the run
        check_target(out, args.force, "file")
    s, options, quality = apply_args(args, s, options)  # --quality; options resolved (device, dtype checked)
    model, what, _ = load_model(args, dtype=options.torch_dtype, device=options.device)
    print(f"model: {what} on {options.device} ({options.dtype})", file=sys.stderr)
    n = args.samples // len(seeds)
    prompts = story_set(n, s.clips, args.prompt_seed) if args.stories else prompt_set(n, args.prompt_seed)
    report = evaluate(model, s, prompts, seeds, options,
                      batch=args.batch, negative_prompt=args.negative_prompt, progress=not args.no_progress)
    report["config"].update(model=what, prompt_seed=args.prompt_seed,
                            quality=None if quality is None else quality.summary())
    text = json.dumps(report, indent=1, allow_nan=False)
    if out is None:
        print(text)
    else:
        write_atomic(out, text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    for group, m in report["summary"].items():
        if m["n"]:
            print(f"{group}: n={m['n']} " + " ".join(f"{k}={_fmt(m[k])}" for k in (
                "color_acc", "shape_acc", "direction_acc", "direction_consistency", "boundary_ratio")), file=sys.stderr)
            print(f"{group} per clip: " + " ".join(f"{k}=[{', '.join(_fmt(v) for v in m[k])}]" for k in (
                "clip_direction_acc", "clip_color_acc", "clip_shape_acc", "clip_found_rate")), file=sys.stderr)
    return 0


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"
