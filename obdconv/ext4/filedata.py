"""Which blocks of an ext4 filesystem are regular files' data: what `Ext4Builder.load_parents` may
leave out of the metadata image.

The metadata pass never reads a regular file's bytes (files are created, replaced and deleted,
never read or edited in place), so converted parents only need their metadata in the scratch
image. Copying the file data too means reading (downloading, decompressing, for turboOCI parents
inflating the whole source layer) every byte of every parent, which made converting one new layer
on top of converted ones slower than converting the whole image.

The walk reads the superblock, the group descriptors, the inode bitmaps and the used part of the
inode tables, and every live regular file's extent tree (index blocks included), through the
device's `pread`. Only blocks it positively knows are file data are skipped: reserved inodes (the
journal, resize inode) and files without extents keep all their blocks, and anything unexpected
(meta_bg, a bad extent header, ...) makes it return None, which means "copy everything".
"""

from __future__ import annotations

import bisect
import logging
import struct
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

SUPERBLOCK_OFFSET = 1024
EXT4_SUPER_MAGIC = 0xEF53
EXT4_FEATURE_INCOMPAT_META_BG = 0x0010
EXT4_FEATURE_INCOMPAT_64BIT = 0x0080
EXT4_FEATURE_RO_COMPAT_GDT_CSUM = 0x0010
EXT4_FEATURE_RO_COMPAT_METADATA_CSUM = 0x0400
EXT4_BG_INODE_UNINIT = 0x0001
EXT4_EXTENTS_FL = 0x00080000
EXT4_INLINE_DATA_FL = 0x10000000
EXT4_EXT_MAGIC = 0xF30A
EXT_INIT_MAX_LEN = 1 << 15
S_IFMT = 0o170000
S_IFREG = 0o100000

# struct ext4_super_block field offsets (from the superblock start)
S_INODES_COUNT = 0x00
S_BLOCKS_COUNT_LO = 0x04
S_FIRST_DATA_BLOCK = 0x14
S_LOG_BLOCK_SIZE = 0x18
S_INODES_PER_GROUP = 0x28
S_MAGIC = 0x38
S_FIRST_INO = 0x54
S_INODE_SIZE = 0x58
S_FEATURE_INCOMPAT = 0x60
S_FEATURE_RO_COMPAT = 0x64
S_DESC_SIZE = 0xFE
S_BLOCKS_COUNT_HI = 0x150
# struct ext4_group_desc field offsets
BG_INODE_BITMAP_LO = 0x04
BG_INODE_TABLE_LO = 0x08
BG_FLAGS = 0x12
BG_ITABLE_UNUSED_LO = 0x1C
BG_INODE_BITMAP_HI = 0x24
BG_INODE_TABLE_HI = 0x28
BG_ITABLE_UNUSED_HI = 0x32
# struct ext4_inode field offsets
I_MODE = 0x00
I_FLAGS = 0x20
I_BLOCK = 0x28
I_BLOCK_SIZE = 60
_EXTENT_HEADER = struct.Struct("<HHHHI")  # eh_magic, eh_entries, eh_max, eh_depth, eh_generation
_EXTENT_ENTRY = struct.Struct("<IHHI")  # leaf: ee_block, ee_len, ee_start_hi, ee_start_lo
_EXTENT_INDEX = struct.Struct("<IIHH")  # index: ei_block, ei_leaf_lo, ei_leaf_hi, ei_unused


class PreadDevice(Protocol):
    def pread(self, offset: int, length: int) -> bytes: ...


class _Unsupported(Exception):
    """Something the walk does not understand: the caller copies everything instead."""


def regular_file_data(device: PreadDevice) -> list[tuple[int, int]] | None:
    """(byte offset, byte length) of every block holding live regular files' data, sorted and
    merged; None when the filesystem has a layout this walk does not handle."""
    try:
        walk = _Walk(device)
        return _merge(walk.to_bytes(walk.file_blocks()))
    except (_Unsupported, struct.error, ValueError) as e:
        log.info("parents: copying every block (%s)", e)
        return None


class _Walk:
    def __init__(self, device: PreadDevice) -> None:
        self.device = device
        sb = device.pread(SUPERBLOCK_OFFSET, 1024)
        if len(sb) < 1024:
            raise _Unsupported("short superblock")

        def u16(at: int) -> int:
            return int.from_bytes(sb[at:at + 2], "little")

        def u32(at: int) -> int:
            return int.from_bytes(sb[at:at + 4], "little")

        if u16(S_MAGIC) != EXT4_SUPER_MAGIC:
            raise _Unsupported(f"no ext4 superblock (magic {u16(S_MAGIC):#x})")
        incompat, ro_compat = u32(S_FEATURE_INCOMPAT), u32(S_FEATURE_RO_COMPAT)
        if incompat & EXT4_FEATURE_INCOMPAT_META_BG:
            raise _Unsupported("meta_bg group descriptors")
        is64 = bool(incompat & EXT4_FEATURE_INCOMPAT_64BIT)
        self.block_size = 1024 << u32(S_LOG_BLOCK_SIZE)
        self.inodes_per_group = u32(S_INODES_PER_GROUP)
        self.first_ino, self.inode_size = u32(S_FIRST_INO), u16(S_INODE_SIZE)
        self.desc_size = max(u16(S_DESC_SIZE), 64) if is64 else 32
        # bg_itable_unused is kept up to date only with group descriptor checksums
        self.itable_unused_valid = bool(ro_compat & (EXT4_FEATURE_RO_COMPAT_GDT_CSUM
                                                     | EXT4_FEATURE_RO_COMPAT_METADATA_CSUM))
        self.blocks_count = u32(S_BLOCKS_COUNT_LO) | ((u32(S_BLOCKS_COUNT_HI) << 32) if is64 else 0)
        if not self.inodes_per_group or self.inode_size < 128:
            raise _Unsupported("no inode groups")
        self.groups = -(-u32(S_INODES_COUNT) // self.inodes_per_group)
        self.gdt_offset = (u32(S_FIRST_DATA_BLOCK) + 1) * self.block_size

    def _read(self, offset: int, length: int) -> bytes:
        data = self.device.pread(offset, length)
        if len(data) != length:
            raise _Unsupported(f"short read at {offset}")
        return data

    def file_blocks(self) -> list[tuple[int, int]]:
        gdt = self._read(self.gdt_offset, self.groups * self.desc_size)
        out: list[tuple[int, int]] = []
        for g in range(self.groups):
            d = g * self.desc_size

            def field(at: int, size: int, d: int = d) -> int:
                return int.from_bytes(gdt[d + at:d + at + size], "little")

            inode_bitmap, inode_table = field(BG_INODE_BITMAP_LO, 4), field(BG_INODE_TABLE_LO, 4)
            unused = field(BG_ITABLE_UNUSED_LO, 2)
            if self.desc_size >= 64:
                inode_bitmap |= field(BG_INODE_BITMAP_HI, 4) << 32
                inode_table |= field(BG_INODE_TABLE_HI, 4) << 32
                unused |= field(BG_ITABLE_UNUSED_HI, 2) << 16
            if field(BG_FLAGS, 2) & EXT4_BG_INODE_UNINIT:
                continue
            count = self.inodes_per_group - unused if self.itable_unused_valid else self.inodes_per_group
            if count <= 0:
                continue
            bitmap = self._read(inode_bitmap * self.block_size, -(-self.inodes_per_group // 8))
            table = self._read(inode_table * self.block_size, count * self.inode_size)
            for i in _set_bits(bitmap, count):
                ino = g * self.inodes_per_group + i + 1
                if ino < self.first_ino:
                    continue  # reserved inodes (root dir, journal, resize inode, ...) keep their blocks
                self._inode(table, i * self.inode_size, out)
        return out

    def _inode(self, table: bytes, at: int, out: list[tuple[int, int]]) -> None:
        mode = int.from_bytes(table[at + I_MODE:at + I_MODE + 2], "little")
        if mode & S_IFMT != S_IFREG:
            return  # directories, symlinks, ...: their blocks are metadata here
        flags = int.from_bytes(table[at + I_FLAGS:at + I_FLAGS + 4], "little")
        if flags & EXT4_INLINE_DATA_FL or not flags & EXT4_EXTENTS_FL:
            return  # inline data has no blocks; block-mapped files keep theirs (not parsed)
        self._extents(table[at + I_BLOCK:at + I_BLOCK + I_BLOCK_SIZE], out, depth_limit=8)

    def _extents(self, node: bytes, out: list[tuple[int, int]], depth_limit: int) -> None:
        magic, entries, max_entries, depth, _gen = _EXTENT_HEADER.unpack_from(node, 0)
        if magic != EXT4_EXT_MAGIC or entries > max_entries or depth_limit <= 0:
            raise _Unsupported("bad extent header")
        if 12 + entries * 12 > len(node):
            raise _Unsupported("extent node overflows its block")
        for k in range(entries):
            if depth == 0:
                _lblk, length, start_hi, start_lo = _EXTENT_ENTRY.unpack_from(node, 12 + 12 * k)
                if length > EXT_INIT_MAX_LEN:
                    length -= EXT_INIT_MAX_LEN  # an unwritten extent: still the file's blocks
                start = start_lo | start_hi << 32
                if start + length > self.blocks_count:
                    raise _Unsupported("extent beyond the filesystem")
                out.append((start, length))
            else:
                _lblk, leaf_lo, leaf_hi, _unused = _EXTENT_INDEX.unpack_from(node, 12 + 12 * k)
                child = leaf_lo | leaf_hi << 32
                if child >= self.blocks_count:
                    raise _Unsupported("extent index beyond the filesystem")
                # the index block itself is metadata: not added, so it is copied
                self._extents(self._read(child * self.block_size, self.block_size), out, depth_limit - 1)

    def to_bytes(self, blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(b * self.block_size, n * self.block_size) for b, n in blocks]


def _set_bits(bitmap: bytes, count: int) -> list[int]:
    """Indexes < count of the bits set in a little-endian ext4 bitmap."""
    value = int.from_bytes(bitmap, "little")
    out = []
    while value:
        low = value & -value
        i = low.bit_length() - 1
        if i >= count:
            break
        out.append(i)
        value ^= low
    return out


def _merge(blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, length in sorted(blocks):
        if merged and start <= merged[-1][0] + merged[-1][1]:
            s, n = merged[-1]
            merged[-1] = (s, max(n, start + length - s))
        else:
            merged.append((start, length))
    return merged


def subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]],
             on_piece: Callable[[int, int], None]) -> None:
    """Call `on_piece(offset, length)` for each part of `ranges` (sorted, not overlapping) outside
    `holes` (sorted, merged)."""
    starts = [h[0] for h in holes]
    for offset, length in ranges:
        end = offset + length
        pos = offset
        i = max(bisect.bisect_right(starts, pos) - 1, 0)
        while pos < end:
            while i < len(holes) and holes[i][0] + holes[i][1] <= pos:
                i += 1
            if i == len(holes) or holes[i][0] >= end:
                on_piece(pos, end - pos)
                break
            h_start, h_len = holes[i]
            if h_start > pos:
                on_piece(pos, h_start - pos)
            pos = h_start + h_len
