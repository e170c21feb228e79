"""`ZFileReader`: random access to a ZFile's payload, every block CRC-checked."""

from __future__ import annotations

import itertools
import os
import struct
from typing import BinaryIO

import crc32c as _crc32c
import lz4.block
import zstandard

from obdconv.errors import FormatError
from obdconv.formats.crc import raw_crc32c
from obdconv.formats.rawbytes import uninitialised_bytes
from obdconv.formats.source import RandomAccess, as_source, source_size
from obdconv.formats.zfile.codec import (
    _decode_batch_into,
    _shared_pool,
    _SystemLZ4,
    _SystemZstdDecoder,
    _zstd_decompressor,
    decompress_block,
    default_threads,
    system_lz4,
    system_zstd_decoder,
)
from obdconv.formats.zfile.header import (
    _MASK,
    _STD_BLOCK_SEED,
    _U32,
    ALGO_LZ4,
    ALGORITHM_NAMES,
    CRC_SIZE,
    FLAG_CALC_DIGEST,
    FLAG_HEADER,
    FLAG_IDX_COMP,
    FLAG_SEALED,
    FLAG_TYPE_DATA,
    HEADER_SPACE,
    MAX_INDEX_SIZE,
    MAX_STORED_LEN,
    ZFileHeader,
    check_block_size,
)


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
        return system_lz4() if self.algo == ALGO_LZ4 else system_zstd_decoder()

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
        out = uninitialised_bytes(self._raw_span(first, last))
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
