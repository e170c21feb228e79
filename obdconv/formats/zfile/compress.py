"""A payload into ZFile blocks, each compressed independently + its CRC: `BlockCompressor` (in
memory) and `BlockStream` (batches compressed on a thread pool, written to a file in order)."""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from obdconv.formats.rawbytes import byte_view
from obdconv.formats.zfile.codec import (
    _compress_packed,
    _shared_pool,
    compress_into,
    compressed_bound,
    default_threads,
)
from obdconv.formats.zfile.header import DEFAULT_BLOCK_SIZE, algorithm_id, check_block_size

SERIAL_CHUNK = 16 << 20  # payload bytes compressed into one output buffer when single-threaded


class BlockCompressor:
    """Compress a payload into ZFile blocks (each = compressed bytes + CRC32C seed 100007).

    Output is deterministic and independent of `threads`. `batch_blocks` blocks go to one C-call
    loop (and, with threads, to one task) so the per-batch overhead is amortised.
    """

    def __init__(self, algorithm: str | int = "lz4", block_size: int = DEFAULT_BLOCK_SIZE,
                 threads: int | None = None, batch_blocks: int = 256) -> None:
        self.algo = algorithm_id(algorithm)
        check_block_size(block_size)
        self.block_size = block_size
        self.threads = default_threads() if threads is None else max(1, threads)
        self.batch_bytes = max(1, batch_blocks) * block_size

    def iter_packed(self, data: bytes | bytearray | memoryview) -> Iterator[tuple[bytes, list[int]]]:
        """`compress_packed` batch by batch, in order (what a streaming writer wants: no join)."""
        mv = memoryview(data).cast("B")
        step = self.batch_bytes
        if self.threads == 1 or len(mv) <= step:
            # Serially: one output copy per SERIAL_CHUNK (fewer, larger copies than per batch),
            # while the per-thread scratch buffer stays bounded by SERIAL_CHUNK's compressed bound.
            chunk = max(step, SERIAL_CHUNK - SERIAL_CHUNK % step)
            for o in range(0, len(mv), chunk):
                yield _compress_packed(self.algo, mv[o : o + chunk], self.block_size)
            return
        pool = _shared_pool(self.threads)
        # At most 2 batches per thread in flight, so the memory held stays bounded.
        window = 2 * self.threads
        pending: collections.deque[Future[tuple[bytes, list[int]]]] = collections.deque()
        for o in range(0, len(mv), step):
            pending.append(pool.submit(_compress_packed, self.algo, mv[o : o + step], self.block_size))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def compress_packed(self, data: bytes | bytearray | memoryview) -> tuple[bytes, list[int]]:
        """(the stored blocks of `data` back to back, each block's stored length incl. its CRC).

        The fast form: what a ZFile's block area holds, without a bytes object per block. Every
        block but the last is full; empty data gives (b"", []).
        """
        results = list(self.iter_packed(data))
        if len(results) == 1:
            return results[0]
        return b"".join(r[0] for r in results), list(itertools.chain.from_iterable(r[1] for r in results))

    def compress(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """The stored blocks of `data`, one bytes each (`compress_packed` is faster)."""
        packed, lengths = self.compress_packed(data)
        bounds = list(itertools.accumulate(lengths, initial=0))
        return [packed[bounds[k] : bounds[k + 1]] for k in range(len(lengths))]



class BlockStream:
    """Compresses a payload handed over in batches into ZFile blocks on `threads` threads and
    writes the stored blocks to `out` in order (the block area of a ZFile, e.g. a prepared data
    area); `lengths` collects each block's stored length.

    Every batch but the last must be a whole number of blocks. `submit` returns at once while
    fewer than `window` batches are in flight, else it waits (so memory stays bounded and a slow
    disk or codec holds back the producer); the batch's memory must stay unchanged until its
    `done` callback runs (called from a pool thread once it is compressed). Output buffers are
    recycled, so the stream allocates at most `window + 1` of them. With `threads=1` everything
    runs in the caller's thread. The bytes written do not depend on `threads` or the batching.
    """

    def __init__(self, out: BinaryIO, algorithm: str | int = "lz4", block_size: int = DEFAULT_BLOCK_SIZE,
                 threads: int = 1, window: int | None = None) -> None:
        self.out = out
        self.algo = algorithm_id(algorithm)
        check_block_size(block_size)
        self.block_size = block_size
        self.threads = max(1, threads)
        self.lengths: list[int] = []
        self.raw_size = 0
        self.compressed_size = 0
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._closed = False
        if self.threads == 1:
            self._pool: ThreadPoolExecutor | None = None
            return
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zfile-stream")
        self._slots = threading.BoundedSemaphore(window or 2 * self.threads + 1)
        # Compressed batches in submission order, for the writer; None ends it.
        self._order: queue.SimpleQueue[Future[tuple[bytearray, int, list[int]]] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_in_order, name="zfile-stream-writer", daemon=True)
        self._writer.start()

    def _buffer(self, size: int) -> bytearray:
        need = compressed_bound(self.algo, self.block_size, size)
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            return bytearray(need)
        return buf if len(buf) >= need else bytearray(need)

    def _compress(self, data: memoryview, done: Callable[[], None] | None) -> tuple[bytearray, int, list[int]]:
        buf = self._buffer(len(data))
        lengths: list[int] = []
        try:
            end = compress_into(self.algo, data, self.block_size, buf, 0, lengths)
        finally:
            if done is not None:
                done()
        return buf, end, lengths

    def _emit(self, buf: bytearray, end: int, lengths: list[int]) -> None:
        self.out.write(memoryview(buf)[:end])
        self.lengths.extend(lengths)
        self.compressed_size += end
        self._free.put(buf)

    def submit(self, data: bytes | bytearray | memoryview, done: Callable[[], None] | None = None) -> None:
        if self._closed:
            raise ValueError("submit to a closed BlockStream")
        if self._error is not None:
            raise self._error
        mv = byte_view(data)
        self.raw_size += len(mv)
        if self._pool is None:
            self._emit(*self._compress(mv, done))
            return
        self._slots.acquire()
        try:
            future = self._pool.submit(self._compress, mv, done)
        except BaseException:
            self._slots.release()
            raise
        self._order.put(future)

    def _write_in_order(self) -> None:
        while (future := self._order.get()) is not None:
            try:
                if self._error is None:
                    self._emit(*future.result())
            except BaseException as e:  # the producer raises it at its next submit or at close
                self._error = e
            finally:
                self._slots.release()

    def close(self) -> None:
        """Wait until every batch is written; raises the first error a batch met."""
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._order.put(None)
            self._writer.join()
            self._pool.shutdown(wait=True)
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop without writing what is still queued (after a failure elsewhere); never raises."""
        self._error = self._error or RuntimeError("BlockStream aborted")
        with contextlib.suppress(BaseException):  # the caller is already handling its own error
            self.close()
