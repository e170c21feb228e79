"""Start the local runner's fork server early (light: imports nothing of the pipeline itself).

The runner's pool workers fork from multiprocessing's fork server, which imports the pipeline
before its first fork (~0.3-0.5 s of CPU). Started only when the pool is made, that import comes
after the command line's own import of the pipeline: the two run one after the other on the
conversion's critical path. Started first, the server imports while the command does.
"""

from __future__ import annotations

import os

from obdconv.interpreter import start_forkserver

# What the server preloads: multiprocessing's default ("__main__") and the runner, whose import
# brings in every stage the workers run. The runner asks for the same list (it has no effect once
# the server runs).
PRELOAD = ["__main__", "obdconv.pipeline.runner"]


def pool_size(workers: int) -> int:
    """The runner's pool processes for `workers` (0: one per CPU); 1 runs inline, with no pool."""
    return workers or os.cpu_count() or 1


def start_early() -> None:
    """Have the fork server running (and importing `PRELOAD`) from now on, started as the runner
    starts it (interpreter.start_forkserver: a safe sys.path, SIGTERM blocked in it)."""
    start_forkserver(PRELOAD)
