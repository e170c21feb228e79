"""Building `gzip.meta` while inflating the blob once."""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import logging
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

from obdconv.errors import FormatError
from obdconv.formats.gzindex.inflate import (
    Z_BLOCK,
    Z_BUF_ERROR,
    Z_OK,
    Z_STREAM_END,
    InflateLibrary,
    Inflater,
    MemberChain,
    MultiMemberGzip,
)
from obdconv.formats.gzindex.layout import (
    DEFAULT_LEVEL,
    DEFAULT_SPAN,
    EACH_DEFLATE_BLOCK_BIT,
    HEADER_SIZE,
    LAST_DEFLATE_BLOCK_BIT,
    MIN_SPAN,
    WINSIZE,
    GzipIndexHeader,
    IndexEntry,
)
from obdconv.formats.rawbytes import uninitialised_bytes
from obdconv.native import load_extension

OUTPUT_ROOM = 4 << 20  # inflated bytes buffered per copy-out (see GzipIndexBuilder)
# The builder's inflate loop in C (formats/_fast_impl.c): None without the built extension (or with
# OBDCONV_FORMATS_NO_FAST set), and then the Python loop below does the same calls.
_FAST = load_extension("obdconv.formats._formatsfast", "OBDCONV_FORMATS_NO_FAST", logging.getLogger(__name__),
                       "building gzip indexes with a Python loop per deflate block (slower)")
_MAX_BOUNDS = 4096  # deflate block boundaries one C call may report
_NEVER = (1 << 64) - 1  # "no boundary reported yet" in the C state


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
        self._z = Inflater(47, library)  # 32 + 15: gzip or zlib header auto-detected, as the tool does
        # Output goes into one large buffer: WINSIZE bytes of history, then room for OUTPUT_ROOM new
        # bytes. Each feed returns its output with one copy (not one per deflate block), and the
        # window of an access point is simply the WINSIZE bytes before the current position. When
        # the room is used up, the last WINSIZE bytes move to the front. The history starts as
        # zeros, as the reference's window buffer does.
        self._pos = WINSIZE  # next output byte goes to _buf[_pos]
        self.total_in = 0
        self.total_out = 0
        self.first_member_size: int | None = None
        self._tail: MemberChain | None = None
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
        """The first member ended: the rest of the blob is inflated by a `MemberChain`."""
        self._pos = pos
        out.append(self._view[emitted:pos])
        self.first_member_size = self.total_out
        self._tail = MemberChain(data[len(data) - left_in:], trailer_left=0)
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
