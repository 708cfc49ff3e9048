"""The model-choosing flags shared by `generate`, `export` and `bench`, and the one function that honours them."""
from __future__ import annotations

import argparse

import torch

from vidrd.ref.config import PRESETS
from vidrd.ref.weights import DEFAULT_SEED


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the embedded vidrd-shapes model, trained on videos of one moving shape)")
    g.add_argument("--weights", metavar="DIR", help="a folder in the official layout (sd/, ModelT2V.pth or "
                   ".safetensors, vae_finetuned/), e.g. from `vidrd init-random` or `vidrd convert`")
    g.add_argument("--sd", metavar="DIR", help="released SD2.1-base folder (with --ckpt)")
    g.add_argument("--ckpt", metavar="FILE", help="released ModelT2V.pth (with --sd)")
    g.add_argument("--vae", metavar="DIR", help="released vae_finetuned/ folder (optional, with --sd/--ckpt)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="random weights of a preset (for pipelines and benchmarks)")
    g.add_argument("--weights-seed", type=int, default=DEFAULT_SEED, help="seed of the random weights of --preset")


def check_model_args(args) -> None:
    """Reject contradictory model flags before anything loads."""
    given = [n for n in ("weights", "preset") if getattr(args, n)] + (["sd/--ckpt"] if args.sd or args.ckpt else [])
    if len(given) > 1:
        raise ValueError(f"choose one of --weights, --sd/--ckpt, --preset (got --{' and --'.join(given)})")
    if bool(args.sd) != bool(args.ckpt):
        raise ValueError("--sd and --ckpt go together (the SD2.1-base folder and ModelT2V.pth)")
    if args.vae and not args.sd:
        raise ValueError("--vae goes with --sd/--ckpt")


def is_default_model(args) -> bool:
    """No model flag given: the embedded vidrd-shapes model (vidrd.runtime.shapes)."""
    return not (args.weights or args.sd or args.ckpt or args.preset)


def load_model(args, dtype=torch.float32, device="cpu"):
    """(model, description, is_random) for the flags of add_model_args."""
    from vidrd.ref.loading import load_official
    from vidrd.ref.weights import load_dir, random_model

    from vidrd.runtime.shapes import MODEL_DIR, NAME

    check_model_args(args)
    if args.weights:
        return load_dir(args.weights, dtype=dtype, device=device), f"weights {args.weights}", False
    if args.sd:
        return load_official(args.sd, args.ckpt, args.vae, dtype=dtype, device=device), f"checkpoint {args.ckpt}", False
    if is_default_model(args):
        return load_dir(MODEL_DIR, dtype=dtype, device=device), f"{NAME} (the embedded default model)", False
    model = random_model(args.preset, args.weights_seed, dtype=dtype, device=device)
    return model, f"preset {args.preset} with random weights (seed {args.weights_seed})", True
