"""Byte layout of LSMT files (spec §1): constants, index entries (`SegmentMapping`, packed 16 bytes
each) and the 4 KiB header/trailer (`LSMTHeader`); `commit_header`/`commit_tail` give the pieces of a
committed file for callers that stream its data area themselves."""

from __future__ import annotations

import array
import re
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from obdconv.errors import FormatError

SECTOR = 512  # LSMT::ALIGNMENT
HT_SPACE = 4096  # header/trailer block size
HT_SECTORS = HT_SPACE // SECTOR  # B in §1.5: first data sector

MAGIC0 = b"LSMT\x00\x01\x02\x00"
MAGIC1 = bytes.fromhex("657E63D29444084CA2D2C8EC4FCFAE8A")
HT_STRUCT_SIZE = 390

FLAG_SHIFT_HEADER = 0  # 1 = header, 0 = trailer
FLAG_SHIFT_TYPE = 1  # 1 = data file, 0 = index file
FLAG_SHIFT_SEALED = 2
FLAG_SPARSE_RW = 4

FLAG_HEADER = 1 << FLAG_SHIFT_HEADER
FLAG_TYPE_DATA = 1 << FLAG_SHIFT_TYPE
FLAG_SEALED = 1 << FLAG_SHIFT_SEALED
FLAG_SPARSE = 1 << FLAG_SPARSE_RW

COMMIT_HEADER_FLAGS = 0x07
COMMIT_TRAILER_FLAGS = 0x06
RW_DATA_FLAGS = 0x03
RW_INDEX_FLAGS = 0x01

LSMT_V1 = 1
LSMT_SUB_V1 = 1

MAX_LENGTH = (1 << 14) - 1  # sectors per entry
INVALID_OFFSET = (1 << 50) - 1
MAX_MOFFSET = (1 << 55) - 1
MAX_LSMT_RO_INDEX_SIZE = 1_000_000
MAX_RW_INDEX_SIZE = 128_000_000
INDEX_PAD_ENTRIES = 256  # committed index is padded to a multiple of this
COMPACT_CHUNK_SECTORS = 64  # pcopy copies 32 KiB per mapping (§1.6)
RW_MAX_IO_SECTORS = 8192  # RW pwrite splits at MAX_IO_SIZE = 4 MiB

DEFAULT_VSIZE = 64 << 30
ZERO_UUID = "00000000-0000-0000-0000-000000000000"
USER_TAG_SIZE = 256
UUID_FIELD_SIZE = 37

_UUID_RE = re.compile(r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")
_ENTRY = struct.Struct("<QQ")
_HT = struct.Struct("<8s16sIIQQQ37s37sHBB256s")
assert _HT.size == HT_STRUCT_SIZE





@dataclass(frozen=True, slots=True)
class SegmentMapping:
    """One index entry (§1.3); all fields in sectors. `moffset` is where the data sits in file[tag]."""

    offset: int
    length: int
    moffset: int
    zeroed: bool = False
    tag: int = 0

    SIZE = 16

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def mend(self) -> int:
        """End of the data in the holding file (a zeroed entry stores nothing)."""
        return self.moffset if self.zeroed else self.moffset + self.length

    @property
    def is_invalid(self) -> bool:
        return self.offset == INVALID_OFFSET

    def pack(self) -> bytes:
        if not (0 <= self.offset <= INVALID_OFFSET and 0 <= self.length <= MAX_LENGTH):
            raise FormatError(f"segment offset/length out of range: {self}")
        if not (0 <= self.moffset <= MAX_MOFFSET and 0 <= self.tag <= 255):
            raise FormatError(f"segment moffset/tag out of range: {self}")
        lo = self.offset | self.length << 50
        hi = self.moffset | int(self.zeroed) << 55 | self.tag << 56
        return _ENTRY.pack(lo, hi)

    @classmethod
    def unpack(cls, b: bytes | memoryview, pos: int = 0) -> SegmentMapping:
        lo, hi = _ENTRY.unpack_from(b, pos)
        return cls(lo & INVALID_OFFSET, lo >> 50, hi & MAX_MOFFSET, bool(hi >> 55 & 1), hi >> 56)

    def slice(self, start: int, end: int) -> SegmentMapping:
        """The part of this entry covering sectors [start, end) (must lie inside it)."""
        delta = start - self.offset
        moff = self.moffset if self.zeroed else self.moffset + delta
        return SegmentMapping(start, end - start, moff, self.zeroed, self.tag)


INVALID_MAPPING = SegmentMapping(INVALID_OFFSET, 0, 0)
INVALID_ENTRY_BYTES = INVALID_MAPPING.pack()


class MappingLike(Protocol):
    """Anything with a `SegmentMapping`'s fields (e.g. the pipeline's index runs)."""

    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def moffset(self) -> int: ...
    @property
    def zeroed(self) -> bool: ...
    @property
    def tag(self) -> int: ...


def pack_index(mappings: Sequence[MappingLike]) -> bytes:
    """Concatenated 16-byte entries, in the given order; the same bytes as each `SegmentMapping.pack()`.

    Column-wise (a field of every entry at a time, range checks by min/max, one `array` pack),
    because a big turboOCI layer has over 100k entries and per-entry `struct.pack` calls dominate."""
    if not mappings:
        return b""
    offsets = [m.offset for m in mappings]
    lengths = [m.length for m in mappings]
    moffsets = [m.moffset for m in mappings]
    tags = [m.tag for m in mappings]
    zeroed = [bool(m.zeroed) for m in mappings]
    if not (min(offsets) >= 0 and max(offsets) <= INVALID_OFFSET and min(lengths) >= 0 and max(lengths) <= MAX_LENGTH):
        bad = next(m for m in mappings if not (0 <= m.offset <= INVALID_OFFSET and 0 <= m.length <= MAX_LENGTH))
        raise FormatError(f"segment offset/length out of range: {bad}")
    if not (min(moffsets) >= 0 and max(moffsets) <= MAX_MOFFSET and min(tags) >= 0 and max(tags) <= 255):
        bad = next(m for m in mappings if not (0 <= m.moffset <= MAX_MOFFSET and 0 <= m.tag <= 255))
        raise FormatError(f"segment moffset/tag out of range: {bad}")
    words = array.array("Q", bytes(16 * len(mappings)))
    words[0::2] = array.array("Q", [o | n << 50 for o, n in zip(offsets, lengths, strict=True)])
    words[1::2] = array.array("Q", [m | z << 55 | t << 56 for m, z, t in zip(moffsets, zeroed, tags, strict=True)])
    if sys.byteorder != "little":
        words.byteswap()
    return words.tobytes()


def unpack_index(b: bytes | memoryview, count: int | None = None) -> list[SegmentMapping]:
    """Parse `count` entries (default: all of `b`), keeping invalid ones."""
    n = len(b) // SegmentMapping.SIZE if count is None else count
    out = []
    for lo, hi in _ENTRY.iter_unpack(memoryview(b)[: n * SegmentMapping.SIZE]):
        out.append(SegmentMapping(lo & INVALID_OFFSET, lo >> 50, hi & MAX_MOFFSET, bool(hi >> 55 & 1), hi >> 56))
    return out


def split_long(offset: int, length: int, moffset: int, zeroed: bool, tag: int = 0,
               max_len: int = MAX_LENGTH) -> list[SegmentMapping]:
    """Entries for a range longer than one entry can hold, each at most `max_len` sectors."""
    out = []
    while length > 0:
        n = min(length, max_len)
        out.append(SegmentMapping(offset, n, moffset, zeroed, tag))
        offset += n
        length -= n
        if not zeroed:
            moffset += n
    return out





def normalize_uuid(u: str | bytes | None) -> str:
    """Uppercase 8-4-4-4-12 form; None/empty/invalid -> the null uuid (as the tools do)."""
    if u is None:
        return ZERO_UUID
    s = u.decode("ascii", "replace") if isinstance(u, (bytes, bytearray)) else str(u)
    s = s.strip()
    if len(s) == 32 and re.fullmatch(r"[0-9A-Fa-f]{32}", s):
        s = f"{s[:8]}-{s[8:12]}-{s[12:16]}-{s[16:20]}-{s[20:]}"
    return s.upper() if _UUID_RE.match(s) else ZERO_UUID


@dataclass(slots=True)
class LSMTHeader:
    """HeaderTrailer (§1.1): a 390-byte packed struct in a 4096-byte block."""

    flags: int
    index_offset: int = 0
    index_size: int = 0  # number of 16-byte entries
    virtual_size: int = 0
    uuid: str = ZERO_UUID
    parent_uuid: str = ZERO_UUID
    version: int = LSMT_V1
    sub_version: int = LSMT_SUB_V1
    user_tag: bytes = b""
    size: int = HT_STRUCT_SIZE
    reserved: int = 0

    @property
    def is_header(self) -> bool:
        return bool(self.flags & FLAG_HEADER)

    @property
    def is_data_file(self) -> bool:
        return bool(self.flags & FLAG_TYPE_DATA)

    @property
    def is_sealed(self) -> bool:
        return bool(self.flags & FLAG_SEALED)

    @property
    def is_sparse(self) -> bool:
        return bool(self.flags & FLAG_SPARSE)

    def pack(self) -> bytes:
        if len(self.user_tag) > USER_TAG_SIZE:
            raise FormatError(f"LSMT user tag is {len(self.user_tag)} bytes, at most {USER_TAG_SIZE} allowed")
        raw = _HT.pack(MAGIC0, MAGIC1, self.size, self.flags, self.index_offset, self.index_size,
                       self.virtual_size, _uuid_field(self.uuid), _uuid_field(self.parent_uuid),
                       self.reserved, self.version, self.sub_version, self.user_tag)
        return raw + bytes(HT_SPACE - HT_STRUCT_SIZE)

    @classmethod
    def unpack(cls, b: bytes, what: str = "LSMT header") -> LSMTHeader:
        if len(b) < HT_STRUCT_SIZE:
            raise FormatError(f"{what}: truncated ({len(b)} bytes, need {HT_STRUCT_SIZE})")
        (m0, m1, size, flags, ioff, isize, vsize, uuid, parent, reserved, ver, sub,
         tag) = _HT.unpack_from(b, 0)
        if m0 != MAGIC0 or m1 != MAGIC1:
            raise FormatError(f"{what}: bad magic (not an LSMT file)")
        return cls(flags, ioff, isize, vsize, _uuid_str(uuid), _uuid_str(parent), ver, sub,
                   tag.rstrip(b"\x00"), size, reserved)


def _uuid_field(u: str) -> bytes:
    return normalize_uuid(u).encode("ascii") + b"\x00"


def _uuid_str(b: bytes) -> str:
    # Readers parse either case and ignore parse errors (§1.1): keep what is there, uppercased.
    s = b.split(b"\x00", 1)[0].decode("ascii", "replace")
    return s.upper() if _UUID_RE.match(s) else s


def commit_header(virtual_size: int, uuid: str | None, parent_uuid: str | None,
                  user_tag: bytes = b"") -> bytes:
    """The 4096-byte header of a committed file (flags 0x07, index fields zero)."""
    return LSMTHeader(COMMIT_HEADER_FLAGS, 0, 0, virtual_size, normalize_uuid(uuid),
                      normalize_uuid(parent_uuid), user_tag=user_tag).pack()


def commit_tail(mappings: Sequence[MappingLike], index_offset: int, virtual_size: int,
                uuid: str | None, parent_uuid: str | None, user_tag: bytes = b"",
                pad_index: bool = True) -> bytes:
    """Index + trailer of a committed file whose data area ends at `index_offset` (bytes, 512-aligned).

    `mappings` must be sorted and non-overlapping. With `pad_index` the index is padded with
    invalid entries to a multiple of 256 and `index_size` counts the padding (overlaybd-commit);
    without it (turboOCI warp commits) the index is written as is.
    """
    if index_offset % SECTOR:
        raise FormatError(f"index offset {index_offset} is not a multiple of {SECTOR}")
    n = len(mappings)
    count = -(-n // INDEX_PAD_ENTRIES) * INDEX_PAD_ENTRIES if pad_index else n
    if pad_index and count == 0:
        count = INDEX_PAD_ENTRIES  # an empty layer still gets one padded index page
    if count > MAX_LSMT_RO_INDEX_SIZE:
        raise FormatError(f"LSMT index has {count} entries, readers accept at most {MAX_LSMT_RO_INDEX_SIZE}")
    index = pack_index(mappings) + INVALID_ENTRY_BYTES * (count - n)
    trailer = LSMTHeader(COMMIT_TRAILER_FLAGS, index_offset, count, virtual_size, normalize_uuid(uuid),
                         normalize_uuid(parent_uuid), user_tag=user_tag).pack()
    return index + trailer
