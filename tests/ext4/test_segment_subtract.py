"""`_unowned`: a layer's captured blocks minus the blocks its live files own, against a plain
set-based reference."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from obdconv.ext4.builder import _unowned
from obdconv.ext4.segment import Extent

_EXTENT = st.builds(Extent, st.integers(0, 50), st.integers(0, 300), st.integers(1, 40))


@settings(max_examples=300, deadline=None)
@given(st.sets(st.integers(0, 400)), st.lists(st.tuples(st.integers(0, 99), st.lists(_EXTENT, max_size=5)), max_size=8))
def test_unowned_matches_set_difference(blocks: set[int], file_extents: list[tuple[int, list[Extent]]]) -> None:
    owned = {b for _, exts in file_extents for e in exts for b in range(e.pblk, e.pblk + e.length)}
    assert _unowned(sorted(blocks), file_extents) == sorted(blocks - owned)


def test_unowned_edges() -> None:
    assert _unowned([], [(0, [Extent(0, 5, 3)])]) == []
    assert _unowned([4, 5, 7, 8], [(0, [Extent(0, 5, 3)])]) == [4, 8]  # [5, 8) is owned
    assert _unowned([1, 2], []) == [1, 2]
    # A short extent starting after a long one must not hide the long one's reach.
    assert _unowned([10, 30], [(0, [Extent(0, 0, 20)]), (1, [Extent(0, 5, 1)])]) == [30]
