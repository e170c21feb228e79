"""A file written in order whose data goes to disk while it is being written.

The kernel holds back dirty pages until memory or time makes it write them (here: about 10% of
RAM, or 30 s), so a 1.7 GiB blob written in 12 s is still almost all in memory when it is fsynced,
and the fsync then waits for the whole write (6-7 s on the benchmark disk). `WritebackFile` asks
the kernel to start writing each `WRITEBACK_STEP` as soon as it is complete, without waiting for
it, so the disk works while the data is still being made and the final fsync finds little left.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import BinaryIO

WRITEBACK_STEP = 32 << 20
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range, or None where there is none. Why ctypes: Python's `os` module has
    no binding for it, and `posix_fadvise(POSIX_FADV_DONTNEED)`, which also starts writeback,
    drops the pages from the cache, which the hash of the finished blob then reads from disk."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _sync_file_range()


class WritebackFile:
    """`write` to `out` (a file opened for writing, positioned where the writes start), starting
    the writeback of every complete `step` bytes. Only `write` is offered: the writer appends."""

    def __init__(self, out: BinaryIO, step: int = WRITEBACK_STEP) -> None:
        self.out = out
        self.step = step
        self.fd = out.fileno()
        self.start = self.position = out.tell()  # the writeback not yet asked for begins at start

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = self.out.write(data)
        self.position += n
        if self.position - self.start >= self.step and _SYNC_FILE_RANGE is not None:
            self.out.flush()
            # Failure only means the pages go to disk later, at the fsync: not worth an error.
            _SYNC_FILE_RANGE(self.fd, self.start, self.position - self.start, SYNC_FILE_RANGE_WRITE)
            self.start = self.position
        return n
