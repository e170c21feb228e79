"""`BlockCompressor`: a payload into ZFile blocks, each compressed independently + its CRC."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from concurrent.futures import Future

from obdconv.formats.zfile.codec import _compress_packed, _shared_pool, default_threads
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
                yield _compress_packed(self.algo, mv[o : o + chunk], self.block_size, step)
            return
        pool = _shared_pool(self.threads)
        # At most 2 batches per thread in flight, so the memory held stays bounded.
        window = 2 * self.threads
        pending: collections.deque[Future[tuple[bytes, list[int]]]] = collections.deque()
        for o in range(0, len(mv), step):
            pending.append(pool.submit(_compress_packed, self.algo, mv[o : o + step], self.block_size, step))
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

