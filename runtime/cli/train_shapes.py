"""`vidrd train-shapes`: train vidrd-shapes (resumable), then write it in the official layout as fp16 safetensors."""
from __future__ import annotations

import json
import platform
import sys
from dataclasses import asdict, fields
from pathlib import Path

from vidrd.runtime.shapes.train import TrainConfig


def register(sub) -> None:
    p = sub.add_parser("train-shapes", help="train the vidrd-shapes model on procedural video (resumable)",
                       description="Train the `shapes` preset on procedural videos of one moving shape. Progress "
                       "is checkpointed into --out; running the same command again resumes. When training is done "
                       "the model is written to OUT/model in the official layout (fp16 safetensors).")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: state.pt checkpoints and model/")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=f"(default {getattr(defaults, f.name)})")
    p.add_argument("--start-from", type=Path, default=None, metavar="MODEL_DIR",
                   help="a new run begins at the continuation phase from this trained model (official layout)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 matrix products where the hardware has bf16 units, else fp32")
    p.add_argument("--stop-after", type=float, default=None, metavar="MIN",
                   help="checkpoint and stop after MIN minutes (run again to resume)")
    p.add_argument("--export-now", action="store_true",
                   help="write OUT/model from the latest checkpoint without training further")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from vidrd.runtime.shapes.train import Trainer, log_stderr

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    try:
        cfg.validate()
    except ValueError as e:
        print(f"vidrd train-shapes: {e}", file=sys.stderr)
        return 2
    if args.stop_after is not None and not 0 < args.stop_after < float("inf"):
        print(f"vidrd train-shapes: --stop-after={args.stop_after} must be a number of minutes > 0", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"vidrd train-shapes: --threads={args.threads} must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = None if args.precision == "auto" else args.precision == "bf16"
    if args.start_from is not None and not (args.start_from / "ModelT2V.safetensors").is_file():
        print(f"vidrd train-shapes: --start-from={args.start_from} is not a model folder (no ModelT2V.safetensors)",
              file=sys.stderr)
        return 2
    trainer = Trainer(Path(args.out), cfg, device=device, log=log_stderr, bf16=bf16, start=args.start_from)
    log_stderr(f"vidrd train-shapes: device {device}, {torch.get_num_threads()} threads, "
               f"{'bf16 autocast' if trainer.bf16 else 'fp32'}; checkpoints in {args.out}")
    if not args.export_now:
        done = trainer.run(stop_after=None if args.stop_after is None else args.stop_after * 60)
        if not done:
            return 0
    out = export(trainer, Path(args.out) / "model")
    log_stderr(f"wrote {out}")
    return 0


def export(trainer, out: Path) -> Path:
    """The trained model as fp16 safetensors in the official layout at `out` (replaced if present), and train.json."""
    import tempfile

    import torch

    from vidrd.ref.loading import to
    from vidrd.ref.weights import write_official

    from vidrd.runtime.shapes.train import tokenizer_folder

    model = to(trainer.trained_model(), dtype=torch.float16)  # fp16 at rest; the loader casts back to float32
    if (out / "ModelT2V.safetensors").is_file():  # an earlier export: its train.json is ours to replace too
        (out / "train.json").unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_official(model, out, safetensors=True, force=True, tokenizer_dir=tokenizer_folder(Path(tmp) / "tok"),
                       sd_vae_weights=False)
    s = trainer.state
    info = {"config": asdict(trainer.cfg), "phase": s["phase"], "step": s["step"],
            "direction_steps_done": s.get("dir_done", 0), "continuation_steps_done": s.get("cont_done", 0),
            "started_from": s.get("start"), "latent_scale": s["scale"],
            "train_minutes": round(s["wall"] / 60, 1), "device": str(trainer.device),
            "threads": torch.get_num_threads(), "bf16": trainer.bf16, "cpu": platform.processor() or platform.machine(),
            "final_losses": {k: (v[-1] if v else None) for k, v in s["losses"].items()},
            "losses": s["losses"]}
    start = Path(s["start"]) / "train.json" if s.get("start") else None
    if start is not None and start.is_file():  # a run from a trained model: how that model was made, as it said
        info["start_model"] = json.loads(start.read_text())
    (out / "train.json").write_text(json.dumps(info, indent=1) + "\n")
    return out
