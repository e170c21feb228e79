"""Mapping builder: ext4 extents + metadata blocks -> LSMT index runs (pure arithmetic)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from obdconv.entries import EntryType, LayerEntry
from obdconv.pipeline.layout import FS_BLOCK, NativeLayout, data_area_start
from obdconv.pipeline.mapping import (
    MAX_RUN_SECTORS,
    TAG_TARGET,
    MappingError,
    Run,
    native_runs,
    normalise,
    ordered_metadata_blocks,
    turbo_runs,
    verify_runs,
)

VSIZE = 64 << 30


@dataclass
class Ext:
    lblk: int
    pblk: int
    length: int


def _file(path: str, size: int, data_offset: int, tar_offset: int = 512) -> LayerEntry:
    return LayerEntry(path, EntryType.FILE, size=size, data_offset=data_offset, tar_offset=tar_offset)


def _files(entries: list[LayerEntry], extents: list[tuple[int, list[Ext]]]) -> list[tuple[LayerEntry, list[Ext]]]:
    """(index into `entries`, extents) as the ext4 engine reports them -> (entry, extents)."""
    return [(entries[i], exts) for i, exts in extents]


def _block(fill: int) -> bytes:
    return bytes([fill]) * FS_BLOCK


def test_split_at_max_keeps_4k_alignment() -> None:
    total = 3 * MAX_RUN_SECTORS + 40
    runs = normalise([Run(800, total, 16)])
    assert [r.length for r in runs] == [MAX_RUN_SECTORS] * 3 + [40]
    assert all(r.length <= 16383 for r in runs)
    assert all(r.offset % 8 == 0 and r.moffset % 8 == 0 for r in runs)
    # contiguous on both sides
    for a, b in itertools.pairwise(runs):
        assert a.end == b.offset and a.mend == b.moffset


def test_merge_only_when_contiguous_on_both_sides_and_same_tag() -> None:
    runs = normalise([Run(0, 8, 8), Run(8, 8, 16), Run(16, 8, 40), Run(24, 8, 48, tag=TAG_TARGET)])
    assert runs == [Run(0, 16, 8), Run(16, 8, 40), Run(24, 8, 48, TAG_TARGET)]


def test_native_file_extents_map_into_data_area() -> None:
    bs = 4096
    entries = [LayerEntry("d", EntryType.DIR), _file("d/a", 10000, 0), _file("d/b", 5000, 12288)]
    # a: 3 blocks split over two extents; b: 2 blocks
    extents = [(1, [Ext(0, 1000, 2), Ext(2, 2000, 1)]), (2, [Ext(0, 3000, 2)])]
    blocks = [(5, _block(1)), (6, _block(2)), (9, _block(3))]
    ordered, runs = native_runs(blocks, _files(entries, extents), data_start=data_area_start(bs), data_area_size=20480)
    assert [p for p, _ in ordered] == [5, 6, 9]
    meta_start = 4096 + 20480
    by_offset = {r.offset: r for r in runs}
    # metadata blocks 5 and 6 are contiguous on the device and in the file: one run
    assert by_offset[5 * 8] == Run(40, 16, meta_start // 512)
    assert by_offset[9 * 8] == Run(72, 8, meta_start // 512 + 16)
    assert by_offset[1000 * 8] == Run(8000, 16, (4096 + 0) // 512)
    assert by_offset[2000 * 8] == Run(16000, 8, (4096 + 8192) // 512)
    assert by_offset[3000 * 8] == Run(24000, 16, (4096 + 12288) // 512)
    layout = NativeLayout(bs, 20480, len(ordered))
    verify_runs(runs, local_lo=8, local_hi=layout.index_offset // 512, virtual_size=VSIZE)


def test_extent_beyond_file_size_is_clipped() -> None:
    entries = [_file("a", 100, 0)]
    _, runs = native_runs([], [(entries[0], [Ext(0, 50, 4)])], data_start=4096, data_area_size=4096)
    assert runs == [Run(400, 8, 8)]


def test_metadata_block_reused_for_file_data_is_dropped() -> None:
    entries = [_file("a", 8192, 0)]
    blocks = [(50, _block(7)), (51, _block(8)), (52, _block(9))]
    ordered, runs = native_runs(blocks, [(entries[0], [Ext(0, 51, 2)])], data_start=4096, data_area_size=8192)
    assert [p for p, _ in ordered] == [50]
    verify_runs(runs, local_lo=8, local_hi=(4096 + 8192 + 4096) // 512, virtual_size=VSIZE)
    assert sum(r.length for r in runs) == 8 + 16


def test_later_write_of_same_metadata_block_wins() -> None:
    ordered = ordered_metadata_blocks([(3, _block(1)), (3, _block(2))])
    assert ordered == [(3, _block(2))]


def test_turbo_runs_point_into_tar_and_zero_the_block_tail() -> None:
    entries = [_file("a", 5000, -1, tar_offset=1536), _file("b", 100, -1, tar_offset=8192)]
    extents = [(0, [Ext(0, 100, 2)]), (1, [Ext(0, 200, 1)])]
    ordered, runs = turbo_runs([(7, _block(1))], _files(entries, extents), metadata_start=4096)
    assert ordered == [(7, _block(1))]
    assert Run(56, 8, 8) in runs  # metadata, tag 0, right after the header
    # 5000 bytes -> roundup512 = 5120 = 10 sectors, from tar offset 1536 (sector 3)
    assert Run(800, 10, 3, TAG_TARGET) in runs
    assert Run(1600, 1, 16, TAG_TARGET) in runs
    # the rest of each file's last 4 KiB block reads as zeros (dummy moffset at the data start)
    assert Run(810, 6, 8, zeroed=True) in runs  # a: 2 blocks = 16 sectors, 10 covered
    assert Run(1601, 7, 8, zeroed=True) in runs  # b: 1 block = 8 sectors, 1 covered
    assert sum(r.length for r in runs if r.offset >= 800) == 16 + 8
    verify_runs(runs, local_lo=8, local_hi=16, virtual_size=VSIZE)


def test_zeroed_runs_merge_only_with_zeroed_runs_and_keep_their_moffset() -> None:
    runs = normalise([Run(0, 8, 8, zeroed=True), Run(8, 8, 8, zeroed=True), Run(16, 8, 8)])
    assert runs == [Run(0, 16, 8, zeroed=True), Run(16, 8, 8)]
    long = normalise([Run(0, MAX_RUN_SECTORS + 8, 9, zeroed=True)])
    assert long == [Run(0, MAX_RUN_SECTORS, 9, zeroed=True), Run(MAX_RUN_SECTORS, 8, 9, zeroed=True)]


def test_verify_rejects_zeroed_moffset_outside_the_file() -> None:
    verify_runs([Run(0, 8, 16, zeroed=True)], local_lo=8, local_hi=16, virtual_size=VSIZE)
    with pytest.raises(MappingError):
        verify_runs([Run(0, 8, 17, zeroed=True)], local_lo=8, local_hi=16, virtual_size=VSIZE)


def test_turbo_rejects_unaligned_tar_offset() -> None:
    with pytest.raises(MappingError):
        turbo_runs([], [(_file("a", 10, -1, tar_offset=100), [Ext(0, 1, 1)])], metadata_start=4096)


def test_verify_catches_overlap_and_bounds() -> None:
    with pytest.raises(MappingError, match="overlap"):
        verify_runs([Run(0, 16, 8), Run(8, 8, 24)], local_lo=8, local_hi=100, virtual_size=VSIZE)
    with pytest.raises(MappingError, match="outside"):
        verify_runs([Run(0, 16, 8)], local_lo=8, local_hi=20, virtual_size=VSIZE)
    with pytest.raises(MappingError, match="beyond the device"):
        verify_runs([Run(VSIZE // 512 - 4, 8, 8)], local_lo=8, local_hi=100, virtual_size=VSIZE)
    # tag-1 runs are not bounded by the file
    verify_runs([Run(0, 8, 10**9, TAG_TARGET)], local_lo=8, local_hi=9, virtual_size=VSIZE)


def test_file_extents_in_data_area_never_exceed_padded_area() -> None:
    """A large file split over many extents: every run stays inside [data_start, metadata_start)."""
    size = 50 << 20
    nblocks = size // FS_BLOCK
    exts = [*[Ext(i, 100000 + i * 3, 1) for i in range(0, nblocks, 1)][:5], Ext(5, 500000, nblocks - 5)]
    entries = [_file("big", size, 4096)]
    _ordered, runs = native_runs([], [(entries[0], exts)], data_start=4096, data_area_size=4096 + size)
    verify_runs(runs, local_lo=8, local_hi=(4096 + 4096 + size) // 512, virtual_size=VSIZE)
    assert sum(r.length for r in runs) * 512 == size
    assert max(r.length for r in runs) <= MAX_RUN_SECTORS
