"""The block codecs and how batches of blocks go through them (compression and decoding).

Speed (benchmarks/bench_zfile.py): at 4 KiB blocks Python overhead per block is comparable to the
codec work, so LZ4 (both ways) and zstd decoding call the system liblz4/libzstd via cffi a batch at
a time, straight between one input and one output buffer: no bytes object per block, CRCs written/checked
in place (reading: one CRC call over block + stored CRC, see crc.STD_CRC_RESIDUE), the per-block
loop driven by `map` where that measured faster (zstd compression stays on python-zstandard, whose
bytes the fixtures pin).
"""

from __future__ import annotations

import array
import collections
import ctypes
import ctypes.util
import functools
import itertools
import logging
import operator
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cffi
import crc32c as _crc32c
import lz4.block
import zstandard

from obdconv.errors import FormatError
from obdconv.formats.crc import STD_CRC_RESIDUE, ZFILE_BLOCK_CRC_SEED
from obdconv.formats.zfile.header import (
    _MASK,
    _STD_BLOCK_SEED,
    _U32,
    ALGO_LZ4,
    ALGO_ZSTD,
    CRC_SIZE,
    ZSTD_LEVEL,
)
from obdconv.native import load_extension

log = logging.getLogger(__name__)

_tls = threading.local()


def _scratch(name: str, size: int) -> bytearray:
    """A per-thread reusable buffer of at least `size` bytes: batch after batch writes into the same
    (already faulted-in, cache-warm) memory instead of allocating and zeroing a fresh one."""
    buf: bytearray | None = getattr(_tls, name, None)
    if buf is None or len(buf) < size:
        buf = bytearray(size)
        setattr(_tls, name, buf)
    return buf


class _SystemLZ4:
    """LZ4_compress_default / LZ4_decompress_safe from the system liblz4, through cffi (ABI mode:
    no compiler needed, ~0.2 us per call, the GIL released inside).

    Why not python-lz4 for compression: it compresses through its streaming API (32-bit hash
    table), so its blocks differ (valid, but not identical) from what the overlaybd tools write with
    LZ4_compress_default, which uses the 16-bit table for inputs < 64 KiB. The system liblz4 (Debian
    liblz4-1) reproduces the reference tools byte for byte (checked on fixture `commit.lsmt.zfile`).
    Decoding through the same library lets a whole batch go straight into one output buffer.
    """

    def __init__(self) -> None:
        self.ffi = cffi.FFI()
        self.ffi.cdef("int LZ4_compress_default(const char* src, char* dst, int srcSize, int dstCapacity);"
                      "int LZ4_compressBound(int inputSize);"
                      "int LZ4_decompress_safe(const char* src, char* dst, int srcSize, int dstCapacity);")
        self.lib = self.ffi.dlopen(ctypes.util.find_library("lz4") or "liblz4.so.1")

    def _compress_batch(self, data: memoryview, block_size: int, bound: int, buf: bytearray, pos: int,
                        lengths: list[int]) -> int:
        """Compress `data` into `buf` from `pos` (room for every block's bound + CRC), appending the
        stored lengths; returns the new end. The per-block Python work is one C call and one list
        append; the CRCs are then computed and written by a `map` pipeline over the batch (no
        bytecode per block, see `_decode_batch_into`)."""
        ffi = self.ffi
        n = len(data)
        mv = memoryview(buf)
        src = ffi.from_buffer(data)
        dst = ffi.from_buffer(buf)
        compress = self.lib.LZ4_compress_default
        starts: list[int] = []
        append = starts.append
        full_end = n - n % block_size
        for off in range(0, full_end, block_size):
            append(pos)
            pos += compress(src + off, dst + pos, block_size, bound) + CRC_SIZE
        if full_end < n:
            append(pos)
            pos += compress(src + full_end, dst + pos, n - full_end, bound) + CRC_SIZE
        repeat = itertools.repeat
        ends = starts[1:]
        ends.append(pos)
        crc_at = list(map(operator.sub, ends, repeat(CRC_SIZE)))
        std_crcs = map(_crc32c.crc32c, map(mv.__getitem__, map(slice, starts, crc_at)), repeat(_STD_BLOCK_SEED))
        collections.deque(map(_U32.pack_into, repeat(buf), crc_at, map(operator.xor, std_crcs, repeat(_MASK))),
                          maxlen=0)  # consumed for the side effect: each raw CRC written after its block
        batch_lengths = list(map(operator.sub, ends, starts))
        # LZ4_compress_default only fails (returns 0) for a too small dstCapacity, which `bound`
        # rules out; a 0 would show as a 4-byte block, checked once here instead of per block.
        if batch_lengths and min(batch_lengths) <= CRC_SIZE:
            raise FormatError(f"LZ4 compression failed at block {batch_lengths.index(min(batch_lengths))} "
                              "of a batch")
        lengths.extend(batch_lengths)
        return pos

    def decode_many(self, srcs: Iterable[object], dsts: Iterable[object], sizes: Iterable[int],
                    want: int) -> list[int]:
        """Decode each (src pointer, compressed size) to its dst pointer (capacity `want`); the
        decoded sizes (negative: corrupt). `map` keeps the per-block loop in C."""
        return list(map(self.lib.LZ4_decompress_safe, srcs, dsts, sizes, itertools.repeat(want)))


class _SystemZstdDecoder:
    """ZSTD_decompressDCtx from the system libzstd through cffi, so that a batch of blocks decodes
    straight into one output buffer like LZ4 (python-zstandard returns a new bytes per block).
    Decoding only: any valid frame decodes the same, whatever the library version. Compression
    stays on python-zstandard, whose output the fixtures pin byte for byte."""

    _ERROR_FLOOR = (1 << 64) - 120  # ZSTD_isError(): sizes in the top 120 values are error codes

    def __init__(self) -> None:
        self.ffi = cffi.FFI()
        self.ffi.cdef("void* ZSTD_createDCtx(void); size_t ZSTD_freeDCtx(void* dctx);"
                      "size_t ZSTD_decompressDCtx(void* dctx, void* dst, size_t dstCapacity,"
                      "                           const void* src, size_t srcSize);")
        self.lib = self.ffi.dlopen(ctypes.util.find_library("zstd") or "libzstd.so.1")

    def _dctx(self) -> object:
        # A DCtx is not thread safe: one per thread, freed with the thread's locals.
        d = getattr(_tls, "zstd_dctx", None)
        if d is None:
            d = _tls.zstd_dctx = self.ffi.gc(self.lib.ZSTD_createDCtx(), self.lib.ZSTD_freeDCtx)
        return d

    def decode_many(self, srcs: Iterable[object], dsts: Iterable[object], sizes: Iterable[int],
                    want: int) -> list[int]:
        """As `_SystemLZ4.decode_many` (error codes show as sizes != `want`)."""
        dctx = self._dctx()
        return list(map(self.lib.ZSTD_decompressDCtx, itertools.repeat(dctx), dsts, itertools.repeat(want),
                        srcs, sizes))


def _decode_batch_into(codec: _SystemLZ4 | _SystemZstdDecoder, stored: bytes | memoryview,
                       offsets: Sequence[int], base: int, first: int, last: int, out: bytes | bytearray | memoryview,
                       out_pos: int, block_size: int, verify: bool) -> int:
    """Decode blocks [first, last) (compressed bytes `stored`, which start at file offset `base`)
    straight into `out` from `out_pos`; returns the index of the first block that fails its CRC or
    does not decode to its full size, or `last`. Every block but the file's last is full; the
    caller makes `out` end where block `last - 1` does.

    Why it is written with `map`: at 4 KiB LZ4 blocks the codec needs ~1.2 us per block, and a
    Python `for` loop around its two C calls (CRC, decode) added ~1 us; driving the calls with
    map/itertools over precomputed offset lists removes the bytecode per block (measured ~0.16
    us/block less, the difference between 0.75 and 0.8 of the bare codec loop).
    """
    ffi = codec.ffi
    src, dst, mv = ffi.from_buffer(stored), ffi.from_buffer(out), memoryview(stored)
    rel = list(map(operator.sub, offsets[first : last + 1], itertools.repeat(base)))
    starts, ends = rel[:-1], rel[1:]
    count = len(starts)
    good = count
    if verify:
        # One CRC call per block over block + stored CRC (see STD_CRC_RESIDUE).
        sums = list(map(_crc32c.crc32c, map(mv.__getitem__, map(slice, starts, ends)),
                        itertools.repeat(_STD_BLOCK_SEED)))
        if sums.count(STD_CRC_RESIDUE) != count:
            good = next(k for k, v in enumerate(sums) if v != STD_CRC_RESIDUE)
    crc_size = CRC_SIZE if verify else 0
    full = min(good, (len(out) - out_pos) // block_size)  # the file's short last block goes alone
    sizes = map(operator.sub, ends[:full], starts[:full])
    if crc_size:
        sizes = map(operator.sub, sizes, itertools.repeat(crc_size))
    decoded = codec.decode_many(map(src.__add__, starts[:full]),
                                map(dst.__add__, range(out_pos, out_pos + full * block_size, block_size)),
                                sizes, block_size)
    if decoded.count(block_size) != full:
        return first + next(k for k, v in enumerate(decoded) if v != block_size)
    if full < good:
        want = len(out) - out_pos - full * block_size
        a = starts[full]
        if codec.decode_many([src + a], [dst + out_pos + full * block_size], [ends[full] - a - crc_size],
                             want) != [want]:
            return first + full
    return first + good


# The ABI-mode bindings are made on first use: cffi parses their declarations with pycparser,
# whose import and parse cost every process (the CLI, each worker) ~0.2 s, and a conversion that
# compresses through the C fast path never needs them.
@functools.cache
def system_lz4() -> _SystemLZ4:
    return _SystemLZ4()


@functools.cache
def system_zstd_decoder() -> _SystemZstdDecoder | None:
    try:
        return _SystemZstdDecoder()
    except OSError:  # no system libzstd: ZFileReader falls back to python-zstandard per block
        return None


_fast = load_extension("obdconv.formats._formatsfast", "OBDCONV_FORMATS_NO_FAST", log,
                       "compressing LZ4 blocks in a Python loop (slower; the GIL is held between blocks). "
                       "Reinstall with gcc present to build it.")


def _zstd_compressor() -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not thread safe: one per thread. Level 3 with the content size and
    # no checksum/dict id is what ZSTD_compress(level 3) writes.
    c = getattr(_tls, "zc", None)
    if c is None:
        c = _tls.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=False,
                                               write_dict_id=False)
    return c


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "zd", None)
    if d is None:
        d = _tls.zd = zstandard.ZstdDecompressor()
    return d


def compressed_bound(algo: int, block_size: int, size: int) -> int:
    """Room `compress_into` needs for `size` payload bytes: every block's worst case + its CRC."""
    if algo == ALGO_LZ4:
        bound = block_size + block_size // 255 + 16  # LZ4_COMPRESSBOUND
    else:  # ZSTD_COMPRESSBOUND, plus slack for the frame header
        bound = block_size + (block_size >> 8) + ((128 << 10) - block_size >> 11) + 64
    return -(-size // block_size) * (bound + CRC_SIZE)


def compress_into(algo: int, data: memoryview, block_size: int, out: bytearray, pos: int,
                  lengths: list[int]) -> int:
    """Compress `data` (whole blocks; the last may be short) into `out` from `pos`, each block
    followed by its CRC, appending each block's stored length to `lengths`; returns the new end.
    `out` must have `compressed_bound` room after `pos`.

    LZ4 goes through the C fast path when it is built (one call per batch, the GIL released for
    all of it), else a Python loop over the same liblz4 calls. zstd compresses with
    python-zstandard's `multi_compress_to_buffer` (one call per batch; the same frames as
    `compress` per block, which the fixtures pin)."""
    n = len(data)
    if not n:
        return pos
    if algo == ALGO_LZ4:
        if _fast is not None:
            return _fast_lz4_into(data, block_size, out, pos, lengths)
        lz4_lib = system_lz4()
        bound = lz4_lib.lib.LZ4_compressBound(block_size)
        for o in range(0, n, FALLBACK_BATCH):
            pos = lz4_lib._compress_batch(data[o:o + FALLBACK_BATCH], block_size, bound, out, pos, lengths)
        return pos
    return _zstd_into(data, block_size, out, pos, lengths)


FALLBACK_BATCH = 1 << 20  # payload bytes per `map` pass of the Python LZ4 loop (its CRC pass reads cached output)


def _fast_lz4_into(data: memoryview, block_size: int, out: bytearray, pos: int, lengths: list[int]) -> int:
    ffi, lib = _fast.ffi, _fast.lib  # type: ignore[union-attr]
    count = -(-len(data) // block_size)
    found = array.array("I", bytes(4 * count))
    end = lib.obd_lz4_blocks(ffi.from_buffer(data), len(data), block_size, ZFILE_BLOCK_CRC_SEED,
                             ffi.from_buffer(out) + pos, len(out) - pos, ffi.from_buffer("uint32_t[]", found))
    if end < 0:
        raise FormatError("LZ4 compression failed (output buffer too small)" if end == lib.OBD_ERR_ROOM
                          else "LZ4 compression failed")
    lengths.extend(found)
    return pos + end


def _zstd_into(data: memoryview, block_size: int, out: bytearray, pos: int, lengths: list[int]) -> int:
    zc = _zstd_compressor()
    pieces = [data[o:o + block_size] for o in range(0, len(data), block_size)]
    multi = getattr(zc, "multi_compress_to_buffer", None)
    frames: Iterable[Any] = multi(pieces, threads=1) if multi is not None else map(zc.compress, pieces)
    mv = memoryview(out)
    crc = _crc32c.crc32c
    seed = _STD_BLOCK_SEED
    pack_into = _U32.pack_into
    for frame in frames:
        n = len(frame)
        mv[pos:pos + n] = frame
        pack_into(out, pos + n, crc(frame, seed) ^ _MASK)
        pos += n + CRC_SIZE
        lengths.append(n + CRC_SIZE)
    return pos


def _compress_packed(algo: int, data: memoryview, block_size: int) -> tuple[bytes, list[int]]:
    """(the stored blocks of `data` back to back, their stored lengths), through a per-thread
    scratch buffer copied out once."""
    buf = _scratch("packed_out", compressed_bound(algo, block_size, len(data)))
    lengths: list[int] = []
    end = compress_into(algo, data, block_size, buf, 0, lengths)
    return bytes(memoryview(buf)[:end]), lengths


_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _shared_pool(threads: int) -> ThreadPoolExecutor:
    with _pool_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="zfile")
        return pool


def default_threads() -> int:
    """Threads used when a caller does not say: $OBDCONV_ZFILE_THREADS, else 1.

    Why 1: measured with benchmarks/bench_zfile.py on the shared 2-core machine, a second thread
    gains 0-30 % when a core happens to be idle and loses as much when it is not; the pipeline
    already runs layers in parallel processes (and Celery workers), which use the cores without
    GIL hand-offs. Set the variable (or pass `threads=`) on idle many-core hosts, where zstd in
    particular gains from threads.
    """
    try:
        return max(1, int(os.environ.get("OBDCONV_ZFILE_THREADS", "1")))
    except ValueError:
        return 1



def decompress_block(algo: int, stored: bytes | memoryview, raw_size: int, verify: bool = True,
                     what: str = "ZFile block") -> bytes:
    """Check the CRC (if `verify`) and decompress one stored block to exactly `raw_size` bytes."""
    if verify:
        if len(stored) <= CRC_SIZE:
            raise FormatError(f"{what}: stored length {len(stored)} too short")
        body = stored[:-CRC_SIZE]
        want = int.from_bytes(stored[-CRC_SIZE:], "little")
        got = _crc32c.crc32c(body, _STD_BLOCK_SEED) ^ _MASK
        if got != want:
            raise FormatError(f"{what}: CRC mismatch (stored 0x{want:08x}, computed 0x{got:08x})")
    else:
        body = stored
    try:
        if algo == ALGO_LZ4:
            raw = lz4.block.decompress(body, uncompressed_size=raw_size)
        elif algo == ALGO_ZSTD:
            raw = _zstd_decompressor().decompress(body, max_output_size=raw_size)
        else:
            raise FormatError(f"{what}: unknown algorithm {algo}")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
        raise FormatError(f"{what}: cannot decompress: {e}") from e
    if len(raw) != raw_size:
        raise FormatError(f"{what}: decompressed to {len(raw)} bytes, expected {raw_size}")
    return raw

