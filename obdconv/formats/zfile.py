"""ZFile: overlaybd's seekable block compression (spec §2).

Layout: header (512) | blocks, each compressed independently + 4-byte CRC | jump table (u32 stored
length per block) | trailer (512). LZ4 blocks use the raw block format, zstd blocks are one frame at
level 3 with the content size. CRC = rawCRC32C(compressed bytes, seed 100007).

Speed: at 4 KiB blocks the per-call Python overhead is comparable to the codec work itself, so
`BlockCompressor` hands each worker thread a batch of many blocks (lz4, zstandard and crc32c release
the GIL inside their C calls) and keeps the per-block Python work to one codec call, one CRC call
and one concatenation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import itertools
import os
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import crc32c as _crc32c
import lz4.block
import zstandard

from obdconv.errors import FormatError
from obdconv.formats.crc import ZFILE_BLOCK_CRC_SEED, raw_crc32c
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


class _SystemLZ4:
    """LZ4_compress_default from the system liblz4, used for *compression* only.

    Why not python-lz4 for this: it compresses through its streaming API (32-bit hash table), so its
    blocks differ (valid, but not identical) from what the overlaybd tools write with
    LZ4_compress_default, which uses the 16-bit table for inputs < 64 KiB. The system liblz4 (Debian
    liblz4-1) reproduces the reference tools byte for byte (checked on fixture `commit.lsmt.zfile`).
    Called through cffi (ABI mode, releases the GIL, ~0.2 us per call) when available, else ctypes.
    Decompression stays on python-lz4: any valid LZ4 block decodes the same.
    """

    def __init__(self) -> None:
        name = ctypes.util.find_library("lz4") or "liblz4.so.1"
        try:
            import cffi  # an optional fast path; ctypes below is the fallback
        except ImportError:
            cffi = None
        if cffi is not None:
            self.ffi = cffi.FFI()
            self.ffi.cdef("int LZ4_compress_default(const char* src, char* dst, int srcSize, int dstCapacity);"
                          "int LZ4_compressBound(int inputSize);"
                          "int LZ4_decompress_safe(const char* src, char* dst, int srcSize, int dstCapacity);")
            self.lib = self.ffi.dlopen(name)
        else:
            self.ffi = None
            self.lib = ctypes.CDLL(name)
            self.lib.LZ4_compress_default.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                                      ctypes.c_int]
            self.lib.LZ4_compressBound.argtypes = [ctypes.c_int]

    def compress_range(self, data: memoryview, block_size: int) -> list[bytes]:
        """LZ4 blocks + CRC for `data`: one output buffer per batch, the CRC written in place."""
        n = len(data)
        bound = self.lib.LZ4_compressBound(block_size) + CRC_SIZE
        nblocks = -(-n // block_size)
        if self.ffi is not None:
            src: object = self.ffi.from_buffer(data)
            dst: object = self.ffi.new("char[]", nblocks * bound)
            buf = self.ffi.buffer(dst)
            src_p, dst_p = src, dst
        else:
            keep = bytes(data)  # a stable address for ctypes
            src = keep
            buf = dst = ctypes.create_string_buffer(nblocks * bound)
            src_p = ctypes.cast(ctypes.c_char_p(keep), ctypes.c_void_p).value or 0
            dst_p = ctypes.addressof(dst)
        mv = memoryview(buf).cast("B")
        compress = self.lib.LZ4_compress_default
        crc = _crc32c.crc32c
        pack_into = _U32.pack_into
        seed = _STD_BLOCK_SEED
        out: list[bytes] = []
        append = out.append
        pos = 0
        for off in range(0, n, block_size):
            size = compress(src_p + off, dst_p + pos, min(block_size, n - off), bound)  # type: ignore[operator]
            if size <= 0:
                raise FormatError(f"LZ4 compression failed at payload offset {off}")
            pack_into(buf, pos + size, crc(mv[pos : pos + size], seed) ^ _MASK)
            append(bytes(mv[pos : pos + size + CRC_SIZE]))
            pos += bound
        return out


    def decompress_range_into(self, stored: bytes | memoryview, offsets: Sequence[int], base: int, first: int,
                              last: int, out: bytearray, out_pos: int, block_size: int, verify: bool) -> int:
        """Decode LZ4 blocks [first, last) straight into `out` (no per-block objects); returns the
        index of the first block that failed its CRC or did not decode to a full block, or `last`.
        Only with cffi; callers fall back to the python-lz4 loop otherwise."""
        assert self.ffi is not None
        src = self.ffi.from_buffer(stored)
        dst = self.ffi.from_buffer(out)
        mv = memoryview(stored)
        dec = self.lib.LZ4_decompress_safe
        crc = _crc32c.crc32c
        unpack_from = _U32.unpack_from
        seed = _STD_BLOCK_SEED
        for i in range(first, last):
            a, b = offsets[i] - base, offsets[i + 1] - base
            if verify:
                b -= CRC_SIZE
                if crc(mv[a:b], seed) ^ _MASK != unpack_from(stored, b)[0]:
                    return i
            want = min(block_size, len(out) - out_pos)
            if dec(src + a, dst + out_pos, b - a, want) != want:
                return i
            out_pos += want
        return last


_lz4 = _SystemLZ4()


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


def _compress_range(algo: int, data: memoryview, block_size: int) -> list[bytes]:
    """Compress `data` block by block; each item = compressed block + CRC (little-endian)."""
    crc = _crc32c.crc32c
    seed = _STD_BLOCK_SEED
    out: list[bytes] = []
    append = out.append
    n = len(data)
    if algo == ALGO_LZ4:
        return _lz4.compress_range(data, block_size)
    else:
        zc = _zstd_compressor().compress
        for off in range(0, n, block_size):
            c = zc(data[off : off + block_size])
            append(c + ((crc(c, seed) ^ _MASK).to_bytes(4, "little")))
    return out


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

    Why 1: at 4 KiB blocks each block costs a few microseconds of Python work around the C call, so
    threads mostly trade the GIL back and forth; measured with benchmarks/bench_zfile.py on a loaded
    2-core machine a second thread was 10-50 % *slower*. Parallelism comes from processes (the
    pipeline's pool, Celery workers). Set the variable (or pass `threads=`) on idle many-core hosts,
    where zstd in particular gains from threads.
    """
    try:
        return max(1, int(os.environ.get("OBDCONV_ZFILE_THREADS", "1")))
    except ValueError:
        return 1


class BlockCompressor:
    """Compress a payload into ZFile blocks (each = compressed bytes + CRC32C seed 100007).

    Output is deterministic and independent of `threads`. `batch_blocks` blocks go to one thread
    task so the per-task overhead is amortised.
    """

    def __init__(self, algorithm: str | int = "lz4", block_size: int = DEFAULT_BLOCK_SIZE,
                 threads: int | None = None, batch_blocks: int = 256) -> None:
        self.algo = algorithm_id(algorithm)
        check_block_size(block_size)
        self.block_size = block_size
        self.threads = default_threads() if threads is None else max(1, threads)
        self.batch_bytes = batch_blocks * block_size

    def compress(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Blocks of `data`; every block but the last is full. Empty data gives no blocks."""
        mv = memoryview(data).cast("B")
        if self.threads == 1 or len(mv) <= self.batch_bytes:
            # Still in batches: one huge output buffer would cost page faults and cache misses.
            return list(itertools.chain.from_iterable(
                _compress_range(self.algo, mv[o : o + self.batch_bytes], self.block_size)
                for o in range(0, len(mv), self.batch_bytes)))
        pool = _shared_pool(self.threads)
        futures = [pool.submit(_compress_range, self.algo, mv[o : o + self.batch_bytes], self.block_size)
                   for o in range(0, len(mv), self.batch_bytes)]
        return list(itertools.chain.from_iterable(f.result() for f in futures))


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
        blocks = self._compressor.compress(data)
        self._lengths.extend(len(b) for b in blocks)
        self._out.write(b"".join(blocks))

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise ValueError("write to a closed ZFileWriter")
        self._buf += data
        self._size += len(data)
        if len(self._buf) >= self._flush:
            cut = len(self._buf) - len(self._buf) % self.block_size
            self._emit(memoryview(self._buf)[:cut])
            del self._buf[:cut]
        return len(data)

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

    def read_blocks(self, first: int, last: int) -> bytes:
        """Raw bytes of blocks [first, last), one read for the compressed range, decoded in batches."""
        if first >= last:
            return b""
        if last - first == 1:
            return self.read_block(first)
        base = self.offsets[first]
        stored = self._src.pread(base, self.offsets[last] - base)
        if len(stored) != self.offsets[last] - base:
            raise FormatError("ZFile truncated inside the block area")
        if self.algo == ALGO_LZ4 and _lz4.ffi is not None:
            return self._lz4_into(first, last, stored, base)
        mv = memoryview(stored)
        batch = 256
        if self.threads <= 1 or last - first <= batch:
            return b"".join(self._decode_range(first, mv, base, last))
        pool = _shared_pool(self.threads)
        futures = [pool.submit(self._decode_range, s, mv, base, min(s + batch, last))
                   for s in range(first, last, batch)]
        return b"".join(itertools.chain.from_iterable(f.result() for f in futures))

    def _lz4_into(self, first: int, last: int, stored: bytes, base: int) -> bytes:
        raw_end = min(last * self.block_size, self.size)
        out = bytearray(raw_end - first * self.block_size)
        batch = 1024
        starts = list(range(first, last, batch))

        def run(s: int) -> int:
            e = min(s + batch, last)
            return _lz4.decompress_range_into(stored, self.offsets, base, s, e, out,
                                              (s - first) * self.block_size, self.block_size, self.verify_crc)

        if self.threads <= 1 or len(starts) == 1:
            results = [run(s) for s in starts]
        else:
            results = list(_shared_pool(self.threads).map(run, starts))
        for s, stop in zip(starts, results, strict=True):
            if stop != min(s + batch, last):
                a, b = self.offsets[stop] - base, self.offsets[stop + 1] - base
                decompress_block(self.algo, stored[a:b], self.raw_block_size(stop), self.verify_crc,
                                 f"ZFile block {stop}")
                raise FormatError(f"ZFile block {stop}: cannot decode")
        return bytes(out)

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
        step = 4096
        for s in range(0, len(self.lengths), step):
            self.read_blocks(s, min(s + step, len(self.lengths)))

    def decompress_to(self, out: BinaryIO, chunk_blocks: int = 4096) -> None:
        for s in range(0, len(self.lengths), chunk_blocks):
            out.write(self.read_blocks(s, min(s + chunk_blocks, len(self.lengths))))
