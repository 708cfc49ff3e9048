"""`vidrd bench`: seconds per output frame of the runtime vs the reference sampler, one JSON row per run."""
from __future__ import annotations

from pathlib import Path

from vidrd.runtime.bench.runtime import WORKLOADS
from vidrd.runtime.cli.args import add_quality_arg, add_runtime_args, explicit_args, runtime_options


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark the runtime against the reference sampler (JSON rows)",
                       description="Warm-up excluded, repeated runs, medians; the reference sampler (float32) runs "
                       "in the same process on the same workload and gives the speed-up and the accuracy.")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="small")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-reference", action="store_true", help="skip the reference sampler (no speed-up)")
    p.add_argument("--out", metavar="FILE", help="append the summary row to this JSON-lines file")
    add_quality_arg(p)  # for the runtime measured; the reference baseline stays exact (float32, the workload's steps)
    add_runtime_args(p.add_argument_group("execution (the runtime measured)"))
    p.set_defaults(func=run)
    from vidrd.runtime.bench import service
    s = sub.add_parser("serve-bench", help="load benchmark of `vidrd serve`: N clients, --batch-jobs K (JSON row)",
                       description=service.__doc__.split("\n\n")[2].replace("\n", " "))
    service.add_args(s)
    s.set_defaults(func=lambda args: service.run(args) and 0)


def run(args) -> int:
    from vidrd.runtime.bench.runtime import run as bench
    from vidrd.runtime.bench.metrics import strict_json
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats} must be >= 1")
    row = bench(args.workload, runtime_options(args), repeats=args.repeats, with_reference=not args.no_reference,
                quality=args.quality, explicit=explicit_args(args))
    if args.out:
        with Path(args.out).open("a") as f:
            f.write(strict_json(row) + "\n")
    return 0
