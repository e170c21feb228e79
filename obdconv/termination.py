"""How obdconv processes stop: SIGTERM like Ctrl-C, and children that never outlive their parent.

* `SIGTERM` (what `timeout`, `docker stop`, Kubernetes and systemd send) and `SIGHUP` become a
  `Terminated` exception in the main thread, a `KeyboardInterrupt` subclass, so every cleanup that
  runs for Ctrl-C runs for them too; the CLI then exits with 128 + the signal's number.
* The local runner's pool workers (forked by multiprocessing's forkserver, which exits when the
  runner's process dies, once the workers closed their copies of its "alive" pipe:
  obdconv/interpreter.py `leave_forkserver`) call `die_with_parent()`: the kernel kills them with
  SIGKILL the moment their parent goes, so a SIGKILLed `obdconv convert` leaves no process holding its caller's
  stdout/stderr. The forkserver and its workers run with SIGTERM blocked (see
  obdconv/interpreter.py `start_forkserver`): the runner alone decides when they stop.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by `signum` (SIGTERM, SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code_of(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended (130 for Ctrl-C)."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM/SIGHUP raise `Terminated` in the main thread (once: a second signal
    during the cleanup it started is ignored, so the cleanup finishes). No-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if not raised:
            raised.append(signum)
            raise Terminated(signum)

    before = {s: signal.signal(s, handler) for s in TERMINATING_SIGNALS}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def signal_when_parent_dies(signum: int) -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen`: the child (after exec too) gets `signum` from the kernel
    when this process dies, even by SIGKILL (PR_SET_PDEATHSIG; strictly, when the thread that started
    it ends: start children from the main thread). The C function is looked up here, before the fork,
    so the child only calls it; a parent already gone by then makes the child exit at once."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(1)

    return preexec


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux prctl PR_SET_PDEATHSIG);
    exit at once if `parent_pid`, whose death would have done that, is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        os._exit(1)
