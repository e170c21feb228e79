"""The local runner's progress drain (pipeline/pool.py ProgressDrain) when a pool worker was killed
while writing to the progress queue: the process still exits. (A stop sent as a None through the
queue waited for ever for the write lock the dead worker held, and so did the interpreter's exit:
the likely cause of a SIGTERMed `obdconv convert` that CI once saw not exit within 30 s.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import multiprocessing as mp
    import os
    import signal
    import sys

    from obdconv.pipeline.pool import ProgressDrain
    from obdconv.pipeline.results import ProgressEvent

    def worker(q, holding):
        q.put(ProgressEvent("prepare", 0, "sha256:" + "0" * 64, 1, 2))
        q.close()
        q.join_thread()  # that event is in the pipe
        # Then it dies in the middle of its next write: the queue's write lock (shared by every
        # writer) taken, as its feeder thread takes it, and never given back.
        q._wlock.acquire()
        holding.set()
        signal.pause()

    if __name__ == "__main__":
        ctx = mp.get_context("fork")
        q, holding = ctx.Queue(), ctx.Event()
        p = ctx.Process(target=worker, args=(q, holding))
        p.start()
        assert holding.wait(30)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        events = []
        drain = ProgressDrain(q, events.append)
        drain.stop()
        print(sys.argv[1], [e.stage for e in events], flush=True)
        if sys.argv[1] == "sentinel":  # what the runner did before: a None through the queue
            q.put(None)
""")


def _run(mode: str, timeout: float) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def test_the_drain_stops_and_the_process_exits_after_a_worker_died_holding_the_queue() -> None:
    done = _run("event", 30)
    assert done is not None, "the process did not exit"
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "event ['prepare']"  # what the dead worker had sent still arrived


def test_a_sentinel_through_that_queue_would_hang_the_exit() -> None:
    """The control: the same process, ending the old way, never exits (so the test above shows the fix)."""
    assert _run("sentinel", 8) is None
