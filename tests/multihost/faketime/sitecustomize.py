"""Imported at start-up (as `sitecustomize`) by the Python processes of a test host whose clock is
faked with libfaketime, and by no other process.

Debian 12's libfaketime (0.9.10) with the monotonic clock left alone (`--exclude-monotonic`, which
the fleet needs: faking it hangs Python's timed lock waits, libfaketime issue #390) mishandles
`clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)`, so Python 3.11's `time.sleep` fails with EINVAL
(libfaketime issue #426). Sleep with a timed wait on an event instead, which uses the monotonic
clock without that call. Everything else (time.time, datetime.now, C libraries) sees the faked
wall clock through libfaketime itself.
"""

import threading
import time


def _sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    threading.Event().wait(seconds)


time.sleep = _sleep
