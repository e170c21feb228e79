"""Random reads of the uncompressed layer through the gzip blob and its index."""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
from typing import BinaryIO

from obdconv.errors import FormatError
from obdconv.formats.gzindex.inflate import (
    Z_BUF_ERROR,
    Z_NO_FLUSH,
    Z_OK,
    Z_STREAM_END,
    InflateLibrary,
    Inflater,
    MemberChain,
)
from obdconv.formats.gzindex.layout import GzipIndex
from obdconv.formats.source import RandomAccess, as_source


class GzipRandomReader:
    """Random reads of the uncompressed layer through the gzip blob and its index."""

    def __init__(self, blob_f: RandomAccess | BinaryIO | bytes | str, index: GzipIndex | bytes,
                 chunk: int = 65536, readahead: int = 1 << 20, library: InflateLibrary | None = None) -> None:
        self._src = as_source(blob_f)
        self._library = library
        self.index = index if isinstance(index, GzipIndex) else GzipIndex.parse(index)
        self._de = [e.de_pos for e in self.index.entries]
        self._chunk = chunk
        self._readahead = readahead
        # The last decoded range: callers (flatten, the ext4 reader) mostly read ascending offsets
        # close together, and every miss costs inflating from an access point.
        self._cache: tuple[int, bytes] = (0, b"")
        if not self._de:
            raise FormatError("gzip.meta has no access points")

    @property
    def size(self) -> int:
        """Size of the indexed (first) member's output."""
        return self.index.header.uncompress_file_size

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        if length == 0:
            return b""
        start, cached = self._cache
        if start <= offset and offset + length <= start + len(cached):
            return cached[offset - start : offset - start + length]
        data = self._inflate_range(offset, max(length, self._readahead))
        self._cache = (offset, data)
        return data[:length]

    def _inflate_range(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset`, inflated from the nearest access point before it."""
        i = max(bisect.bisect_right(self._de, offset) - 1, 0)
        e = self.index.entries[i]
        z = Inflater(-15, self._library)
        pos = e.en_pos
        if e.bits:
            prev = self._src.pread(pos - 1, 1)
            if len(prev) != 1:
                raise FormatError("gzip blob shorter than its index says")
            z.prime(e.bits, prev[0] >> (8 - e.bits))
        z.set_dictionary(self.index.window(i))
        skip = offset - e.de_pos
        out = bytearray()
        obuf = ctypes.create_string_buffer(self._chunk * 4)
        oaddr = ctypes.addressof(obuf)
        s = z.s
        try:
            while len(out) < length:
                data = self._src.pread(pos, self._chunk)
                if not data:
                    break  # end of blob: a short read
                z.set_input(data)
                ended = False
                while s.avail_in and len(out) < length:
                    s.next_out = oaddr
                    s.avail_out = len(obuf)
                    rc = z.inflate(Z_NO_FLUSH)
                    got = len(obuf) - s.avail_out
                    if got:
                        piece = ctypes.string_at(oaddr, got)
                        if skip >= got:
                            skip -= got
                        else:
                            out += piece[skip:]
                            skip = 0
                    if rc == Z_STREAM_END:
                        ended = True
                        break
                    if rc not in (Z_OK, Z_BUF_ERROR):
                        raise FormatError(f"gzip blob corrupt near input byte {pos}: {z.error(rc)}")
                    if rc == Z_BUF_ERROR and got == 0:
                        break
                consumed = len(data) - s.avail_in
                pos += consumed
                if ended:
                    # Later members: continue with a plain gzip decoder past the member trailer.
                    rest = self._read_later_members(pos, skip, length - len(out))
                    out += rest
                    break
            return bytes(out[:length])
        finally:
            z.close()

    def _read_later_members(self, pos: int, skip: int, length: int) -> bytes:
        chain = MemberChain(b"", trailer_left=8)
        out = bytearray()
        while len(out) < length:
            data = self._src.pread(pos, self._chunk)
            if not data:
                break
            pos += len(data)
            piece = chain.feed(data)
            if skip >= len(piece):
                skip -= len(piece)
                continue
            out += piece[skip:]
            skip = 0
        return bytes(out[:length])
