"""LSMT: overlaybd's layer block format (spec §1): index entries, header/trailer, writers, readers.

Units: `SegmentMapping` fields are in 512-byte sectors (as on disk); every other API here takes bytes.

Writers:
  * `commit_header` / `commit_tail`: the pieces of a committed file, for callers that stream the
    data area themselves (header, data from offset 4096, then index + trailer).
  * `LSMTWriter` / `commit()`: record writes and zeroed ranges like an RW layer, then produce a
    committed file exactly as `overlaybd-commit` does (§1.6). `commit_rw_pair` commits a real RW pair.
Readers:
  * `LSMTFile.open(f, target=None)`: committed, sealed and warp (turboOCI) files, enforcing §1.5.
  * `LSMTFile.open_rw(data_f, index_f)`: an RW pair (normal or sparse).
  * `LSMTStack(layers)`: the merged view of a stack (§1.7) and `flatten_to` a sparse raw image.
"""

from __future__ import annotations

import array
import bisect
import os
import re
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple, Protocol

from obdconv.errors import FormatError
from obdconv.formats.source import RandomAccess, as_source, source_size

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


# --------------------------------------------------------------------------------------------
# Index entries


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


# --------------------------------------------------------------------------------------------
# Header / trailer


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


# --------------------------------------------------------------------------------------------
# Effective mapping of an RW layer (later writes override earlier ones; Index0::insert)


class SegmentIndex:
    """Sorted, non-overlapping mappings; `insert` overrides whatever the new entry overlaps."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._items: list[SegmentMapping] = []

    def insert(self, m: SegmentMapping) -> None:
        if m.length <= 0:
            return
        i = bisect.bisect_right(self._starts, m.offset)
        if i > 0 and self._items[i - 1].end > m.offset:
            i -= 1
        j = i
        left: list[SegmentMapping] = []
        right: list[SegmentMapping] = []
        while j < len(self._items) and self._items[j].offset < m.end:
            old = self._items[j]
            if old.offset < m.offset:
                left.append(old.slice(old.offset, m.offset))
            if old.end > m.end:
                right.append(old.slice(m.end, old.end))
            j += 1
        pieces = [*left, m, *right]
        self._items[i:j] = pieces
        self._starts[i:j] = [p.offset for p in pieces]

    def mappings(self) -> list[SegmentMapping]:
        return list(self._items)


# --------------------------------------------------------------------------------------------
# Compaction (§1.6)


def _mergeable(a: SegmentMapping, b: SegmentMapping) -> bool:
    return (a.end == b.offset and a.mend == b.moffset and a.zeroed == b.zeroed and a.tag == b.tag
            and a.length + b.length < MAX_LENGTH)


def merge_adjacent(mappings: Iterable[SegmentMapping]) -> list[SegmentMapping]:
    """Greedy merge of neighbours contiguous in both offset and moffset (sum < 16383), as compact()."""
    out: list[SegmentMapping] = []
    for m in mappings:
        if out and _mergeable(out[-1], m):
            last = out[-1]
            out[-1] = SegmentMapping(last.offset, last.length + m.length, last.moffset, last.zeroed, last.tag)
        else:
            out.append(m)
    return out


def compact_mappings(effective: Sequence[SegmentMapping], first_moffset: int = HT_SECTORS
                     ) -> tuple[list[SegmentMapping], list[tuple[SegmentMapping, int]]]:
    """Plan a compaction: (new mappings, copy list of (source mapping, destination sector)).

    Data segments are copied in 64-sector chunks (one mapping each) packed from `first_moffset`;
    zeroed segments copy nothing and take the current position as dummy moffset; then merged.
    """
    out: list[SegmentMapping] = []
    copies: list[tuple[SegmentMapping, int]] = []
    pos = first_moffset
    for m in effective:
        if m.zeroed:
            out.append(SegmentMapping(m.offset, m.length, pos, True, m.tag))
            continue
        copies.append((m, pos))
        done = 0
        while done < m.length:
            n = min(COMPACT_CHUNK_SECTORS, m.length - done)
            out.append(SegmentMapping(m.offset + done, n, pos, False, m.tag))
            pos += n
            done += n
    return merge_adjacent(out), copies


def write_committed(out: BinaryIO, effective: Sequence[SegmentMapping], read_data: RandomAccess,
                    virtual_size: int, uuid: str | None, parent_uuid: str | None,
                    user_tag: bytes = b"") -> int:
    """Write a committed LSMT of `effective` (sorted mappings; data read from `read_data` at
    moffset*512) to `out`; returns the number of bytes written."""
    mappings, copies = compact_mappings(effective)
    out.write(commit_header(virtual_size, uuid, parent_uuid, user_tag))
    written = HT_SPACE
    for m, _dst in copies:
        data = read_data.pread(m.moffset * SECTOR, m.length * SECTOR)
        data = data.ljust(m.length * SECTOR, b"\x00")  # a short read is zero-filled (§1.7)
        out.write(data)
        written += len(data)
    tail = commit_tail(mappings, written, virtual_size, uuid, parent_uuid, user_tag)
    out.write(tail)
    return written + len(tail)


class _MemoryData:
    """The data area of an `LSMTWriter`: pieces appended in order, read back by sector."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._pieces: list[bytes] = []
        self.end = HT_SPACE

    def append(self, b: bytes) -> int:
        pos = self.end
        self._starts.append(pos)
        self._pieces.append(b)
        self.end += len(b)
        return pos

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray()
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        while length > 0 and i < len(self._pieces):
            start = self._starts[i]
            piece = self._pieces[i]
            k = offset - start
            chunk = piece[k : k + length]
            out += chunk
            offset += len(chunk)
            length -= len(chunk)
            i += 1
        return bytes(out)


@dataclass
class LSMTWriter:
    """An in-memory RW layer: `write` and `zero` ranges (bytes, 512-aligned), replayed in order,
    then `commit` to a file identical to what `overlaybd-commit` makes of the same RW layer."""

    virtual_size: int = DEFAULT_VSIZE
    parent_uuid: str | None = None
    _index: SegmentIndex = field(default_factory=SegmentIndex)
    _data: _MemoryData = field(default_factory=_MemoryData)

    def write(self, offset: int, data: bytes) -> None:
        _check_aligned(offset, len(data))
        sector = offset // SECTOR
        # RW pwrite splits requests larger than MAX_IO_SIZE into 8192-sector mappings.
        for k in range(0, len(data), RW_MAX_IO_SECTORS * SECTOR):
            piece = bytes(data[k : k + RW_MAX_IO_SECTORS * SECTOR])
            pos = self._data.append(piece)
            self._index.insert(SegmentMapping(sector + k // SECTOR, len(piece) // SECTOR, pos // SECTOR))

    def zero(self, offset: int, length: int) -> None:
        _check_aligned(offset, length)
        for m in split_long(offset // SECTOR, length // SECTOR, self._data.end // SECTOR, True):
            self._index.insert(m)

    def mappings(self) -> list[SegmentMapping]:
        return self._index.mappings()

    def commit(self, out: BinaryIO, uuid: str | None = None, user_tag: bytes = b"",
               parent_uuid: str | None = None) -> int:
        parent = parent_uuid if parent_uuid is not None else self.parent_uuid
        return write_committed(out, self._index.mappings(), self._data, self.virtual_size, uuid, parent,
                               user_tag)


def _check_aligned(offset: int, length: int) -> None:
    if offset % SECTOR or length % SECTOR or offset < 0:
        raise FormatError(f"LSMT I/O must be 512-aligned: offset {offset}, length {length}")


def commit(writes: Iterable[tuple[int, bytes]] | dict[int, bytes], out: BinaryIO, *,
           zeroed: Iterable[tuple[int, int]] = (), virtual_size: int = DEFAULT_VSIZE,
           uuid: str | None = None, parent_uuid: str | None = None, user_tag: bytes = b"") -> int:
    """Commit a set of writes ({offset: bytes} or [(offset, bytes)], applied in order) and then
    zeroed (offset, length) ranges to `out` as a committed LSMT file; returns its size."""
    w = LSMTWriter(virtual_size, parent_uuid)
    for off, data in (writes.items() if isinstance(writes, dict) else writes):
        w.write(off, data)
    for off, length in zeroed:
        w.zero(off, length)
    return w.commit(out, uuid, user_tag)


def commit_rw_pair(data_f: BinaryIO | str | os.PathLike[str], index_f: BinaryIO | str | os.PathLike[str] | None,
                   out: BinaryIO, *, uuid: str | None = None, parent_uuid: str | None = None,
                   user_tag: bytes = b"") -> int:
    """`overlaybd-commit data index out`: parent uuid and vsize from the RW data header unless given."""
    rw = LSMTFile.open_rw(data_f, index_f)
    parent = normalize_uuid(parent_uuid) if parent_uuid and _UUID_RE.match(parent_uuid) else rw.parent_uuid
    return write_committed(out, rw.mappings, rw.data_source, rw.virtual_size, uuid, parent, user_tag)


# --------------------------------------------------------------------------------------------
# Readers


def _read_ht(src: RandomAccess, offset: int, what: str) -> LSMTHeader:
    return LSMTHeader.unpack(src.pread(offset, HT_SPACE), what)


class LSMTFile:
    """A readable LSMT layer. `mappings` are sorted, non-overlapping, invalid entries dropped.

    Data for tag-0 entries comes from the file itself; for warp files tag-1 entries read from
    `target` (the original layer tar). `pread` works in bytes at any offset; unmapped and zeroed
    ranges read as zeros.
    """

    def __init__(self, mappings: list[SegmentMapping], virtual_size: int, sources: list[RandomAccess | None],
                 header: LSMTHeader, trailer: LSMTHeader | None = None, index_padding: int = 0,
                 kind: str = "committed") -> None:
        self.mappings = mappings
        self.virtual_size = virtual_size
        self.header = header
        self.trailer = trailer
        self.uuid = header.uuid
        self.parent_uuid = header.parent_uuid
        self.user_tag = header.user_tag
        self.index_padding = index_padding
        self.kind = kind
        self._sources = sources
        self._starts = [m.offset for m in mappings]

    @property
    def data_source(self) -> RandomAccess:
        src = self._sources[0]
        assert src is not None
        return src

    # ---- opening

    @classmethod
    def open(cls, f: RandomAccess | BinaryIO | str | os.PathLike[str],
             target: RandomAccess | BinaryIO | str | os.PathLike[str] | None = None,
             size: int | None = None, warp: bool = False) -> LSMTFile:
        """Open a committed or sealed file. Rules of §1.5.

        A warp (turboOCI fs.meta) file is opened when `target` is given (tag-1 entries read from
        it) or `warp` is set (tags kept and tag-1 bounds unchecked, but tag-1 data unreadable).
        """
        src = as_source(f)
        file_size = source_size(src) if size is None else size
        if file_size < 2 * HT_SPACE:
            raise FormatError(f"LSMT file too small: {file_size} bytes")
        header = _read_ht(src, 0, "LSMT header")
        if not (header.is_header and header.is_data_file):
            raise FormatError(f"LSMT header flags 0x{header.flags:x}: not a data-file header")
        trailer_offset = file_size - HT_SPACE
        trailer = _read_ht(src, trailer_offset, "LSMT trailer")
        if trailer.is_header or not trailer.is_data_file or not trailer.is_sealed:
            raise FormatError(f"LSMT trailer flags 0x{trailer.flags:x}: not a sealed data trailer "
                              "(is this an RW file without commit?)")
        if trailer.index_size > MAX_LSMT_RO_INDEX_SIZE:
            raise FormatError(f"LSMT index_size {trailer.index_size} exceeds {MAX_LSMT_RO_INDEX_SIZE}")
        ioff = trailer.index_offset
        if ioff % SECTOR or ioff < HT_SPACE or ioff > trailer_offset:
            raise FormatError(f"LSMT index_offset {ioff} out of range [4096, {trailer_offset}]")
        if trailer.index_size * SegmentMapping.SIZE > trailer_offset - ioff:
            raise FormatError(f"LSMT index ({trailer.index_size} entries at {ioff}) overlaps the trailer")
        raw = src.pread(ioff, trailer.index_size * SegmentMapping.SIZE)
        if len(raw) != trailer.index_size * SegmentMapping.SIZE:
            raise FormatError("LSMT index truncated")
        all_entries = unpack_index(raw)
        entries = [m for m in all_entries if not m.is_invalid]
        warp = warp or target is not None
        _verify_sorted(entries)
        end_sector = ioff // SECTOR
        for m in entries:
            if warp and m.tag == 1:
                continue
            if m.tag not in (0, 1) and warp:
                raise FormatError(f"warp LSMT entry has tag {m.tag} (only 0 and 1 exist): {m}")
            if m.moffset < HT_SECTORS or (m.mend > end_sector if not m.zeroed else m.moffset > end_sector):
                raise FormatError(f"LSMT entry data out of range [8, {end_sector}) sectors: {m}")
        if not warp:
            # The normal reader zeroes all tags when loading (do_load_index).
            entries = [SegmentMapping(m.offset, m.length, m.moffset, m.zeroed, 0) if m.tag else m
                       for m in entries]
        sources: list[RandomAccess | None] = [src, as_source(target) if target is not None else None]  # type: ignore[arg-type]
        return cls(entries, trailer.virtual_size, sources, header, trailer,
                   len(all_entries) - len(entries), "warp" if warp else "committed")

    @classmethod
    def open_rw(cls, data_f: RandomAccess | BinaryIO | str | os.PathLike[str],
                index_f: RandomAccess | BinaryIO | str | os.PathLike[str] | None) -> LSMTFile:
        """Open an RW pair: index entries replayed in write order; sparse data files map their
        non-hole extents (the index file is ignored for them)."""
        data = as_source(data_f)
        data_size = source_size(data)
        header = _read_ht(data, 0, "LSMT RW data header")
        if not (header.is_header and header.is_data_file):
            raise FormatError(f"LSMT RW data header flags 0x{header.flags:x}: not a data-file header")
        idx = SegmentIndex()
        if header.is_sparse:
            for m in _sparse_extents(data_f, data_size):
                idx.insert(m)
        else:
            if index_f is None:
                raise FormatError("LSMT RW layer needs an index file")
            isrc = as_source(index_f)
            isize = source_size(isrc)
            ih = _read_ht(isrc, 0, "LSMT RW index header")
            if not ih.is_header or ih.is_data_file or ih.is_sealed or ih.index_offset != HT_SPACE:
                raise FormatError(f"LSMT RW index header invalid (flags 0x{ih.flags:x}, "
                                  f"index_offset {ih.index_offset})")
            count = (isize - HT_SPACE) // SegmentMapping.SIZE
            if count > MAX_RW_INDEX_SIZE:
                raise FormatError(f"LSMT RW index has {count} entries, more than {MAX_RW_INDEX_SIZE}")
            end_sector = data_size // SECTOR
            for m in unpack_index(isrc.pread(HT_SPACE, count * SegmentMapping.SIZE)):
                if m.is_invalid:
                    continue
                if m.length == 0 or m.moffset < HT_SECTORS or m.mend > end_sector:
                    raise FormatError(f"LSMT RW entry out of range [8, {end_sector}] sectors: {m}")
                idx.insert(SegmentMapping(m.offset, m.length, m.moffset, m.zeroed, 0))
        return cls(idx.mappings(), header.virtual_size, [data], header, None, 0, "rw")

    # ---- reading

    def find(self, sector: int) -> int:
        """Index of the first mapping that ends after `sector`."""
        i = bisect.bisect_right(self._starts, sector)
        if i > 0 and self.mappings[i - 1].end > sector:
            return i - 1
        return i

    def read_mapping(self, m: SegmentMapping, start: int, length: int) -> bytes:
        """`length` bytes of mapping `m` starting `start` bytes into it (zero-filled if short)."""
        if m.zeroed:
            return bytes(length)
        src = self._sources[m.tag] if m.tag < len(self._sources) else None
        if src is None:
            raise FormatError(f"LSMT entry has tag {m.tag} but no such file was given (warp target?)")
        data = src.pread(m.moffset * SECTOR + start, length)
        return data if len(data) == length else data.ljust(length, b"\x00")

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        out = bytearray(length)
        end = offset + length
        i = self.find(offset // SECTOR)
        while i < len(self.mappings):
            m = self.mappings[i]
            ms, me = m.offset * SECTOR, m.end * SECTOR
            if ms >= end:
                break
            a, b = max(ms, offset), min(me, end)
            if not m.zeroed:
                out[a - offset : b - offset] = self.read_mapping(m, a - ms, b - a)
            i += 1
        return bytes(out)

    @property
    def size(self) -> int:
        return self.virtual_size


def _verify_sorted(entries: Sequence[SegmentMapping]) -> None:
    prev: SegmentMapping | None = None
    for m in entries:
        if m.length == 0:
            raise FormatError(f"LSMT entry with zero length: {m}")
        if prev is not None and prev.end > m.offset:
            raise FormatError(f"LSMT index not sorted or overlapping: {prev} then {m}")
        prev = m


def _sparse_extents(data_f: object, data_size: int) -> Iterator[SegmentMapping]:
    """Mappings of a sparse RW data file from SEEK_DATA/SEEK_HOLE (§1.4)."""
    fd: int | None = None
    opened = None
    if isinstance(data_f, (str, os.PathLike)):
        opened = open(data_f, "rb")
        fd = opened.fileno()
    elif hasattr(data_f, "fileno"):
        try:
            fd = data_f.fileno()  # type: ignore[attr-defined]
        except (OSError, ValueError):
            fd = None
    try:
        ranges: list[tuple[int, int]] = []
        if fd is None:
            ranges = [(HT_SPACE, data_size)]  # no hole information: the whole image is data
        else:
            pos = HT_SPACE
            while pos < data_size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                stop = os.lseek(fd, start, os.SEEK_HOLE)
                ranges.append((start, stop))
                pos = stop
        for start, stop in ranges:
            s0, s1 = start // SECTOR, -(-stop // SECTOR)
            yield from split_long(s0 - HT_SECTORS, s1 - s0, s0, False)
    finally:
        if opened is not None:
            opened.close()


# --------------------------------------------------------------------------------------------
# Stacks (§1.7)


class StackExtent(NamedTuple):
    """A piece of the merged view: bytes [offset, offset+length) come from `layers[layer]` via
    `mapping` (already trimmed to this piece; sectors). Zeroed pieces have mapping.zeroed set."""

    offset: int
    length: int
    layer: int
    mapping: SegmentMapping


class LSMTStack:
    """Layers bottom first; for every sector the highest layer with any entry wins (§1.7)."""

    def __init__(self, layers: Sequence[LSMTFile]) -> None:
        if not layers:
            raise FormatError("an LSMT stack needs at least one layer")
        self.layers = list(layers)
        self.virtual_size = next((lay.virtual_size for lay in reversed(self.layers) if lay.virtual_size), 0)
        self._extents = self._merge()
        self._starts = [e.offset for e in self._extents]

    def _merge(self) -> list[StackExtent]:
        covered_s: list[int] = []  # disjoint covered intervals (sectors), sorted
        covered_e: list[int] = []
        pieces: list[tuple[SegmentMapping, int]] = []
        for li in range(len(self.layers) - 1, -1, -1):
            new_s: list[int] = []
            new_e: list[int] = []
            for m in self.layers[li].mappings:
                pos = m_start = m.offset
                m_end = m_start + m.length
                i = bisect.bisect_right(covered_e, pos)
                while pos < m_end:
                    if i < len(covered_s) and covered_s[i] <= pos:
                        pos = max(pos, covered_e[i])
                        i += 1
                        continue
                    stop = min(m_end, covered_s[i]) if i < len(covered_s) else m_end
                    if stop > pos:
                        # most entries are not covered at all: kept as they are, not copied
                        pieces.append((m if pos == m_start and stop == m_end else m.slice(pos, stop), li))
                    pos = stop
                new_s.append(m_start)
                new_e.append(m_end)
            covered_s, covered_e = _union(covered_s, covered_e, new_s, new_e)
        pieces.sort(key=lambda p: p[0].offset)
        return [StackExtent(m.offset * SECTOR, m.length * SECTOR, li, m) for m, li in pieces]

    def extents(self) -> list[StackExtent]:
        """The merged view, sorted by offset; includes zeroed pieces (they hide lower layers)."""
        return list(self._extents)

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        end = offset + length
        i = bisect.bisect_right(self._starts, offset)
        if i > 0 and self._extents[i - 1].offset + self._extents[i - 1].length > offset:
            i -= 1
        while i < len(self._extents):
            e = self._extents[i]
            if e.offset >= end:
                break
            a, b = max(e.offset, offset), min(e.offset + e.length, end)
            if b > a and not e.mapping.zeroed:
                out[a - offset : b - offset] = self.layers[e.layer].read_mapping(e.mapping, a - e.offset, b - a)
            i += 1
        return bytes(out)

    @property
    def size(self) -> int:
        return self.virtual_size

    def flatten_to(self, path: str | os.PathLike[str], max_write: int = 8 << 20) -> None:
        """Write the stack as a sparse raw image of `virtual_size` bytes: only mapped data is
        written (coalesced into large sequential writes); unmapped and zeroed ranges stay holes."""
        with open(path, "wb") as out:
            out.truncate(self.virtual_size)
            buf = bytearray()
            buf_start = -1
            for e in self._extents:
                if e.mapping.zeroed:
                    continue
                if buf and (buf_start + len(buf) != e.offset or len(buf) >= max_write):
                    _write_sparse(out, buf_start, buf)
                    buf = bytearray()
                if not buf:
                    buf_start = e.offset
                buf += self.layers[e.layer].read_mapping(e.mapping, 0, e.length)
            if buf:
                _write_sparse(out, buf_start, buf)


_SPARSE_PIECE = 1 << 20


def _write_sparse(out: BinaryIO, start: int, buf: bytearray) -> None:
    """Write `buf` at `start`, leaving 1 MiB pieces that are all zeros as holes (the file was
    truncated to size, so they read as zeros anyway): a layer may map gigabytes of zeros, e.g. the
    512 MiB journal of overlaybd's base layer."""
    view = memoryview(buf)
    for pos in range(0, len(buf), _SPARSE_PIECE):
        piece = view[pos:pos + _SPARSE_PIECE]
        if buf.count(0, pos, pos + len(piece)) != len(piece):
            out.seek(start + pos)
            out.write(piece)


def _union(a_s: list[int], a_e: list[int], b_s: list[int], b_e: list[int]) -> tuple[list[int], list[int]]:
    """Union of two sorted lists of disjoint intervals, merged where they touch."""
    items = sorted(zip(a_s + b_s, a_e + b_e, strict=True))
    out_s: list[int] = []
    out_e: list[int] = []
    for s, e in items:
        if out_e and s <= out_e[-1]:
            out_e[-1] = max(out_e[-1], e)
        else:
            out_s.append(s)
            out_e.append(e)
    return out_s, out_e
