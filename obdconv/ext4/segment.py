"""`Extent` and `LayerMetadata`: what the metadata pass hands to the assemble stage, and its wire form.

`LayerMetadata.to_bytes()` is compact (zstd) because it travels between Celery workers:
    magic b"OBDEXT4M" | u32 version | zstd( u32 nblocks | u64 block[nblocks] | 4096*nblocks content
                                            | u32 nfiles | per file: u32 entry index, u32 nextents,
                                              nextents * (u64 lblk, u64 pblk, u32 length) )
All integers little-endian.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, field
from typing import NamedTuple

import zstandard

from obdconv.errors import FormatError

BLOCK_SIZE = 4096
MAGIC = b"OBDEXT4M"
VERSION = 1
_HEAD = struct.Struct("<8sI")
_U32 = struct.Struct("<I")
_FILE = struct.Struct("<II")
_EXTENT = struct.Struct("<QQI")
_ZSTD_LEVEL = 3


class Extent(NamedTuple):
    """A run of a file's blocks: logical block `lblk` of the file is physical block `pblk` (4 KiB units)."""

    lblk: int
    pblk: int
    length: int


@dataclass(slots=True)
class LayerMetadata:
    """One layer's metadata pass result.

    blocks: the layer's metadata segment, sorted by block number: (4 KiB block number, 4096 bytes).
    file_extents: (index into the entry list given to `apply`, extents) for every regular file created
        in this layer that is still live at the end of it; its bytes fill those extents (whole blocks:
        the assembler maps the file's data padded with zeros to the block end).
    """

    blocks: list[tuple[int, bytes]] = field(default_factory=list)
    file_extents: list[tuple[int, list[Extent]]] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        numbers = array("Q", (b for b, _ in self.blocks))
        if numbers.itemsize != 8:  # pragma: no cover - "Q" is 8 bytes on every supported platform
            raise AssertionError("array('Q') is not 64-bit")
        parts = [_U32.pack(len(self.blocks)), _le(numbers).tobytes()]
        parts.extend(content for _, content in self.blocks)
        parts.append(_U32.pack(len(self.file_extents)))
        for index, extents in self.file_extents:
            parts.append(_FILE.pack(index, len(extents)))
            parts.extend(_EXTENT.pack(*e) for e in extents)
        body = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(b"".join(parts))
        return _HEAD.pack(MAGIC, VERSION) + body

    @classmethod
    def from_bytes(cls, data: bytes) -> LayerMetadata:
        if len(data) < _HEAD.size:
            raise FormatError("layer metadata: truncated header")
        magic, version = _HEAD.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise FormatError(f"layer metadata: bad magic/version {magic!r}/{version}")
        try:
            body = zstandard.ZstdDecompressor().decompress(data[_HEAD.size:])
        except zstandard.ZstdError as exc:
            raise FormatError(f"layer metadata: bad zstd body: {exc}") from exc
        try:
            (nblocks,) = _U32.unpack_from(body, 0)
            pos = 4
            numbers = array("Q")
            numbers.frombytes(body[pos:pos + 8 * nblocks])
            numbers = _le(numbers)
            pos += 8 * nblocks
            blocks = []
            for number in numbers:
                blocks.append((number, body[pos:pos + BLOCK_SIZE]))
                pos += BLOCK_SIZE
            (nfiles,) = _U32.unpack_from(body, pos)
            pos += 4
            files: list[tuple[int, list[Extent]]] = []
            for _ in range(nfiles):
                index, count = _FILE.unpack_from(body, pos)
                pos += _FILE.size
                extents = [Extent(*_EXTENT.unpack_from(body, pos + i * _EXTENT.size)) for i in range(count)]
                pos += count * _EXTENT.size
                files.append((index, extents))
        except struct.error as exc:
            raise FormatError(f"layer metadata: truncated body: {exc}") from exc
        if pos != len(body) or any(len(c) != BLOCK_SIZE for _, c in blocks):
            raise FormatError("layer metadata: body length does not match its counts")
        return cls(blocks, files)


def _le(a: array) -> array:
    """The array in little-endian order (a no-op on x86/arm64; byteswap keeps big-endian hosts right)."""
    import sys

    if sys.byteorder == "big":  # pragma: no cover
        a = array(a.typecode, a)
        a.byteswap()
    return a
