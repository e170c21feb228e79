"""The effective mapping of an RW layer: later writes override earlier ones (`Index0::insert`), as
an RW pair is replayed (reader) and as a layer is recorded before it is committed (writer)."""

from __future__ import annotations

import bisect

from obdconv.formats.lsmt.layout import SegmentMapping


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
