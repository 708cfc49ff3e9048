"""The `vidrd` command line: each subcommand lives with its concern and registers itself here."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

# (module, what it registers): each module has `register(subparsers)` adding its subcommands with `func` set.
COMMANDS = (
    "vidrd.runtime.cli.info",
    "vidrd.runtime.cli.model",
    "vidrd.runtime.cli.export",
    "vidrd.runtime.cli.engines",
    "vidrd.runtime.cli.generate",
    "vidrd.runtime.cli.bench",
    "vidrd.runtime.cli.serve",
    "vidrd.runtime.cli.train_shapes",
    "vidrd.runtime.cli.train_decoder",
    "vidrd.runtime.cli.eval",
    "vidrd.runtime.cli.strip",
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


class Terminated(BaseException):
    """SIGTERM (docker stop, systemd, timeout): raised like Ctrl-C, so every command's cleanup runs."""


def _on_signal(signum, frame):
    """The first SIGINT or SIGTERM stops the command; later ones are ignored so its cleanup can finish."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help()
        return 2
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # put back on return (main() may be embedded)
        handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args)
    finally:
        if all(signal.getsignal(sig) is _on_signal for sig in handlers):  # no signal came: put them back
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def _run(args) -> int:
    """Run the command; a user error or a signal becomes one line and an exit status."""
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
    except Terminated:
        print("vidrd: terminated", file=sys.stderr)
        return 143

