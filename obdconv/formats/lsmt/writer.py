"""Writing committed LSMT files the way `overlaybd-commit` does (spec §1.6): `SegmentIndex` (the effective
mapping of an RW layer, later writes win), compaction, `LSMTWriter` / `commit()` and `commit_rw_pair`."""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from obdconv.errors import FormatError
from obdconv.formats.lsmt.layout import (
    _UUID_RE,
    COMPACT_CHUNK_SECTORS,
    DEFAULT_VSIZE,
    HT_SECTORS,
    HT_SPACE,
    MAX_LENGTH,
    RW_MAX_IO_SECTORS,
    SECTOR,
    SegmentMapping,
    commit_header,
    commit_tail,
    normalize_uuid,
    split_long,
)
from obdconv.formats.lsmt.reader import LSMTFile
from obdconv.formats.lsmt.segments import SegmentIndex
from obdconv.formats.source import RandomAccess


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
