"""Moving a stream's pieces between threads, so that (for example) a layer's download and digest
check, its inflate, its tar sha256 and its tar scan use different cores: `Fanout` hands one
producer's pieces, in order, to several consumers that each run in their own thread; `ReadAhead`
reads a file object in a thread of its own.

The pieces are shared, not copied: consumers must treat them as read-only (the prepare stage hands
on `bytes`). Each consumer has a bounded queue, so a slow consumer holds the producer back and the
memory in flight stays at most `depth` pieces per consumer. The first exception a consumer raises
stops all of them (they drop what is still queued) and is raised to the producer, by its next `put`
or by `close`. With `threaded=False` every consumer runs in the producer's thread, one after the
other (the one-core case: no thread hand-offs).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from typing import BinaryIO, Generic, TypeVar

T = TypeVar("T")
_END = object()


class Fanout(Generic[T]):
    def __init__(self, consumers: Sequence[Callable[[T], object]], *, depth: int = 8, threaded: bool = True,
                 name: str = "fanout") -> None:
        self.consumers = list(consumers)
        self.threaded = threaded
        self._error: BaseException | None = None
        self._closed = False
        self._queues: list[queue.Queue[object]] = []
        self._threads: list[threading.Thread] = []
        if not threaded:
            return
        for i, consume in enumerate(self.consumers):
            q: queue.Queue[object] = queue.Queue(maxsize=depth)
            thread = threading.Thread(target=self._run, args=(consume, q), name=f"{name}-{i}", daemon=True)
            self._queues.append(q)
            self._threads.append(thread)
            thread.start()

    def _run(self, consume: Callable[[T], object], q: queue.Queue[object]) -> None:
        while (item := q.get()) is not _END:
            if self._error is not None:
                continue  # stopped: drain, so the producer never blocks on a full queue
            try:
                consume(item)  # type: ignore[arg-type]
            except BaseException as e:
                if self._error is None:
                    self._error = e

    def put(self, piece: T) -> None:
        """Give `piece` to every consumer; raises the first error a consumer met."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise ValueError("put on a closed Fanout")
        if not self.threaded:
            try:
                for consume in self.consumers:
                    consume(piece)
            except BaseException as e:
                self._error = e
                raise
            return
        for q in self._queues:
            q.put(piece)

    def close(self) -> None:
        """Wait until every consumer has taken everything; raises the first error one met."""
        if not self._closed:
            self._closed = True
            for q in self._queues:
                q.put(_END)
            for thread in self._threads:
                thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop the consumers, dropping what is queued (the producer failed); never raises."""
        if self._error is None:
            self._error = RuntimeError("fanout aborted")
        with contextlib.suppress(BaseException):
            self.close()

    def __enter__(self) -> Fanout[T]:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()


class ReadAhead:
    """`read(size)` of `source` in a thread of its own, up to `depth` chunks ahead: whatever the
    source does per read (e.g. a verifying blob reader's sha256) runs beside the caller's work on
    the previous chunk. Chunks come back in order; an error of the source is raised by the `read`
    that reaches it. `close` stops the thread (it does not close `source`)."""

    def __init__(self, source: BinaryIO, size: int, depth: int = 4) -> None:
        self.source = source
        self.size = size
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._eof = False
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self.source.read(self.size)
                self._put(chunk)
                if not chunk:
                    return
        except BaseException as e:
            self._put(e)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self) -> bytes:
        """The next chunk; b"" at the end (again on every later call)."""
        if self._eof:
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._eof = True
            raise item
        if not item:
            self._eof = True
        return item

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
