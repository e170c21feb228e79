"""Data-area alignment: prepared ZFile blocks must land exactly on ZFile block boundaries."""

from __future__ import annotations

import pytest

from obdconv.pipeline.layout import NativeLayout, data_area_start


@pytest.mark.parametrize("bs", [4096, 8192, 16384, 32768, 65536])
def test_data_area_starts_on_a_block_boundary(bs: int) -> None:
    start = data_area_start(bs)
    assert start >= 4096  # room for the LSMT header
    assert start % bs == 0
    assert start // bs == 1  # exactly one block holds the header region


@pytest.mark.parametrize("bs", [4096, 16384])
def test_metadata_and_index_follow_the_padded_data_area(bs: int) -> None:
    layout = NativeLayout(bs, data_area_size=3 * bs, metadata_block_count=5)
    assert layout.metadata_start == data_area_start(bs) + 3 * bs
    assert layout.metadata_start % bs == 0
    assert layout.index_offset == layout.metadata_start + 5 * 4096
    assert layout.index_offset % 512 == 0
