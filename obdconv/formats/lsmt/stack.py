"""Stacks of LSMT layers (spec §1.7): `LSMTStack(layers)`, the merged view (top layer wins), and
`flatten_to` a sparse raw image."""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from typing import BinaryIO, NamedTuple

from obdconv.errors import FormatError
from obdconv.formats.lsmt.layout import SECTOR, SegmentMapping
from obdconv.formats.lsmt.reader import LSMTFile


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
