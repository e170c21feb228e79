"""ZFile: overlaybd's seekable block compression (spec §2).

Layout: header (512) | blocks, each compressed independently + 4-byte CRC | jump table (u32 stored
length per block) | trailer (512). LZ4 blocks use the raw block format, zstd blocks are one frame at
level 3 with the content size. CRC = rawCRC32C(compressed bytes, seed 100007).

Speed (benchmarks/bench_zfile.py): at 4 KiB blocks Python overhead per block is comparable to the
codec work, so LZ4 (both ways) and zstd decoding call the system liblz4/libzstd via cffi a batch at
a time, straight between one input and one output buffer: no bytes object per block, CRCs written/checked
in place (reading: one CRC call over block + stored CRC, see crc.STD_CRC_RESIDUE), the per-block
loop driven by `map` where that measured faster (zstd compression stays on python-zstandard, whose
bytes the fixtures pin). `BlockCompressor.compress_packed` and
`ZFileReader.preadinto` are the copy-free entry points; threads are optional (`threads=`).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import io
import itertools
import operator
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import cffi
import crc32c as _crc32c
import lz4.block
import zstandard

from obdconv.errors import FormatError
from obdconv.formats.crc import STD_CRC_RESIDUE, ZFILE_BLOCK_CRC_SEED, raw_crc32c
from obdconv.formats.source import RandomAccess, as_source, source_size

MAGIC0 = b"ZFile\x00\x01\x00"
MAGIC1 = b"tuji.yyf@Alibaba"
HEADER_SPACE = 512
HT_STRUCT_SIZE = 96

FLAG_SHIFT_HEADER = 0
FLAG_SHIFT_TYPE = 1
FLAG_SHIFT_SEALED = 2
FLAG_SHIFT_HEADER_OVERWRITE = 3
FLAG_SHIFT_CALC_DIGEST = 4
FLAG_SHIFT_IDX_COMP = 5
FLAG_HEADER = 1 << FLAG_SHIFT_HEADER
FLAG_TYPE_DATA = 1 << FLAG_SHIFT_TYPE
FLAG_SEALED = 1 << FLAG_SHIFT_SEALED
FLAG_HEADER_OVERWRITE = 1 << FLAG_SHIFT_HEADER_OVERWRITE
FLAG_CALC_DIGEST = 1 << FLAG_SHIFT_CALC_DIGEST
FLAG_IDX_COMP = 1 << FLAG_SHIFT_IDX_COMP
KNOWN_FLAG_BITS = 0x3F  # legacy files carry stack garbage above bit 5 (§2.7)

INITIAL_HEADER_FLAGS = 0x13  # overlaybd-zfile, merge, commit --upload
TRAILER_FLAGS = 0x16
OVERWRITE_HEADER_FLAGS = 0x1B  # overlaybd-commit -z

ALGO_LZ4 = 1
ALGO_ZSTD = 2
ALGORITHMS = {"lz4": ALGO_LZ4, "zstd": ALGO_ZSTD}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}
ZSTD_LEVEL = 3  # the compressor's fixed level; the header's `level` stays 0

DEFAULT_BLOCK_SIZE = 4096
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 65536
MAX_STORED_LEN = 65536  # one reader buffer (§2.3)
MAX_INDEX_SIZE = 1_000_000_000
CRC_SIZE = 4

_HT = struct.Struct("<8s16sIIQQQQIIIBBBBIIB7x")
assert _HT.size == HT_STRUCT_SIZE
_DIGEST_OFFSET = 28

_MASK = 0xFFFFFFFF
_U32 = struct.Struct("<I")
_STD_BLOCK_SEED = ZFILE_BLOCK_CRC_SEED ^ _MASK  # raw CRC via the standard-CRC library, inlined for speed


@dataclass(slots=True)
class ZFileHeader:
    """HeaderTrailer (§2.2): 96-byte naturally aligned struct in a 512-byte block."""

    flags: int
    index_offset: int = 0
    index_size: int = 0  # number of blocks
    original_file_size: int = 0
    index_crc: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    algo: int = ALGO_LZ4
    level: int = 0
    use_dict: int = 0
    dict_size: int = 0
    verify: int = 1
    digest: int = 0
    size: int = HT_STRUCT_SIZE
    reserved_0: int = 0
    reserved: int = 0

    @property
    def known_flags(self) -> int:
        return self.flags & KNOWN_FLAG_BITS

    @property
    def is_header(self) -> bool:
        return bool(self.flags & FLAG_HEADER)

    @property
    def has_digest(self) -> bool:
        return bool(self.flags & FLAG_CALC_DIGEST)

    @property
    def is_overwritten(self) -> bool:
        return bool(self.flags & FLAG_HEADER_OVERWRITE)

    @property
    def algorithm(self) -> str:
        return ALGORITHM_NAMES.get(self.algo, f"unknown({self.algo})")

    def _raw(self, digest: int) -> bytes:
        raw = _HT.pack(MAGIC0, MAGIC1, self.size, digest, self.flags, self.index_offset, self.index_size,
                       self.original_file_size, self.index_crc, self.reserved_0, self.block_size, self.algo,
                       self.level, self.use_dict, 0, self.reserved, self.dict_size, self.verify)
        return raw + bytes(HEADER_SPACE - HT_STRUCT_SIZE)

    def pack(self) -> bytes:
        """512 bytes; when the digest flag is set the digest is computed over them (digest field 0)."""
        if not self.has_digest:
            return self._raw(self.digest)
        blank = self._raw(0)
        return self._raw(raw_crc32c(blank, 0))

    @classmethod
    def unpack(cls, b: bytes, what: str = "ZFile header") -> ZFileHeader:
        if len(b) < HEADER_SPACE:
            raise FormatError(f"{what}: truncated ({len(b)} bytes, need {HEADER_SPACE})")
        (m0, m1, size, digest, flags, ioff, isize, orig, icrc, res0, bs, algo, level, use_dict, _pad, res,
         dsize, verify) = _HT.unpack_from(b, 0)
        if m0 != MAGIC0 or m1 != MAGIC1:
            raise FormatError(f"{what}: bad magic (not a ZFile)")
        return cls(flags, ioff, isize, orig, icrc, bs, algo, level, use_dict, dsize, verify, digest, size,
                   res0, res)

    @staticmethod
    def digest_of(b: bytes) -> int:
        blank = bytearray(b[:HEADER_SPACE])
        blank[_DIGEST_OFFSET : _DIGEST_OFFSET + 4] = bytes(4)
        return raw_crc32c(blank, 0)


def is_zfile(head: bytes) -> bool:
    """True if `head` (>= 24 bytes) starts with the ZFile magics."""
    return head[:8] == MAGIC0 and head[8:24] == MAGIC1


def algorithm_id(algorithm: str | int) -> int:
    if isinstance(algorithm, int):
        if algorithm not in ALGORITHM_NAMES:
            raise FormatError(f"unknown ZFile algorithm {algorithm}")
        return algorithm
    try:
        return ALGORITHMS[algorithm.lower()]
    except KeyError:
        raise FormatError(f"unknown ZFile algorithm {algorithm!r} (lz4 or zstd)") from None


def check_block_size(block_size: int) -> None:
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise FormatError(f"ZFile block size {block_size} must be a power of two in [4096, 65536]")


# --------------------------------------------------------------------------------------------
# Compression


_tls = threading.local()


def _scratch(name: str, size: int) -> bytearray:
    """A per-thread reusable buffer of at least `size` bytes: batch after batch writes into the same
    (already faulted-in, cache-warm) memory instead of allocating and zeroing a fresh one."""
    buf: bytearray | None = getattr(_tls, name, None)
    if buf is None or len(buf) < size:
        buf = bytearray(size)
        setattr(_tls, name, buf)
    return buf


# PyBytes_FromStringAndSize(NULL, n) gives a bytes object with *uninitialised* contents that its
# creator must fill before anyone else sees it: the C-API idiom every codec uses to return bytes
# without an extra copy. Readers decode straight into such an object (through cffi) instead of into
# a bytearray that `bytes()` would then copy once more; at 4 KiB LZ4 blocks that copy alone cost
# ~15 % of the read time.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def _uninitialised_bytes(n: int) -> bytes:
    return _new_bytes(None, n) if n > 1 else bytes(n)  # 0/1-byte bytes may be shared singletons


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

    def compress_packed(self, data: memoryview, block_size: int, batch_bytes: int) -> tuple[bytes, list[int]]:
        """(blocks back to back, each followed by its CRC; stored length of each block).

        All of `data` goes compactly into one reused buffer, `batch_bytes` at a time (so the CRC
        pass reads output still in cache), and is copied out once at the end.
        """
        n = len(data)
        bound = self.lib.LZ4_compressBound(block_size)
        buf = _scratch("lz4_out", -(-n // block_size) * (bound + CRC_SIZE))
        pos = 0
        lengths: list[int] = []
        for o in range(0, n, batch_bytes):
            pos = self._compress_batch(data[o : o + batch_bytes], block_size, bound, buf, pos, lengths)
        return bytes(memoryview(buf)[:pos]), lengths

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


_lz4 = _SystemLZ4()
try:
    _zstd_dec: _SystemZstdDecoder | None = _SystemZstdDecoder()
except OSError:  # no system libzstd: ZFileReader falls back to python-zstandard per block
    _zstd_dec = None


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


def _zstd_compress_packed(data: memoryview, block_size: int) -> tuple[bytes, list[int]]:
    """As `_SystemLZ4.compress_packed`, through python-zstandard (~25 us of codec work per 4 KiB
    block, so one bytes object per block costs little)."""
    zc = _zstd_compressor().compress
    crc = _crc32c.crc32c
    seed = _STD_BLOCK_SEED
    pack = _U32.pack
    parts: list[bytes] = []
    add = parts.append
    lengths: list[int] = []
    length = lengths.append
    for off in range(0, len(data), block_size):
        c = zc(data[off : off + block_size])
        add(c)
        add(pack(crc(c, seed) ^ _MASK))
        length(len(c) + CRC_SIZE)
    return b"".join(parts), lengths


def _compress_packed(algo: int, data: memoryview, block_size: int, batch_bytes: int) -> tuple[bytes, list[int]]:
    if algo == ALGO_LZ4:
        return _lz4.compress_packed(data, block_size, batch_bytes)
    return _zstd_compress_packed(data, block_size)


SERIAL_CHUNK = 16 << 20  # payload bytes compressed into one output buffer when single-threaded

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


# --------------------------------------------------------------------------------------------
# Writing


def zfile_parts(lengths: Sequence[int], original_size: int, algorithm: str | int = "lz4",
                block_size: int = DEFAULT_BLOCK_SIZE, overwrite_header: bool = True,
                jump_table: bytes | None = None) -> tuple[bytes, bytes]:
    """(header, tail) around already compressed blocks whose stored lengths (incl. CRC) are `lengths`.

    tail = jump table + trailer. `overwrite_header=True` gives the 0x1B header that carries the
    index fields (overlaybd-commit -z); False gives the initial 0x13 header (overlaybd-zfile).
    """
    algo = algorithm_id(algorithm)
    check_block_size(block_size)
    expected_blocks = -(-original_size // block_size)
    if len(lengths) != expected_blocks:
        raise FormatError(f"{len(lengths)} blocks given for {original_size} bytes at block size {block_size}")
    table = jump_table if jump_table is not None else struct.pack(f"<{len(lengths)}I", *lengths)
    index_offset = HEADER_SPACE + sum(lengths)
    index_crc = raw_crc32c(table, 0)
    common = dict(index_offset=index_offset, index_size=len(lengths), original_file_size=original_size,
                  index_crc=index_crc, block_size=block_size, algo=algo)
    trailer = ZFileHeader(TRAILER_FLAGS, **common).pack()  # type: ignore[arg-type]
    if overwrite_header:
        header = ZFileHeader(OVERWRITE_HEADER_FLAGS, **common).pack()  # type: ignore[arg-type]
    else:
        header = ZFileHeader(INITIAL_HEADER_FLAGS, block_size=block_size, algo=algo).pack()
    return header, table + trailer


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


# --------------------------------------------------------------------------------------------
# Reading


class ZFileReader:
    """Random access to a ZFile's payload. Every block read is CRC-checked (when the file says
    verify=1); a mismatch raises FormatError, never returns wrong bytes."""

    def __init__(self, f: RandomAccess | BinaryIO | str | os.PathLike[str], size: int | None = None,
                 threads: int | None = None) -> None:
        self._src = as_source(f)
        file_size = source_size(self._src) if size is None else size
        if file_size < 2 * HEADER_SPACE:
            raise FormatError(f"ZFile too small: {file_size} bytes")
        head = self._src.pread(0, HEADER_SPACE)
        self.header = ZFileHeader.unpack(head)
        h = self.header
        if not h.is_header:
            raise FormatError(f"ZFile header flags 0x{h.flags:x}: header bit not set")
        if h.has_digest and ZFileHeader.digest_of(head) != h.digest:
            raise FormatError("ZFile header digest mismatch (header corrupt)")
        self.trailer: ZFileHeader | None = None
        if h.is_overwritten:
            info = h  # the header carries the final index info; the trailer is never read
        else:
            trailer_offset = file_size - HEADER_SPACE
            info = self.trailer = ZFileHeader.unpack(self._src.pread(trailer_offset, HEADER_SPACE), "ZFile trailer")
            tf = info.known_flags
            if tf & FLAG_HEADER or not tf & FLAG_TYPE_DATA or not tf & FLAG_SEALED:
                raise FormatError(f"ZFile trailer flags 0x{info.flags:x}: not a sealed trailer (truncated file?)")
            if info.index_size * 4 > trailer_offset - info.index_offset or info.index_offset > trailer_offset:
                raise FormatError(f"ZFile jump table ({info.index_size} entries at {info.index_offset}) "
                                  f"overlaps the trailer at {trailer_offset}")
        self.info = info
        if info.index_size > MAX_INDEX_SIZE:
            raise FormatError(f"ZFile index_size {info.index_size} exceeds {MAX_INDEX_SIZE}")
        if info.known_flags & FLAG_IDX_COMP:
            raise FormatError("ZFile says its index is compressed, which no tool implements")
        check_block_size(info.block_size)
        if info.algo not in ALGORITHM_NAMES:
            raise FormatError(f"ZFile algorithm {info.algo} not supported (1 = lz4, 2 = zstd)")
        self.block_size = info.block_size
        self.algo = info.algo
        self.verify_crc = bool(info.verify)
        self.size = info.original_file_size
        nblocks = info.index_size
        if nblocks != -(-self.size // self.block_size):
            raise FormatError(f"ZFile has {nblocks} blocks for {self.size} bytes at block size {self.block_size}")
        if info.index_offset + nblocks * 4 > file_size:
            raise FormatError(f"ZFile jump table beyond end of file ({file_size} bytes; truncated?)")
        table = self._src.pread(info.index_offset, nblocks * 4)
        if len(table) != nblocks * 4:
            raise FormatError("ZFile jump table truncated")
        if info.known_flags & FLAG_CALC_DIGEST and raw_crc32c(table, 0) != info.index_crc:
            raise FormatError("ZFile jump table CRC mismatch")
        self.lengths = list(struct.unpack(f"<{nblocks}I", table))
        minimum = CRC_SIZE + 1 if self.verify_crc else 1
        for i, n in enumerate(self.lengths):
            if n < minimum or n > MAX_STORED_LEN:
                raise FormatError(f"ZFile block {i}: stored length {n} out of range [{minimum}, {MAX_STORED_LEN}]")
        data_start = HEADER_SPACE + info.dict_size
        self.offsets = list(itertools.accumulate(self.lengths, initial=data_start))
        if self.offsets[-1] > info.index_offset:
            raise FormatError(f"ZFile blocks end at {self.offsets[-1]}, past the jump table at {info.index_offset}")
        self.threads = default_threads() if threads is None else threads
        self._cache: tuple[int, bytes] = (-1, b"")

    @property
    def block_count(self) -> int:
        return len(self.lengths)

    def raw_block_size(self, i: int) -> int:
        return min(self.block_size, self.size - i * self.block_size)

    def read_block(self, i: int) -> bytes:
        if not 0 <= i < len(self.lengths):
            raise IndexError(f"ZFile block {i} out of range (0..{len(self.lengths) - 1})")
        cached = self._cache
        if cached[0] == i:
            return cached[1]
        stored = self._src.pread(self.offsets[i], self.lengths[i])
        if len(stored) != self.lengths[i]:
            raise FormatError(f"ZFile block {i}: truncated file")
        raw = decompress_block(self.algo, stored, self.raw_block_size(i), self.verify_crc, f"ZFile block {i}")
        self._cache = (i, raw)
        return raw

    def _decode_range(self, first: int, stored: memoryview, base: int, last: int) -> list[bytes]:
        """Decode blocks [first, last) from `stored` (bytes from file offset `base`).

        The hot loop of every read: kept to one CRC call and one codec call per block; the error
        path re-runs `decompress_block` to build the precise message.
        """
        offsets = self.offsets
        crc = _crc32c.crc32c
        seed = _STD_BLOCK_SEED
        verify = self.verify_crc
        bs = self.block_size
        unpack_from = _U32.unpack_from
        out: list[bytes] = []
        append = out.append
        if self.algo == ALGO_LZ4:
            dec = lz4.block.decompress
            err: tuple[type[Exception], ...] = (lz4.block.LZ4BlockError,)
        else:
            zdec = _zstd_decompressor().decompress

            def dec(body: memoryview, uncompressed_size: int) -> bytes:
                return zdec(body, max_output_size=uncompressed_size)

            err = (zstandard.ZstdError,)
        for i in range(first, last):
            a, b = offsets[i] - base, offsets[i + 1] - base
            if verify:
                b -= CRC_SIZE
                if crc(stored[a:b], seed) ^ _MASK != unpack_from(stored, b)[0]:
                    break
            try:
                raw = dec(stored[a:b], uncompressed_size=bs)
            except err:
                break
            if len(raw) != bs and (i != len(self.lengths) - 1 or len(raw) != self.raw_block_size(i)):
                break
            append(raw)
        else:
            return out
        i = first + len(out)
        a, b = offsets[i] - base, offsets[i + 1] - base
        decompress_block(self.algo, stored[a:b], self.raw_block_size(i), verify, f"ZFile block {i}")
        raise FormatError(f"ZFile block {i}: cannot decode")  # unreachable unless the codec is flaky

    def _decoder(self) -> _SystemLZ4 | _SystemZstdDecoder | None:
        return _lz4 if self.algo == ALGO_LZ4 else _zstd_dec

    def _decode_into(self, first: int, last: int, out: bytes | bytearray | memoryview) -> None:
        """Decode blocks [first, last) into `out`, which is exactly their raw size: one read for the
        compressed range, then batches of C calls (split over threads when configured)."""
        decoder = self._decoder()
        assert decoder is not None
        base = self.offsets[first]
        stored = self._stored(base, self.offsets[last] - base)
        bs, offsets, verify = self.block_size, self.offsets, self.verify_crc
        batch = 1024
        starts = range(first, last, batch)

        def run(s: int) -> int:
            return _decode_batch_into(decoder, stored, offsets, base, s, min(s + batch, last), out,
                                      (s - first) * bs, bs, verify)

        if self.threads <= 1 or len(starts) == 1:
            results = [run(s) for s in starts]
        else:
            results = list(_shared_pool(self.threads).map(run, starts))
        for s, stop in zip(starts, results, strict=True):
            if stop != min(s + batch, last):
                # Build the precise message (CRC, codec error or short block) the slow way.
                a, b = offsets[stop] - base, offsets[stop + 1] - base
                decompress_block(self.algo, stored[a:b], self.raw_block_size(stop), verify, f"ZFile block {stop}")
                raise FormatError(f"ZFile block {stop}: cannot decode")  # unreachable unless the codec is flaky

    def _stored(self, offset: int, length: int) -> bytes | memoryview:
        """The compressed bytes at `offset`: a view when the source can give one (in-memory ZFiles,
        no copy), else one pread."""
        view = getattr(self._src, "pread_view", None)
        stored = view(offset, length) if view is not None else self._src.pread(offset, length)
        if len(stored) != length:
            raise FormatError("ZFile truncated inside the block area")
        return stored

    def _raw_span(self, first: int, last: int) -> int:
        return min(last * self.block_size, self.size) - first * self.block_size

    def read_blocks(self, first: int, last: int) -> bytes:
        """Raw bytes of blocks [first, last)."""
        if first >= last:
            return b""
        if last - first == 1:
            return self.read_block(first)
        if self._decoder() is None:
            base = self.offsets[first]
            stored = self._src.pread(base, self.offsets[last] - base)
            if len(stored) != self.offsets[last] - base:
                raise FormatError("ZFile truncated inside the block area")
            return b"".join(self._decode_range(first, memoryview(stored), base, last))
        out = _uninitialised_bytes(self._raw_span(first, last))
        self._decode_into(first, last, out)  # fills every byte, or raises and `out` is dropped
        return out

    def preadinto(self, offset: int, buf: bytearray | memoryview) -> int:
        """Read up to len(buf) payload bytes at `offset` into `buf` (a writable buffer); returns the
        count, short only at the end of the payload. Block-aligned reads decode straight into `buf`."""
        if offset < 0:
            raise ValueError("negative offset")
        target = memoryview(buf).cast("B")
        end = min(offset + len(target), self.size)
        if offset >= end:
            return 0
        n = end - offset
        first, last = offset // self.block_size, -(-end // self.block_size)
        aligned = offset % self.block_size == 0 and (end % self.block_size == 0 or end == self.size)
        if aligned and last - first > 1 and self._decoder() is not None:
            self._decode_into(first, last, target[:n])
        else:
            skip = offset - first * self.block_size
            target[:n] = memoryview(self.read_blocks(first, last))[skip : skip + n]
        return n

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        first, last = offset // self.block_size, -(-end // self.block_size)
        data = self.read_blocks(first, last)
        skip = offset - first * self.block_size
        if skip == 0 and len(data) == end - offset:
            return data  # the common aligned case: no extra copy
        return data[skip : skip + end - offset]

    def verify(self) -> None:
        """Check every block's CRC and that it decompresses (FormatError on the first bad one)."""
        chunk = 4096 * self.block_size
        buf = bytearray(min(chunk, self.size))
        for off in range(0, self.size, chunk):
            self.preadinto(off, buf)

    def decompress_to(self, out: BinaryIO, chunk_blocks: int = 4096) -> None:
        """Write the whole payload to `out`, decoding chunk by chunk into one reused buffer."""
        chunk = chunk_blocks * self.block_size
        buf = bytearray(min(chunk, self.size))
        for off in range(0, self.size, chunk):
            n = self.preadinto(off, buf)
            out.write(memoryview(buf)[:n])
