"""Every Python process obdconv starts imports installed code only, whatever its working directory holds.

Python puts a "potentially unsafe" directory first on `sys.path`: the working directory for
`python -c` and `python -m`, the script's directory for `python script.py`. A `json.py` or an
`obdconv/` package there would run instead of the real one (as root, in CI). `-P` (Python 3.11+;
`PYTHONSAFEPATH=1` in the environment) leaves that entry out. So:

* children obdconv starts itself (fleet workers, Flower, verify) run `python_command(...)`;
* multiprocessing's helpers run `python -c` with this interpreter's flags and environment: the
  forkserver (whose children are the local runner's pool workers) and the resource tracker are
  started by `start_forkserver` with `PYTHONSAFEPATH=1` set while they start;
* `python -m obdconv` drops the working directory itself (obdconv/__main__.py); the `obdconv`
  console script never had it (its sys.path[0] is the script's bin/ directory);
* Celery imports task modules and `-A` apps "from the working directory" (celery.utils.imports
  `cwd_in_path`): the fleet's app uses a loader that does not (workers/app.py), and Flower is
  started through `obdconv flower`, not `celery -A`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

SAFE_PATH_FLAG = "-P"
_environment_lock = threading.Lock()


def python_command(*args: str) -> list[str]:
    """argv for a child Python of this interpreter that keeps the working directory off sys.path."""
    return [sys.executable, SAFE_PATH_FLAG, *args]


@contextlib.contextmanager
def safe_path_environment() -> Iterator[None]:
    """While inside, Python children inherit `PYTHONSAFEPATH=1` (for those started by library code
    that builds its own command line, like multiprocessing's `python -c` helpers)."""
    with _environment_lock:
        before = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("PYTHONSAFEPATH", None)
            else:
                os.environ["PYTHONSAFEPATH"] = before


def start_forkserver(preload: list[str]) -> Any:
    """The forkserver multiprocessing context, its server and the resource tracker running, both
    started here (from the calling thread) with a safe sys.path. Children forked by the server
    inherit its sys.path. (A server already running is kept: the preload list then has no effect.)"""
    import multiprocessing
    from multiprocessing import forkserver, resource_tracker

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    # The server and every worker it forks inherit SIGTERM blocked: a SIGTERM sent to the whole
    # process group (`timeout`, systemd) reaches the runner, which stops its workers itself
    # (obdconv/termination.py), instead of killing workers under a run that is still going.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        with safe_path_environment():
            resource_tracker.ensure_running()
            forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return ctx


def leave_forkserver() -> None:
    """In a process the forkserver forked: close its copy of the server's "alive" pipe. Every such
    child is handed one (so it could start forkserver children itself), and the server exits only
    once every copy is closed; with them open, a runner killed by SIGKILL left its server, and so
    its pool, running. (This child can then start no forkserver children; pool workers do not.)"""
    from multiprocessing import forkserver

    server = forkserver._forkserver  # type: ignore[attr-defined]
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None
