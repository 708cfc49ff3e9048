"""`vidrd init-random` and `vidrd convert`: model folders in the official layout."""
from __future__ import annotations

from vidrd.ref.config import PRESETS


def register(sub) -> None:
    p = sub.add_parser("init-random", help="write a seeded random-weight model in the official layout")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run_init)

    p = sub.add_parser("convert", help="rewrite released weights as safetensors (fast, pickle-free loading)")
    p.add_argument("--sd", required=True, metavar="DIR", help="SD2.1-base folder")
    p.add_argument("--ckpt", required=True, metavar="FILE", help="ModelT2V.pth")
    p.add_argument("--vae", metavar="DIR", help="vae_finetuned/ folder")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run_convert)


def run_init(args) -> int:
    from vidrd.ref.weights import init_random
    out = init_random(args.preset, args.out, args.seed, force=args.force)
    print(f"wrote preset {args.preset} (seed {args.seed}) to {out}: use it with --weights {out}")
    return 0


def run_convert(args) -> int:
    from vidrd.ref.weights import convert
    out = convert(args.sd, args.ckpt, args.vae, args.out, force=args.force)
    print(f"wrote {out}: use it with --weights {out}")
    return 0
