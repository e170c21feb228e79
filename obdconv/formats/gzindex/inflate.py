"""zlib or zlib-ng inflate through ctypes (why: the package docstring), and the members after the first."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from obdconv.errors import FormatError, UnsupportedError

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

class MultiMemberGzip(UnsupportedError):
    """The gzip blob has data after its first member: `gzip.meta` cannot cover it (module doc)."""

    def __init__(self, first_member_size: int) -> None:
        super().__init__(
            f"the gzip blob has more than one member with data (concatenated gzip streams, as some parallel "
            f"compressors write): the overlaybd runtime's gzip index reader stops at the end of the first member "
            f"(uncompressed byte {first_member_size}), so turboOCI could not read the files after it; convert "
            "this layer to overlaybd (native) instead, or recompress it as one gzip member")
        self.first_member_size = first_member_size


class Inflater:
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



class MemberChain:
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
