"""`vidrd train-decoder`: distil a tiny decoder (runtime/preview.py) from a model's VAE decoder.

Latents come from the model's own VAE encoder on procedural shape videos (runtime/shapes/data.py), sampled from its
posterior, so they are what the VAE decodes; the target is the VAE's per-frame decode of the same latents, in L1
with object pixels weighted up (a shape covers ~5% of a frame: unweighted, the background is all it learns). Every
batch and random draw is a function of (seed, step), and FILE.state.pt (written at the end and when --stop-after
stops the run) lets the next run continue from the step it reached.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from vidrd.runtime.cli.model_args import add_model_args


def register(sub) -> None:
    p = sub.add_parser("train-decoder", help="distil a tiny decoder for previews and drafts from a model's VAE",
                       description="Distil a tiny decoder (about 0.2 M parameters) from the model's VAE decoder on "
                       "latents its VAE encoder makes of procedural shape videos; use it with `vidrd generate "
                       "--preview-dir` or `--decoder tiny`.")
    p.add_argument("--out", required=True, metavar="FILE", help="the decoder's .safetensors (fp16)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000: the shipped decoder)")
    p.add_argument("--batch", type=int, default=2, help="videos per step (8 frames each; default 2)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of Adam (cosine decay; default 2e-3)")
    p.add_argument("--object-weight", type=float, default=8.0,
                   help="extra loss weight on pixels that differ from the background (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-after", type=float, default=None, metavar="MIN",
                   help="save and stop after MIN minutes (run again to continue)")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from vidrd.runtime import preview
    from vidrd.runtime.cli.model_args import load_model
    from vidrd.runtime.shapes import data
    from vidrd.runtime.shapes.train import object_mask

    for name in ("steps", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be >= 1")
    if not args.lr > 0:
        raise ValueError(f"--lr={args.lr} must be > 0")
    if args.stop_after is not None and not 0 < args.stop_after < math.inf:
        raise ValueError(f"--stop-after={args.stop_after} must be a number of minutes > 0")
    out = Path(args.out)
    state_path = out.with_name(out.name + ".state.pt")
    model, what, _ = load_model(args)
    vae = model.vae.eval().requires_grad_(False)
    if not hasattr(vae, "encode"):
        raise ValueError(f"{what} has no VAE encoder to make latents from")
    torch.manual_seed(args.seed)
    student = preview.TinyDecoder(vae.cfg.latent_channels)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    step = 0
    if state_path.is_file():
        s = torch.load(state_path, weights_only=True)
        student.load_state_dict(s["decoder"])
        opt.load_state_dict(s["opt"])
        step = s["step"]
        print(f"resuming {state_path} at step {step}", file=sys.stderr)
    params = sum(p.numel() for p in student.parameters())
    print(f"distilling {params} parameters from {what}'s VAE decoder, steps {step}..{args.steps}", file=sys.stderr)
    t0, loss_avg = time.perf_counter(), None
    while step < args.steps:
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        vids, _ = data.batch(step, args.batch, seed=args.seed)  # (B,F,3,H,W) in [0,1]
        with torch.no_grad():
            mean, logvar = vae.encode(vids.flatten(0, 1) * 2 - 1).chunk(2, dim=1)  # (N,C,h,w) each
            z = mean + torch.randn(mean.shape, generator=gen) * (0.5 * logvar).exp()
            target = vae.decode(z, num_frames=1)  # (N,3,H,W), what the runtime decodes per frame
        for g in opt.param_groups:
            g["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        weight = 1 + args.object_weight * object_mask(target)  # (N,1,H,W)
        loss = ((student(z) - target).abs() * weight).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step}/{args.steps} L1 {loss_avg:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        if args.stop_after is not None and time.perf_counter() - t0 > args.stop_after * 60:
            break
    torch.save({"decoder": student.state_dict(), "opt": opt.state_dict(), "step": step}, state_path)
    preview.save(student, out)
    print(f"wrote {out} at step {step}/{args.steps} ({out.stat().st_size / 1024:.0f} KiB)"
          + ("" if step >= args.steps else f"; run again to continue from {state_path}"), file=sys.stderr)
    return 0
