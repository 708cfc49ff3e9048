"""The `vidrd` command line: each subcommand lives with its concern and registers itself here."""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it registers): each module has `register(subparsers)` adding its subcommands with `func` set.
COMMANDS = (
    "vidrd.runtime.cmd_info",
    "vidrd.runtime.cmd_model",
    "vidrd.runtime.cmd_export",
    "vidrd.runtime.cmd_engines",
    "vidrd.runtime.cmd_generate",
    "vidrd.runtime.cmd_bench",
    "vidrd.runtime.serve.cmd",
    "vidrd.runtime.shapes.cmd_train",
    "vidrd.runtime.shapes.cmd_eval",
)


class UsageError(Exception):
    """A bad command-line value: printed as `vidrd: error: ...`, exit status 2."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidrd", description="Long text-to-video generation with Reuse and Diffuse "
                                "(VidRD): reference model, optimized runtime, export.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f"vidrd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # storage failing during the work (disk full, a folder removed): one line, not a traceback
        print(f"vidrd {args.command}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # e.g. TensorRT or a GPU missing: a clear message, not a traceback
        if type(e).__module__.startswith("vidrd"):
            print(f"vidrd {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("vidrd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
