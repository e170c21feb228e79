"""The `gzip.meta` byte layout (spec §5): header, access points, the parsed index."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from obdconv.errors import FormatError
from obdconv.formats.crc import raw_crc32c
from obdconv.formats.source import BytesSource, RandomAccess

MAGIC = b"ddgzidx\x00"
MAJOR_VERSION = 1
MINOR_VERSION = 0
DICT_COMPRESS_ALGO_NONE = 0
DICT_COMPRESS_ALGO_ZLIB = 1
DEFAULT_LEVEL = 6
DEFAULT_SPAN = 1 << 20
MIN_SPAN = 65536  # DEFLATE_BLOCK_UNCOMPRESS_MAX_SIZE
WINSIZE = 32768
EACH_DEFLATE_BLOCK_BIT = 0x80
LAST_DEFLATE_BLOCK_BIT = 0x40

_HEADER = struct.Struct("<8sBBBBBiiiqqqq256sqqI")
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 333
_CRC_COVERS = HEADER_SIZE - 4
_ENTRY = struct.Struct("<qqqBI")
ENTRY_SIZE = _ENTRY.size
assert ENTRY_SIZE == 29


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """An access point: output offset `de_pos`, input offset `en_pos` with `bits` unused bits of the
    previous byte, and its compressed window at `win_pos` (`win_len` bytes) in the index file."""

    de_pos: int
    en_pos: int
    win_pos: int
    bits: int
    win_len: int

    def pack(self) -> bytes:
        return _ENTRY.pack(self.de_pos, self.en_pos, self.win_pos, self.bits, self.win_len)


@dataclass(slots=True)
class GzipIndexHeader:
    span: int
    index_num: int
    gzip_file_size: int
    index_file_size: int
    uncompress_file_size: int
    index_start: int
    index_area_len: int
    dict_compress_algo: int = DICT_COMPRESS_ALGO_ZLIB
    level: int = DEFAULT_LEVEL
    flag: int = 0
    window: int = WINSIZE
    index_size: int = ENTRY_SIZE
    major: int = MAJOR_VERSION
    minor: int = MINOR_VERSION
    crc: int = 0

    def pack(self) -> bytes:
        raw = _HEADER.pack(MAGIC, self.major, self.minor, self.dict_compress_algo, self.level, self.flag,
                           self.span, self.window, self.index_size, self.index_num, self.gzip_file_size,
                           self.index_file_size, self.uncompress_file_size, bytes(256), self.index_start,
                           self.index_area_len, 0)
        return raw[:_CRC_COVERS] + struct.pack("<I", raw_crc32c(raw[:_CRC_COVERS], 0))

    @classmethod
    def unpack(cls, b: bytes) -> GzipIndexHeader:
        if len(b) < HEADER_SIZE:
            raise FormatError(f"gzip.meta: truncated header ({len(b)} bytes, need {HEADER_SIZE})")
        (magic, major, minor, algo, level, flag, span, window, index_size, index_num, gz_size, file_size,
         usize, _res, index_start, area_len, crc) = _HEADER.unpack_from(b, 0)
        if magic != MAGIC:
            raise FormatError("gzip.meta: bad magic (not a gzip index)")
        return cls(span, index_num, gz_size, file_size, usize, index_start, area_len, algo, level, flag,
                   window, index_size, major, minor, crc)

    @classmethod
    def read(cls, src: RandomAccess, file_size: int) -> GzipIndexHeader:
        """The header of the `file_size`-byte gzip.meta `src`, checked in itself and against that
        size. Reads the header only: the windows and access points after it are left unread."""
        b = src.pread(0, HEADER_SIZE)
        h = cls.unpack(b)
        if h.major != MAJOR_VERSION:
            raise FormatError(f"gzip.meta: unsupported version {h.major}.{h.minor}")
        if h.index_size != ENTRY_SIZE:
            raise FormatError(f"gzip.meta: entry size {h.index_size}, expected {ENTRY_SIZE}")
        if raw_crc32c(b[:_CRC_COVERS], 0) != h.crc:
            raise FormatError("gzip.meta: header CRC mismatch")
        if h.window != WINSIZE or h.span < MIN_SPAN:
            raise FormatError(f"gzip.meta: window {h.window} / span {h.span} invalid")
        if h.index_file_size != file_size or h.index_start + h.index_area_len != file_size:
            raise FormatError(f"gzip.meta: sizes do not match the file ({file_size} bytes; header says "
                              f"{h.index_file_size}, index {h.index_start}+{h.index_area_len})")
        if not HEADER_SIZE <= h.index_start <= file_size:
            raise FormatError(f"gzip.meta: index_start {h.index_start} out of range")
        return h



@dataclass
class GzipIndex:
    """A parsed `gzip.meta`."""

    header: GzipIndexHeader
    entries: list[IndexEntry]
    data: bytes

    @classmethod
    def parse(cls, b: bytes) -> GzipIndex:
        h = GzipIndexHeader.read(BytesSource(b), len(b))
        area = b[h.index_start :]
        # Every access point has a window of its own in the window area (at least one byte), so a
        # count beyond the file's size is a lie; checked before inflating, and the inflate is bounded
        # by what that count needs: a crafted index area cannot make a reader allocate more.
        if not 0 <= h.index_num <= h.index_start:
            raise FormatError(f"gzip.meta: {h.index_num} access points cannot fit in {len(b)} bytes")
        expected = h.index_num * ENTRY_SIZE
        if h.dict_compress_algo == DICT_COMPRESS_ALGO_ZLIB:
            raw = _inflate_bounded(area, expected, "index area")
        elif h.dict_compress_algo == DICT_COMPRESS_ALGO_NONE:
            raw = area
        else:
            raise FormatError(f"gzip.meta: unknown dictionary compression {h.dict_compress_algo}")
        if len(raw) != expected:
            raise FormatError(f"gzip.meta: index area holds {len(raw)} bytes, expected {h.index_num} entries")
        entries = [IndexEntry(*t) for t in _ENTRY.iter_unpack(raw)]
        prev = -1
        for e in entries:
            if e.de_pos < prev or e.bits > 7 or e.en_pos < 0:
                raise FormatError(f"gzip.meta: bad access point {e}")
            if e.win_pos < HEADER_SIZE or e.win_pos + e.win_len > h.index_start:
                raise FormatError(f"gzip.meta: window of {e} outside the window area")
            prev = e.de_pos
        return cls(h, entries, b)

    def window(self, i: int) -> bytes:
        e = self.entries[i]
        blob = self.data[e.win_pos : e.win_pos + e.win_len]
        w = (_inflate_bounded(blob, WINSIZE, f"window {i}")
             if self.header.dict_compress_algo == DICT_COMPRESS_ALGO_ZLIB else blob)
        if len(w) != WINSIZE:
            raise FormatError(f"gzip.meta: window {i} is {len(w)} bytes, expected {WINSIZE}")
        return w


def _inflate_bounded(data: bytes, expected: int, what: str) -> bytes:
    """zlib-inflate `data`, which should give `expected` bytes; never more than one byte beyond
    that is produced (the caller's length check then refuses it)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, expected + 1)
    except zlib.error as e:
        raise FormatError(f"gzip.meta: {what} does not decompress: {e}") from e
    return out
