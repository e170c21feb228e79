"""Turn one layer's ext4 metadata (blocks written, file extents) into LSMT index runs.

Pure functions over plain numbers, so they are easy to test: `Run` is an index entry before it
becomes a `formats.lsmt.SegmentMapping` (all quantities in 512-byte sectors).

Native: metadata blocks map to themselves (stored after the data area), every file extent maps to
its bytes in the prepared data area. TurboOCI: metadata blocks are tag-0 data in the fs.meta file,
file extents are tag-1 entries pointing into the uncompressed source tar, and the unused tail of
each file's last 4 KiB block is a zeroed entry (so a lower layer's stale bytes never show there).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from operator import itemgetter
from typing import NamedTuple, Protocol

from obdconv.errors import ObdconvError
from obdconv.pipeline.layout import FS_BLOCK, SECTOR, round_up

SECTORS_PER_BLOCK = FS_BLOCK // SECTOR
# The index `length` field is 14 bits (max 16383 sectors). Split there, but at a multiple of 8 so
# every piece of a 4 KiB-aligned run stays 4 KiB aligned on the device and in the file.
MAX_RUN_SECTORS = (16383 // SECTORS_PER_BLOCK) * SECTORS_PER_BLOCK  # 16376

TAG_LOCAL = 0  # data held in this LSMT file
TAG_TARGET = 1  # turboOCI: data held in the remote target (the uncompressed source tar)


class ExtentLike(Protocol):
    lblk: int
    pblk: int
    length: int


class PlacementLike(Protocol):
    """Where a file's bytes are (`pipeline.metadata.FilePlacement`, or a `LayerEntry` itself)."""

    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def data_offset(self) -> int: ...
    @property
    def tar_offset(self) -> int: ...


FileExtents = Iterable[tuple[PlacementLike, Sequence[ExtentLike]]]


class Run(NamedTuple):
    """Device sectors [offset, offset+length) read from file sectors [moffset, moffset+length);
    a `zeroed` run reads as zeros and stores nothing (`moffset` is a dummy position, spec §1.4).

    A NamedTuple (not a frozen dataclass): a big layer makes ~100k of these, and a tuple is
    built several times faster."""

    offset: int
    length: int
    moffset: int
    tag: int = TAG_LOCAL
    zeroed: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def mend(self) -> int:
        return self.moffset if self.zeroed else self.moffset + self.length


# Run(...) goes through NamedTuple's Python-level __new__ (the defaults); the hot loops below build
# whole tuples with tuple.__new__ instead, several times faster (~300k runs for a 70k-file layer).
_new_run = partial(tuple.__new__, Run)
_by_offset = itemgetter(0)


class MappingError(ObdconvError):
    """The index built for a layer is inconsistent (an internal bug, never bad input)."""


def ordered_metadata_blocks(blocks: Iterable[tuple[int, bytes]], exclude: Sequence[Run] = ()) -> list[tuple[int, bytes]]:
    """Metadata blocks sorted by device block number, one per block (the last write wins), minus
    blocks covered by `exclude` (file data runs, sorted by offset, not overlapping: a block that
    ended up holding file data was reallocated after its metadata was written, so the file's
    bytes are its current content)."""
    latest: dict[int, bytes] = {}
    for pblk, data in blocks:
        if len(data) != FS_BLOCK:
            raise MappingError(f"metadata block {pblk} has {len(data)} bytes, expected {FS_BLOCK}")
        latest[pblk] = data
    starts = [r.offset for r in exclude]
    out = []
    for pblk in sorted(latest):
        sector = pblk * SECTORS_PER_BLOCK
        i = bisect.bisect_right(starts, sector) - 1
        if i >= 0 and exclude[i].end > sector:
            continue
        out.append((pblk, latest[pblk]))
    return out


def _file_extent_pieces(size: int, extents: Iterable[ExtentLike]) -> Iterable[tuple[int, int, int]]:
    """(device byte offset, byte offset within the file, byte length) of each extent, clipped to
    the blocks the file's size needs (an extent never maps past the file's last block)."""
    nblocks = -(-size // FS_BLOCK)
    for ext in extents:
        first = ext.lblk
        last = min(ext.lblk + ext.length, nblocks)
        if last <= first:
            continue
        yield (ext.pblk * FS_BLOCK, first * FS_BLOCK, (last - first) * FS_BLOCK)


def native_file_runs(files: FileExtents, data_start: int) -> list[Run]:
    """File extents -> runs into the data area (which starts at file offset `data_start`).

    The data area holds each file's bytes at `data_offset`, zero padded to a whole 4 KiB
    block, so whole blocks are mapped (the padding hides a lower layer's stale bytes)."""
    runs: list[tuple[int, int, int, int, bool]] = []
    append = runs.append
    for entry, extents in files:
        if entry.data_offset < 0:
            if entry.size:
                raise MappingError(f"{entry.path}: has extents but no bytes in the data area")
            continue
        base = data_start + entry.data_offset
        for dev, within, length in _file_extent_pieces(entry.size, extents):
            append((dev // SECTOR, length // SECTOR, (base + within) // SECTOR, TAG_LOCAL, False))
    return sorted(map(_new_run, runs), key=_by_offset)


def turbo_file_runs(files: FileExtents, zero_moffset: int) -> list[Run]:
    """File extents -> tag-1 runs into the uncompressed source tar (like turboOCI-apply's
    RemoteData: each covers roundup512 of the bytes remaining in the file), plus a zeroed run over
    the unused tail of the file's last 4 KiB block. turboOCI-apply leaves that tail unmapped, so
    it reads through to lower layers: when the block belonged to a file deleted above them, the
    deleted file's bytes would show past EOF. `zero_moffset` is the zeroed runs' dummy file
    position (any sector inside the LSMT's data region is accepted by readers)."""
    runs: list[tuple[int, int, int, int, bool]] = []
    append = runs.append
    for entry, extents in files:
        tar_offset, size = entry.tar_offset, entry.size
        if tar_offset < 0 or tar_offset % SECTOR:
            raise MappingError(f"{entry.path}: tar offset {tar_offset} is not 512-aligned")
        for dev, within, length in _file_extent_pieces(size, extents):
            covered = round_up(min(length, size - within), SECTOR)
            append((dev // SECTOR, covered // SECTOR, (tar_offset + within) // SECTOR, TAG_TARGET, False))
            if covered < length:
                append(((dev + covered) // SECTOR, (length - covered) // SECTOR, zero_moffset, TAG_LOCAL, True))
    return sorted(map(_new_run, runs), key=_by_offset)


def metadata_runs(ordered_blocks: Sequence[tuple[int, bytes]], metadata_start: int) -> list[Run]:
    """Metadata block i (in `ordered_metadata_blocks` order) is stored at metadata_start + i*4096."""
    return [
        _new_run((pblk * SECTORS_PER_BLOCK, SECTORS_PER_BLOCK, (metadata_start + i * FS_BLOCK) // SECTOR, TAG_LOCAL,
                  False))
        for i, (pblk, _) in enumerate(ordered_blocks)
    ]


def normalise(runs: Iterable[Run]) -> list[Run]:
    """Sort, merge neighbours contiguous on the device and in the file (same tag), then split
    every run at MAX_RUN_SECTORS. Overlaps are left for `verify_runs` to report."""
    out: list[Run] = []
    append = out.append
    # The merged run being grown, as plain locals (this loop sees every run of a layer). `cur` is
    # the run itself while nothing merged into it: most runs pass through as they are, without
    # building a new tuple.
    cur: Run | None = None
    cur_off = cur_len = cur_moff = cur_tag = 0
    cur_zero = False
    have = False
    for r in sorted(runs, key=_by_offset_then_moffset):
        offset, length, moffset, tag, zeroed = r
        if length <= 0:
            continue
        if (have and cur_off + cur_len == offset and tag == cur_tag and zeroed == cur_zero
                and (cur_moff if zeroed else cur_moff + cur_len) == moffset):
            cur_len += length
            cur = None
            continue
        if have:
            if cur is not None and cur_len <= MAX_RUN_SECTORS:
                append(cur)
            else:
                _emit_split(append, cur_off, cur_len, cur_moff, cur_tag, cur_zero)
        cur, cur_off, cur_len, cur_moff, cur_tag, cur_zero = r, offset, length, moffset, tag, zeroed
        have = True
    if have:
        if cur is not None and cur_len <= MAX_RUN_SECTORS:
            append(cur)
        else:
            _emit_split(append, cur_off, cur_len, cur_moff, cur_tag, cur_zero)
    return out


_by_offset_then_moffset = itemgetter(0, 2)


def _emit_split(append: Callable[[Run], None], offset: int, length: int, moffset: int, tag: int,
                zeroed: bool) -> None:
    if length <= MAX_RUN_SECTORS:
        append(Run(offset, length, moffset, tag, zeroed))
        return
    done = 0
    while done < length:
        n = min(MAX_RUN_SECTORS, length - done)
        append(Run(offset + done, n, moffset if zeroed else moffset + done, tag, zeroed))
        done += n


def verify_runs(runs: Sequence[Run], *, local_lo: int, local_hi: int, virtual_size: int) -> None:
    """The reader's acceptance rules (spec §1.5): sorted, non-overlapping, lengths 1..16383,
    inside the device, tag-0 data inside [local_lo, local_hi) sectors of the file, and a zeroed
    run's dummy moffset inside [local_lo, local_hi]."""
    device_sectors = virtual_size // SECTOR
    prev_end = 0
    for offset, length, moffset, tag, zeroed in runs:  # unpacked: no property call per run
        end = offset + length
        if not 0 < length <= 16383:
            raise MappingError(f"run at sector {offset} has length {length}")
        if offset < prev_end:
            raise MappingError(f"runs overlap at device sector {offset} (previous ends at {prev_end})")
        if end > device_sectors:
            raise MappingError(f"run [{offset}, {end}) beyond the device ({device_sectors} sectors)")
        if zeroed:
            if not local_lo <= moffset <= local_hi:
                raise MappingError(f"zeroed run at sector {offset} has moffset {moffset} outside "
                                   f"[{local_lo}, {local_hi}]")
        elif tag == TAG_LOCAL and not (local_lo <= moffset and moffset + length <= local_hi):
            raise MappingError(f"run at sector {offset} reads file sectors [{moffset}, {moffset + length}) "
                               f"outside [{local_lo}, {local_hi})")
        prev_end = end


def native_runs(
    blocks: Iterable[tuple[int, bytes]],
    files: FileExtents,
    *,
    data_start: int,
    data_area_size: int,
) -> tuple[list[tuple[int, bytes]], list[Run]]:
    """Everything assemble needs for a native layer's index: the metadata blocks to store (in
    order, right after the data area) and the normalised, verified runs."""
    file_runs = native_file_runs(files, data_start)
    # File runs never overlap one another (verify_runs checks the final list), so sorting them is
    # all the exclusion needs: no merging.
    ordered = ordered_metadata_blocks(blocks, exclude=sorted(file_runs))
    meta = metadata_runs(ordered, data_start + data_area_size)
    return ordered, normalise([*file_runs, *meta])


def turbo_runs(
    blocks: Iterable[tuple[int, bytes]],
    files: FileExtents,
    *,
    metadata_start: int,
) -> tuple[list[tuple[int, bytes]], list[Run]]:
    """The same for a turboOCI fs.meta: metadata blocks as tag-0 data from `metadata_start`,
    file extents as tag-1 runs into the source tar, the tails of their last blocks as zeroed runs."""
    file_runs = turbo_file_runs(files, metadata_start // SECTOR)
    # Exclude whole 4 KiB blocks touched by file data runs (each file's last data run may cover
    # only part of its block; the zeroed tail after it ends on that block's boundary).
    whole = [_new_run((offset, round_up(length, SECTORS_PER_BLOCK), moffset, tag, False))
             for offset, length, moffset, tag, zeroed in file_runs if not zeroed]
    ordered = ordered_metadata_blocks(blocks, exclude=sorted(whole))  # as in native_runs: no merging
    meta = metadata_runs(ordered, metadata_start)
    return ordered, normalise([*file_runs, *meta])
