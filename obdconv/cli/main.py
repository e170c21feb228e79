"""`obdconv` command line: one sub-command module per area, each exposing `register(subparsers)`.

Every module's `register` adds its parser and sets `func` (args -> exit code). Errors derived from
`ObdconvError` are printed as one clear line and mapped to their class's exit code. Ctrl-C exits
130, SIGTERM 143 and SIGHUP 129, each after the command's cleanup (obdconv/termination.py).
SIGUSR1 prints the stack of every thread to stderr and carries on: a run that seems stuck can be
looked at without stopping it (Celery's worker installs its own SIGUSR1 dump, which replaces this).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import io
import logging
import signal
import sys

from obdconv.errors import ObdconvError
from obdconv.termination import Terminated, exit_code_of, terminate_as_interrupt

# Sub-command modules, in help order.
COMMAND_MODULES = [
    "obdconv.cli.convert",  # convert (the reference convertor's flags)
    "obdconv.cli.verify",  # verify REF
    "obdconv.cli.inspect",  # inspect FILE
    "obdconv.cli.db",  # db init
    "obdconv.cli.fleet",  # submit, status, wait, worker, fleet
    "obdconv.cli.api",  # api (the HTTP service; imports FastAPI only when run)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="obdconv", description="Convert container images to overlaybd.")
    parser.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real import error inside the module: surface it
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Not when stderr is no file (main() called in-process with its output captured: tests).
    with contextlib.suppress(io.UnsupportedOperation, AttributeError, ValueError):
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    try:
        with terminate_as_interrupt():  # SIGTERM/SIGHUP: the same cleanup as Ctrl-C
            return int(args.func(args) or 0)
    except ObdconvError as e:
        print(f"obdconv: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"obdconv: {'terminated' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        return exit_code_of(e)


if __name__ == "__main__":
    sys.exit(main())
