"""Reading LSMT files: `LSMTFile.open(f, target=None)` for committed, sealed and warp (turboOCI) files,
enforcing spec §1.5; `LSMTFile.open_rw(data_f, index_f)` for an RW pair (normal or sparse)."""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from obdconv.errors import FormatError
from obdconv.formats.lsmt.layout import (
    HT_SECTORS,
    HT_SPACE,
    MAX_LSMT_RO_INDEX_SIZE,
    MAX_RW_INDEX_SIZE,
    SECTOR,
    LSMTHeader,
    SegmentMapping,
    split_long,
    unpack_index,
)
from obdconv.formats.lsmt.segments import SegmentIndex
from obdconv.formats.source import RandomAccess, as_source, source_size


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
