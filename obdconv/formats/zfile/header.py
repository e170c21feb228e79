"""ZFile's byte layout (spec §2): constants, the header/trailer struct, and (header, tail) of a file.

Layout: header (512) | blocks, each compressed independently + 4-byte CRC | jump table (u32 stored
length per block) | trailer (512). LZ4 blocks use the raw block format, zstd blocks are one frame at
level 3 with the content size. CRC = rawCRC32C(compressed bytes, seed 100007).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from obdconv.errors import FormatError
from obdconv.formats.crc import ZFILE_BLOCK_CRC_SEED, raw_crc32c

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

