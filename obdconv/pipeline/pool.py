"""The local runner's pool: the stage functions its worker processes run (top-level, so they
pickle), an executor that runs them inline for a one-process run, and the small helpers the run
uses around them."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from typing import Any

from obdconv.gcpause import gc_paused
from obdconv.interpreter import leave_forkserver
from obdconv.pipeline.assemble import BuiltLayer, build_layer, commit_built, send_built
from obdconv.pipeline.flatten import build_flat_layer, decode_ranges
from obdconv.pipeline.metadata import decode_metadata
from obdconv.pipeline.prepare import PreparedLayer, prepare_layer
from obdconv.pipeline.results import ProgressEvent
from obdconv.registry import PendingBlob, RegistryOptions, open_repository
from obdconv.request import ConversionProfile
from obdconv.termination import die_with_parent

PROGRESS_INTERVAL = 0.2  # seconds between byte-progress events of one layer


process_repositories: dict[str, Any] = {}
_progress_queue: Any = None


def init_worker(progress_queue: Any, runner_pid: int | None = None) -> None:
    """Pool worker start (also called in the runner's own process for a one-process run, without
    `runner_pid`): a worker dies with its parent, the forkserver, which exits with the runner."""
    global _progress_queue
    _progress_queue = progress_queue
    if runner_pid is not None:
        leave_forkserver()  # the server then exits with the runner, and this worker with the server
        die_with_parent(runner_pid)


def stop_workers_now(pool: Executor) -> None:
    """SIGKILL a process pool's workers (an interrupted run: their tasks' results are not wanted,
    and they run with SIGTERM blocked). The executor then fails every pending future."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            process.kill()


def _repo(name: str, options: RegistryOptions | None) -> Any:
    repo = process_repositories.get(name)
    if repo is None:
        repo = process_repositories[name] = open_repository(name, options)
    return repo


class ProgressDrain:
    """The runner's end of the pool's progress queue: a thread that emits the workers' events.

    Stopped by an event, never by a sentinel put through the queue: a put takes the queue's write
    lock (shared with the workers), which a worker killed while writing (Ctrl-C, SIGTERM, an OOM
    kill) holds for ever. The runner's feeder thread would wait for it, and the interpreter, which
    joins that thread at exit, would never exit."""

    POLL_SECONDS = 0.1  # how soon a stop is noticed

    def __init__(self, progress_queue: Any, emit: Callable[[ProgressEvent], None]) -> None:
        self._queue = progress_queue
        self._emit = emit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-drain", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        """Emit what has arrived, until nothing more comes for a moment, then end the thread."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                event = self._queue.get(timeout=self.POLL_SECONDS)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            except (EOFError, OSError):
                return
            self._emit(event)


def _report(event: ProgressEvent) -> None:
    if _progress_queue is not None:
        with contextlib.suppress(Exception):
            _progress_queue.put(event)


def task_prepare(source: str, options: RegistryOptions | None, layer: dict[str, Any], spool_dir: str,
                 native: bool, turbo: bool, algorithm: str, block_size: int, index: int,
                 entry_stream: str = "", head_room: int = 0) -> tuple[dict[str, Any], float]:
    """Prepare one layer; its entries also go to the file `entry_stream` as they are found, when
    given (the runner's metadata pass follows it: entrystream.py). `head_room`: see prepare_layer."""
    start = time.monotonic()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_INTERVAL:
            last[0] = now
            _report(ProgressEvent("prepare", index, layer["digest"], done, total))

    prepared = prepare_layer(_repo(source, options), layer, spool_dir, native=native, turbo=turbo,
                             algorithm=algorithm, block_size=block_size, progress=progress,
                             entry_stream=entry_stream or None, head_room=head_room,
                             # The runner stores each blob as soon as its layer is done: its disk
                             # may as well work during the prepare (a fleet's prepares do not,
                             # see prepare_layer).
                             early_writeback=head_room > 0)
    _report(ProgressEvent("prepare", index, layer["digest"], prepared.source_size, prepared.source_size,
                          finished=True))
    return prepared.to_dict(), time.monotonic() - start


def task_build(prepared: dict[str, Any], metadata: bytes, profile: dict[str, Any], chain_id: str,
               parent_chain_id: str, out_dir: str) -> tuple[dict[str, Any], float]:
    """The CPU part of assemble (no registry access): may run before every digest is verified."""
    start = time.monotonic()
    with gc_paused():  # a layer's placements and extents: many objects, no cycles (gcpause.py)
        built = build_layer(PreparedLayer.from_dict(prepared), decode_metadata(metadata),
                            ConversionProfile(**profile), chain_id, parent_chain_id, out_dir)
    return built.to_dict(), time.monotonic() - start


def task_build_flat(layers: list[tuple[dict[str, Any], bytes]], allocated: bytes, profile: dict[str, Any],
                    chain_id: str, out_dir: str) -> tuple[dict[str, Any], float]:
    """`task_build` of a flattened image: all its layers' (prepared, encoded metadata) at once."""
    start = time.monotonic()
    built = build_flat_layer([PreparedLayer.from_dict(p) for p, _ in layers], [decode_metadata(m) for _, m in layers],
                             decode_ranges(allocated), ConversionProfile(**profile), chain_id, out_dir)
    return built.to_dict(), time.monotonic() - start


def task_send(built: dict[str, Any], target_repo: Any, upload: bool) -> tuple[PendingBlob, float]:
    """Runs in an upload thread of the runner's own process (see `_Run.uploads`)."""
    start = time.monotonic()
    pending = send_built(BuiltLayer.from_dict(built), target_repo, upload)
    return pending, time.monotonic() - start


def task_commit(built: dict[str, Any], pending: PendingBlob, target_repo: Any, source_repo: Any, upload: bool,
                oci: bool) -> tuple[dict[str, Any], float]:
    """Runs in an upload thread, like `task_send`."""
    start = time.monotonic()
    layer = commit_built(BuiltLayer.from_dict(built), pending, target_repo, upload, oci=oci, source_repo=source_repo)
    return layer.to_dict(), time.monotonic() - start


class InlineExecutor(Executor):
    """Runs each task at submit time in this process (workers=1: no pool, easy debugging)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        f: Future[Any] = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:
            f.set_exception(e)
        return f



def run_all(*steps: Callable[[], None]) -> None:
    """Run every cleanup step even if Ctrl-C lands in one of them (waiting for the pool takes a
    moment, and an interrupt there would skip the rest: spools and work directories left behind);
    the interrupt is raised once all have run."""
    interrupt: KeyboardInterrupt | None = None
    for step in steps:
        try:
            step()
        except KeyboardInterrupt as e:
            interrupt = interrupt or e
    if interrupt is not None:
        raise interrupt


@contextlib.contextmanager
def thread_priority_raised(steps: int) -> Iterator[None]:
    """Lower this thread's nice value by `steps` while inside, if permitted (Linux applies
    setpriority(PRIO_PROCESS, tid) to one thread); restored on exit."""
    tid = threading.get_native_id()
    try:
        before = os.getpriority(os.PRIO_PROCESS, tid) if steps > 0 else None
        if before is not None:
            os.setpriority(os.PRIO_PROCESS, tid, max(-20, before - steps))
    except OSError:  # EPERM/EACCES without CAP_SYS_NICE: run at the normal priority
        before = None
    try:
        yield
    finally:
        if before is not None:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, before)


