"""gzip random-access index: the turboOCI `gzip.meta` file (spec §5), its builder and a reader.

Why ctypes over a zlib C API: building the index needs `inflate(Z_BLOCK)` and the stream's
`data_type` (to stop at deflate block boundaries and learn the bit offset), and reading needs
`inflatePrime` (to restart mid-byte). Python's `zlib` module exposes none of these, and no maintained
package does either, so the few calls are made directly: on zlib-ng's native API from the `zlib-ng`
package when it is installed (twice as fast, see `bundled_zlib_ng`), else on the system zlib
(`OBDCONV_GZINDEX_SYSTEM_ZLIB=1` forces it). `INFLATE_LIBRARY` says which.

One gzip member only: a blob whose later members hold data (concatenated gzip streams, valid per
RFC 1952 and written by some parallel compressors) makes `GzipIndexBuilder` raise `MultiMemberGzip`.
Why refuse instead of indexing every member (docs/ARCHITECTURE.md, Decisions): the overlaybd
runtime's reader (`GzFile::extract`, gzfile.cpp) inflates raw deflate (`inflateInit2(-15)`) from an
access point and stops at the member's end (`Z_STREAM_END`) with a short read, which the LSMT warp
file treats as an I/O error, and its `fstat` size is `uncompress_file_size`, which the reference
index builder (`create_gz_index`, `inflateInit2(47)`) sets to the first member's size. Access points
inside later members would serve reads that stay within one member, but any read crossing a member
boundary (a file's data, or a gzip cache page) would still fail on the runtime. Later members that
inflate to nothing (empty members) and zero padding after the last member are accepted.
`GzipRandomReader.pread` still continues across members (for reading indexes made elsewhere).

Difference from the reference tool, on purpose: a block boundary reported twice by zlib (when an
input chunk ends exactly on it) is recorded once, so the index does not depend on how the input was
chunked.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import logging
import os
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO

from obdconv.errors import FormatError, UnsupportedError
from obdconv.formats.crc import raw_crc32c
from obdconv.formats.rawbytes import uninitialised_bytes
from obdconv.formats.source import BytesSource, RandomAccess, as_source
from obdconv.native import load_extension

MAGIC = b"ddgzidx\x00"
MAJOR_VERSION = 1
MINOR_VERSION = 0
DICT_COMPRESS_ALGO_NONE = 0
DICT_COMPRESS_ALGO_ZLIB = 1
DEFAULT_LEVEL = 6
DEFAULT_SPAN = 1 << 20
MIN_SPAN = 65536  # DEFLATE_BLOCK_UNCOMPRESS_MAX_SIZE
WINSIZE = 32768
OUTPUT_ROOM = 4 << 20  # inflated bytes buffered per copy-out (see GzipIndexBuilder)
EACH_DEFLATE_BLOCK_BIT = 0x80
LAST_DEFLATE_BLOCK_BIT = 0x40

_HEADER = struct.Struct("<8sBBBBBiiiqqqq256sqqI")
HEADER_SIZE = _HEADER.size
assert HEADER_SIZE == 333
_CRC_COVERS = HEADER_SIZE - 4
_ENTRY = struct.Struct("<qqqBI")
ENTRY_SIZE = _ENTRY.size
assert ENTRY_SIZE == 29

# zlib constants
Z_NO_FLUSH = 0
Z_BLOCK = 5
Z_OK = 0
Z_STREAM_END = 1
Z_NEED_DICT = 2
Z_BUF_ERROR = -5


class _ZStreamStruct(ctypes.Structure):
    """zlib's `z_stream`."""

    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint), ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint), ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p), ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int), ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong),
    ]


class _ZngStreamStruct(ctypes.Structure):
    """zlib-ng's native `zng_stream` (zlib-ng.h): `z_stream` with fixed-width counters."""

    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint32), ("total_in", ctypes.c_size_t),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint32), ("total_out", ctypes.c_size_t),
        ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p), ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int), ("adler", ctypes.c_uint32), ("reserved", ctypes.c_ulong),
    ]


@dataclass(frozen=True, slots=True)
class InflateLibrary:
    """The inflate calls the index needs, from one library. `name` says which (for tests/logs)."""

    name: str
    stream: type[ctypes.Structure]
    init: Callable[[Any, int], int]  # (stream ref, window bits) -> rc
    inflate: Callable[[Any, int], int]
    end: Callable[[Any], int]
    prime: Callable[[Any, int, int], int]
    set_dictionary: Callable[[Any, bytes, int], int]


def system_zlib() -> InflateLibrary:
    lib = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1")
    p = ctypes.POINTER(_ZStreamStruct)
    lib.zlibVersion.restype = ctypes.c_char_p
    lib.inflateInit2_.argtypes = [p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.inflate.argtypes = [p, ctypes.c_int]
    lib.inflateEnd.argtypes = [p]
    lib.inflatePrime.argtypes = [p, ctypes.c_int, ctypes.c_int]
    lib.inflateSetDictionary.argtypes = [p, ctypes.c_void_p, ctypes.c_uint]
    version = lib.zlibVersion()
    return InflateLibrary("zlib " + version.decode(), _ZStreamStruct,
                          lambda ref, bits: lib.inflateInit2_(ref, bits, version, ctypes.sizeof(_ZStreamStruct)),
                          lib.inflate, lib.inflateEnd, lib.inflatePrime, lib.inflateSetDictionary)


def bundled_zlib_ng() -> InflateLibrary | None:
    """zlib-ng's native API from the `zlib-ng` package, or None without it.

    Why: zlib-ng inflates about twice as fast as the system zlib (1.2.13 on Debian 12), and the
    turboOCI prepare is bound by this inflate (it must stop at every deflate block, which the
    faster isal decoder cannot: intel/isa-l#254). The package exposes only a Python `zlib` API,
    but its extension module links zlib-ng statically and exports the `zng_*` C functions, so
    they are called through that module's shared object. Deflate block boundaries are a property
    of the stream, so both libraries give the same index (tests/formats check it byte for byte)."""
    try:
        import zlib_ng.zlib_ng as module
    except ImportError:
        return None
    try:
        lib = ctypes.CDLL(module.__file__)
        p = ctypes.POINTER(_ZngStreamStruct)
        lib.zlibng_version.restype = ctypes.c_char_p
        lib.zng_inflateInit2.argtypes = [p, ctypes.c_int32]
        lib.zng_inflate.argtypes = [p, ctypes.c_int32]
        lib.zng_inflateEnd.argtypes = [p]
        lib.zng_inflatePrime.argtypes = [p, ctypes.c_int32, ctypes.c_int32]
        lib.zng_inflateSetDictionary.argtypes = [p, ctypes.c_void_p, ctypes.c_uint32]
        version = lib.zlibng_version().decode()
    except (OSError, AttributeError):  # a build of the package that hides the C symbols
        return None
    if int(version.split(".")[0]) < 2:
        return None  # zng_stream as declared above is zlib-ng 2's
    return InflateLibrary("zlib-ng " + version, _ZngStreamStruct, lib.zng_inflateInit2, lib.zng_inflate,
                          lib.zng_inflateEnd, lib.zng_inflatePrime, lib.zng_inflateSetDictionary)


def _default_library() -> InflateLibrary:
    if os.environ.get("OBDCONV_GZINDEX_SYSTEM_ZLIB") != "1":
        lib = bundled_zlib_ng()
        if lib is not None:
            return lib
    return system_zlib()


INFLATE_LIBRARY = _default_library()

# The builder's inflate loop in C (formats/_fast_impl.c): None without the built extension (or with
# OBDCONV_FORMATS_NO_FAST set), and then the Python loop below does the same calls.
_FAST = load_extension("obdconv.formats._formatsfast", "OBDCONV_FORMATS_NO_FAST", logging.getLogger(__name__),
                       "building gzip indexes with a Python loop per deflate block (slower)")
_MAX_BOUNDS = 4096  # deflate block boundaries one C call may report
_NEVER = (1 << 64) - 1  # "no boundary reported yet" in the C state


class MultiMemberGzip(UnsupportedError):
    """The gzip blob has data after its first member: `gzip.meta` cannot cover it (module doc)."""

    def __init__(self, first_member_size: int) -> None:
        super().__init__(
            f"the gzip blob has more than one member with data (concatenated gzip streams, as some parallel "
            f"compressors write): the overlaybd runtime's gzip index reader stops at the end of the first member "
            f"(uncompressed byte {first_member_size}), so turboOCI could not read the files after it; convert "
            "this layer to overlaybd (native) instead, or recompress it as one gzip member")
        self.first_member_size = first_member_size


class _Inflater:
    """One (z|zng)_stream. Input is held by reference while the library points into it."""

    def __init__(self, window_bits: int, library: InflateLibrary | None = None) -> None:
        self.lib = library or INFLATE_LIBRARY
        self.s = self.lib.stream()
        self._ref = ctypes.byref(self.s)
        self._alive = False
        rc = self.lib.init(self._ref, window_bits)
        if rc != Z_OK:
            raise FormatError(f"{self.lib.name}: inflateInit2 failed ({rc})")
        self._input: bytes = b""
        self._alive = True

    def set_input(self, data: bytes) -> None:
        self._input = data
        self.s.next_in = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
        self.s.avail_in = len(data)

    def inflate(self, flush: int) -> int:
        return int(self.lib.inflate(self._ref, flush))

    def prime(self, bits: int, value: int) -> None:
        if self.lib.prime(self._ref, bits, value) != Z_OK:
            raise FormatError(f"{self.lib.name}: inflatePrime failed")

    def set_dictionary(self, window: bytes) -> None:
        if self.lib.set_dictionary(self._ref, window, len(window)) != Z_OK:
            raise FormatError(f"{self.lib.name}: inflateSetDictionary failed")

    def error(self, rc: int) -> str:
        msg = self.s.msg.decode("ascii", "replace") if self.s.msg else ""
        return f"zlib error {rc}{': ' + msg if msg else ''}"

    def close(self) -> None:
        if self._alive:
            self.lib.end(self._ref)
            self._alive = False

    def __del__(self) -> None:
        self.close()


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


class _Recorder:
    """IndexFilterRecorder: picks, for each multiple of span, the last block boundary at or before
    it (and every boundary landing exactly on one). Windows are callables, called only for the
    boundaries that become access points (most boundaries are passed over); `freeze` copies the
    pending candidate's window before the builder overwrites the bytes it reads."""

    def __init__(self, span: int, add: Callable[[int, int, int, bytes], None]) -> None:
        self.span = span
        self.expected = 0
        self.last: tuple[int, int, int, Callable[[], bytes]] | None = None
        self._add = add

    def freeze(self) -> None:
        if self.last is not None:
            window = self.last[3]()
            self.last = (*self.last[:3], lambda: window)

    def record_many(self, flat: list[int], window_at: Callable[[int], bytes]) -> None:
        """`record` of each (bits, en_pos, de_pos, buffer position) in `flat` (4 numbers each, in
        order of de_pos, which only grows): the boundaries before the next span multiple only
        replace `last`, so only the last of each such run is looked at."""
        de = flat[2::4]
        n, i = len(de), 0
        while i < n:
            j = bisect.bisect_left(de, self.expected, i)
            if j > i:
                k = 4 * (j - 1)
                self.last = (flat[k], flat[k + 1], flat[k + 2], partial(window_at, flat[k + 3]))
            if j == n:
                return
            k = 4 * j
            self.record(flat[k], flat[k + 1], flat[k + 2], partial(window_at, flat[k + 3]))
            i = j + 1

    def record(self, bits: int, en_pos: int, de_pos: int, window: Callable[[], bytes]) -> None:
        if de_pos < self.expected:
            self.last = (bits, en_pos, de_pos, window)
            return
        if de_pos > self.expected:
            if self.last is not None:
                b, e, d, w = self.last
                self._add(b, e, d, w())
                self.last = None
            self.last = (bits, en_pos, de_pos, window)
            while self.expected < de_pos:
                self.expected += self.span
        if de_pos == self.expected:
            self.last = None
            self._add(bits, en_pos, de_pos, window())
            self.expected += self.span


class GzipIndexBuilder:
    """Feed a gzip blob in order; get its inflated bytes back and, at the end, its `gzip.meta`."""

    def __init__(self, span: int = DEFAULT_SPAN, level: int = DEFAULT_LEVEL,
                 library: InflateLibrary | None = None) -> None:
        if span < MIN_SPAN:
            raise FormatError(f"gzip index span {span} is below the minimum {MIN_SPAN}")
        self.span = span
        self.level = level
        self._z = _Inflater(47, library)  # 32 + 15: gzip or zlib header auto-detected, as the tool does
        # Output goes into one large buffer: WINSIZE bytes of history, then room for OUTPUT_ROOM new
        # bytes. Each feed returns its output with one copy (not one per deflate block), and the
        # window of an access point is simply the WINSIZE bytes before the current position. When
        # the room is used up, the last WINSIZE bytes move to the front. The history starts as
        # zeros, as the reference's window buffer does.
        self._pos = WINSIZE  # next output byte goes to _buf[_pos]
        self.total_in = 0
        self.total_out = 0
        self.first_member_size: int | None = None
        self._tail: _MemberChain | None = None
        # Each access point's window is deflated by a helper thread (zlib releases the GIL), off
        # the inflate loop, which bounds a turboOCI prepare; the bytes are the same.
        self._windows: list[Future[bytes]] = []
        self._deflater: ThreadPoolExecutor | None = None
        self._entries: list[tuple[int, int, int, int]] = []  # (de_pos, en_pos, bits, window index)
        self._last_reported = -1
        self._recorder = _Recorder(span, self._add_entry)
        self._fast = _FAST
        if self._fast is not None:
            ffi = self._fast.ffi
            stream = type(self._z.s)
            self._fields = ffi.new("struct obd_zfields *", {
                name: getattr(stream, name).offset for name in ("next_in", "avail_in", "next_out", "avail_out",
                                                                  "data_type")})
            self._state = ffi.new("struct obd_inflate_state *")
            self._bounds = ffi.new("uint64_t[]", 4 * _MAX_BOUNDS)
            self._inflate_fn = ffi.cast("void *", ctypes.cast(self._z.lib.inflate, ctypes.c_void_p).value)
            self._strm = ffi.cast("void *", ctypes.addressof(self._z.s))
        self._set_buffer(uninitialised_bytes(WINSIZE + OUTPUT_ROOM))
        ctypes.memset(self._buf_addr, 0, WINSIZE)  # the history starts as zeros, as the reference's

    def _add_entry(self, bits: int, en_pos: int, de_pos: int, window: bytes) -> None:
        self._entries.append((de_pos, en_pos, bits, len(self._windows)))
        if self._deflater is None:
            self._deflater = ThreadPoolExecutor(1, thread_name_prefix="gzindex-window")
        self._windows.append(self._deflater.submit(zlib.compress, window, self.level))

    def _window_at(self, pos: int) -> bytes:
        """The 32 KiB of output before position `pos` of the current buffer (zeros before the
        start); valid until the next buffer (the builder freezes the recorder's candidate first)."""
        return bytes(self._view[pos - WINSIZE:pos])

    def feed(self, compressed: bytes | bytearray | memoryview) -> bytes:
        """Inflate the next piece of the blob; returns the bytes it decompressed to."""
        pieces = self.feed_pieces(compressed)
        return pieces[0] if len(pieces) == 1 and isinstance(pieces[0], bytes) else b"".join(pieces)

    def feed_pieces(self, compressed: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        """`feed` without joining: the output as views of the builder's buffers (no copy; they
        stay valid and unchanged for as long as they are held) and bytes of later members."""
        data = bytes(compressed)
        if self._tail is not None:
            return [self._after_first_member(data)]
        self._z.set_input(data)
        if self._fast is not None:
            return self._feed_fast(data)
        return self._feed_python(data)

    def _new_room(self, out: list[bytes | memoryview], emitted: int) -> None:
        """The output buffer is full: hand out what is not yet, and continue in a fresh one that
        starts with the last WINSIZE bytes as its history (the full one is never written again,
        so the views handed out of it stay as they are)."""
        end = WINSIZE + OUTPUT_ROOM
        out.append(self._view[emitted:end])
        self._recorder.freeze()  # its pending window reads the current buffer
        old_addr = self._buf_addr
        self._set_buffer(uninitialised_bytes(end))
        ctypes.memmove(self._buf_addr, old_addr + end - WINSIZE, WINSIZE)

    def _set_buffer(self, buf: bytes) -> None:
        """Inflate into `buf` from now on: a bytes object filled in place (rawbytes.py), each
        stretch before it is handed out as a view (so nothing is zeroed or copied first)."""
        self._buf = buf
        self._view = memoryview(buf)
        self._buf_addr = ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value or 0
        if self._fast is not None:
            self._out = self._fast.ffi.cast("uint8_t *", self._buf_addr)

    def _member_end(self, data: bytes, out: list[bytes | memoryview], emitted: int, pos: int,
                    left_in: int) -> list[bytes | memoryview]:
        """The first member ended: the rest of the blob is inflated by a `_MemberChain`."""
        self._pos = pos
        out.append(self._view[emitted:pos])
        self.first_member_size = self.total_out
        self._tail = _MemberChain(data[len(data) - left_in:], trailer_left=0)
        out.append(self._after_first_member(b""))
        return out

    def _feed_python(self, data: bytes) -> list[bytes | memoryview]:
        z = self._z
        out: list[bytes | memoryview] = []
        s = z.s
        end = WINSIZE + OUTPUT_ROOM
        pos = emitted = self._pos
        avail_in = s.avail_in
        # The loop runs once per deflate block (Z_BLOCK): local variables instead of ctypes
        # attribute reads where possible, since it runs tens of thousands of times per layer.
        while avail_in:
            if pos == end:
                self._new_room(out, emitted)
                pos = emitted = WINSIZE
            s.next_out = self._buf_addr + pos
            s.avail_out = end - pos
            rc = z.inflate(Z_BLOCK)
            left_in = s.avail_in
            self.total_in += avail_in - left_in
            avail_in = left_in
            produced = end - pos - s.avail_out
            pos += produced
            self.total_out += produced
            if rc == Z_STREAM_END:
                return self._member_end(data, out, emitted, pos, left_in)
            if rc not in (Z_OK, Z_BUF_ERROR):
                raise FormatError(f"gzip blob is corrupt at input byte {self.total_in}: {z.error(rc)}")
            dt = s.data_type
            if dt & EACH_DEFLATE_BLOCK_BIT and not dt & LAST_DEFLATE_BLOCK_BIT and \
                    self.total_out != self._last_reported:
                self._last_reported = self.total_out
                self._recorder.record(dt & 7, self.total_in, self.total_out, partial(self._window_at, pos))
        self._pos = pos
        if pos > emitted:
            out.append(self._view[emitted:pos])
        return out

    def _feed_fast(self, data: bytes) -> list[bytes | memoryview]:
        """`_feed_python`'s loop with the inflate calls and their bookkeeping in C
        (`obd_inflate_blocks`: up to a buffer of output per call, not a call and a Python step per
        deflate block, and the GIL released meanwhile); the boundaries it found go to the
        recorder afterwards, in one pass (`_Recorder.record_many`)."""
        fast = self._fast
        assert fast is not None
        lib, ffi, st, bounds = fast.lib, fast.ffi, self._state, self._bounds
        z = self._z
        s = z.s
        end = WINSIZE + OUTPUT_ROOM
        out: list[bytes | memoryview] = []
        pos = emitted = self._pos
        while s.avail_in:
            if pos == end:
                self._new_room(out, emitted)
                pos = emitted = WINSIZE
            st.pos, st.total_in, st.total_out = pos, self.total_in, self.total_out
            st.last_reported = self._last_reported if self._last_reported >= 0 else _NEVER
            n = lib.obd_inflate_blocks(self._inflate_fn, self._strm, self._fields, self._out, end, st, bounds,
                                       _MAX_BOUNDS)
            pos, self.total_in, self.total_out = st.pos, st.total_in, st.total_out
            if st.last_reported != _NEVER:
                self._last_reported = st.last_reported
            if n:  # all inside the buffer as it is: no wrap within a call
                self._recorder.record_many(ffi.unpack(bounds, 4 * n), self._window_at)
            rc = st.rc
            if rc == Z_STREAM_END:
                return self._member_end(data, out, emitted, pos, s.avail_in)
            if rc not in (Z_OK, Z_BUF_ERROR):
                raise FormatError(f"gzip blob is corrupt at input byte {self.total_in}: {z.error(rc)}")
        self._pos = pos
        if pos > emitted:
            out.append(self._view[emitted:pos])
        return out

    def _after_first_member(self, data: bytes) -> bytes:
        """Later members are inflated only to find out they hold nothing (see MultiMemberGzip)."""
        assert self._tail is not None and self.first_member_size is not None
        if self._tail.feed(data):
            raise MultiMemberGzip(self.first_member_size)
        return b""

    @property
    def entries(self) -> list[tuple[int, int, int]]:
        """(de_pos, en_pos, bits) of the access points so far."""
        return [(d, e, b) for d, e, b, _ in self._entries]

    def finish(self, gzip_file_size: int) -> bytes:
        """The complete `gzip.meta` for a blob of `gzip_file_size` bytes."""
        if self.first_member_size is None:
            raise FormatError("gzip blob ended before the end of its first member (truncated?)")
        if self._tail is not None:
            self._tail.finish()
        windows = [w.result() for w in self._windows]
        if self._deflater is not None:
            self._deflater.shutdown()
        entries: list[IndexEntry] = []
        pos = HEADER_SIZE
        for de_pos, en_pos, bits, wi in self._entries:
            w = windows[wi]
            entries.append(IndexEntry(de_pos, en_pos, pos, bits, len(w)))
            pos += len(w)
        index_start = pos
        area = zlib.compress(b"".join(e.pack() for e in entries), self.level)
        header = GzipIndexHeader(self.span, len(entries), gzip_file_size, index_start + len(area),
                                 self.first_member_size, index_start, len(area), level=self.level)
        self._z.close()
        return header.pack() + b"".join(windows) + area


class _MemberChain:
    """Inflates the gzip members after the first one (not indexed, but part of the layer)."""

    def __init__(self, pending: bytes, trailer_left: int = 0) -> None:
        self._pending = pending
        self._d: zlib._Decompress | None = None
        # Bytes of the previous member's trailer (CRC32 + ISIZE) still to skip: 8 after a raw
        # inflate, 0 after a gzip-mode inflate (which checks and consumes the trailer itself).
        self._trailer_left = trailer_left

    def feed(self, data: bytes) -> bytes:
        buf = self._pending + data
        self._pending = b""
        out: list[bytes] = []
        while buf:
            if self._d is None:
                if self._trailer_left:
                    k = min(self._trailer_left, len(buf))
                    self._trailer_left -= k
                    buf = buf[k:]
                    continue
                if len(buf) < 2:
                    self._pending = buf
                    break
                if buf[:2] != b"\x1f\x8b":
                    if not buf.strip(b"\x00"):
                        break  # zero padding after the last member, as gzip(1) tolerates
                    raise FormatError("trailing garbage after a gzip member")
                self._d = zlib.decompressobj(31)
            try:
                out.append(self._d.decompress(buf))
            except zlib.error as e:
                raise FormatError(f"gzip blob is corrupt in a later member: {e}") from e
            if self._d.eof:
                buf = self._d.unused_data
                self._d = None
            else:
                buf = b""
        return b"".join(out)

    def finish(self) -> None:
        if self._d is not None:
            raise FormatError("gzip blob ends inside a member (truncated?)")


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
        z = _Inflater(-15, self._library)
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
        chain = _MemberChain(b"", trailer_left=8)
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
