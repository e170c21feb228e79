"""Writing a whole ZFile: streamed (`ZFileWriter`) or in memory (`compress_zfile`)."""

from __future__ import annotations

import io
from typing import BinaryIO

from obdconv.formats.zfile.compress import BlockCompressor
from obdconv.formats.zfile.header import (
    DEFAULT_BLOCK_SIZE,
    HEADER_SPACE,
    INITIAL_HEADER_FLAGS,
    ZFileHeader,
    zfile_parts,
)


class ZFileWriter:
    """Stream a payload into a ZFile written to `out`. With `overwrite_header` (the default, like
    overlaybd-commit -z) `out` must be seekable: the header is rewritten at `close()`."""

    def __init__(self, out: BinaryIO, algorithm: str | int = "lz4", block_size: int = DEFAULT_BLOCK_SIZE,
                 overwrite_header: bool = True, threads: int | None = None,
                 flush_bytes: int = 16 << 20) -> None:
        self._out = out
        self._compressor = BlockCompressor(algorithm, block_size, threads)
        self.algorithm = algorithm
        self.block_size = block_size
        self.overwrite_header = overwrite_header
        self._flush = max(flush_bytes - flush_bytes % block_size, block_size)
        self._buf = bytearray()
        self._lengths: list[int] = []
        self._size = 0
        self._closed = False
        self._start = out.tell() if overwrite_header else 0
        out.write(ZFileHeader(INITIAL_HEADER_FLAGS, block_size=block_size,
                              algo=self._compressor.algo).pack())

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        for packed, lengths in self._compressor.iter_packed(data):
            self._lengths.extend(lengths)
            self._out.write(packed)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a closed ZFileWriter")
        mv = memoryview(data).cast("B")
        n = len(mv)
        self._size += n
        if self._buf:
            take = min(n, self._flush - len(self._buf))
            self._buf += mv[:take]
            mv = mv[take:]
            if len(self._buf) < self._flush:
                return n
            self._emit(self._buf)
            self._buf = bytearray()
        # Whole flush units go to the compressor straight from the caller's buffer (no copy into
        # ours); block boundaries stay at multiples of block_size from the start either way.
        whole = len(mv) - len(mv) % self._flush
        if whole:
            self._emit(mv[:whole])
        self._buf += mv[whole:]
        return n

    def close(self) -> int:
        """Finish the file; returns the ZFile size."""
        if self._closed:
            raise ValueError("ZFileWriter already closed")
        self._closed = True
        if self._buf:
            self._emit(self._buf)
            self._buf = bytearray()
        header, tail = zfile_parts(self._lengths, self._size, self.algorithm, self.block_size,
                                   self.overwrite_header)
        self._out.write(tail)
        total = HEADER_SPACE + sum(self._lengths) + len(tail)
        if self.overwrite_header:
            end = self._out.tell()
            self._out.seek(self._start)
            self._out.write(header)
            self._out.seek(end)
        return total

    def __enter__(self) -> ZFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed and exc[0] is None:
            self.close()


def compress_zfile(data: bytes | bytearray | memoryview, algorithm: str | int = "lz4",
                   block_size: int = DEFAULT_BLOCK_SIZE, overwrite_header: bool = True,
                   threads: int | None = None) -> bytes:
    """A whole ZFile of `data` in memory."""
    buf = io.BytesIO()
    with ZFileWriter(buf, algorithm, block_size, overwrite_header, threads) as w:
        w.write(data)
    return buf.getvalue()

