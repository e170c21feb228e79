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
resize inode, ...) and files without extents keep all their blocks, and anything unexpected
(meta_bg, a bad extent header, ...) makes it return None, which means "copy everything". The one
reserved inode whose blocks are skipped is the journal's (its extent tree is still copied): libext2fs
neither reads nor writes a journal, and overlaybd's own base layer (`--mkfs=false`) carries 512 MiB
of one, which made every metadata pass on it read half a GiB.
"""

from __future__ import annotations

import bisect
import logging
import struct
from collections.abc import Callable
from typing import Protocol

from obdconv.ext4 import libext2fs as L

log = logging.getLogger(__name__)

_I_MODE = L.Ext2InodeLarge.i_mode.offset
_I_FLAGS = L.Ext2InodeLarge.i_flags.offset
_I_BLOCK = L.Ext2InodeLarge.i_block.offset
_I_BLOCK_SIZE = L.Ext2InodeLarge.i_block.size


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
        sb = device.pread(L.SUPERBLOCK_OFFSET, 1024)
        if len(sb) < 1024:
            raise _Unsupported("short superblock")

        def u16(at: int) -> int:
            return int.from_bytes(sb[at:at + 2], "little")

        def u32(at: int) -> int:
            return int.from_bytes(sb[at:at + 4], "little")

        if u16(L.SB_MAGIC) != L.EXT2_SUPER_MAGIC:
            raise _Unsupported(f"no ext4 superblock (magic {u16(L.SB_MAGIC):#x})")
        incompat, ro_compat = u32(L.SB_FEATURE_INCOMPAT), u32(L.SB_FEATURE_RO_COMPAT)
        if incompat & L.EXT4_FEATURE_INCOMPAT_META_BG:
            raise _Unsupported("meta_bg group descriptors")
        is64 = bool(incompat & L.EXT4_FEATURE_INCOMPAT_64BIT)
        self.block_size = 1024 << u32(L.SB_LOG_BLOCK_SIZE)
        self.inodes_per_group = u32(L.SB_INODES_PER_GROUP)
        self.first_ino, self.inode_size = u32(L.SB_FIRST_INO), u16(L.SB_INODE_SIZE)
        self.desc_size = max(u16(L.SB_DESC_SIZE), 64) if is64 else 32
        # bg_itable_unused is kept up to date only with group descriptor checksums
        self.itable_unused_valid = bool(ro_compat & (L.EXT4_FEATURE_RO_COMPAT_GDT_CSUM
                                                     | L.EXT4_FEATURE_RO_COMPAT_METADATA_CSUM))
        self.blocks_count = u32(L.SB_BLOCKS_COUNT_LO) | ((u32(L.SB_BLOCKS_COUNT_HI) << 32) if is64 else 0)
        if not self.inodes_per_group or self.inode_size < 128:
            raise _Unsupported("no inode groups")
        self.groups = -(-u32(L.SB_INODES_COUNT) // self.inodes_per_group)
        has_journal = u32(L.SB_FEATURE_COMPAT) & L.EXT3_FEATURE_COMPAT_HAS_JOURNAL
        self.journal_ino = u32(L.SB_JOURNAL_INUM) if has_journal else 0
        self.gdt_offset = (u32(L.SB_FIRST_DATA_BLOCK) + 1) * self.block_size

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

            inode_bitmap, inode_table = field(L.BG_INODE_BITMAP_LO, 4), field(L.BG_INODE_TABLE_LO, 4)
            unused = field(L.BG_ITABLE_UNUSED_LO, 2)
            if self.desc_size >= 64:
                inode_bitmap |= field(L.BG_INODE_BITMAP_HI, 4) << 32
                inode_table |= field(L.BG_INODE_TABLE_HI, 4) << 32
                unused |= field(L.BG_ITABLE_UNUSED_HI, 2) << 16
            if field(L.BG_FLAGS, 2) & L.EXT4_BG_INODE_UNINIT:
                continue
            count = self.inodes_per_group - unused if self.itable_unused_valid else self.inodes_per_group
            if count <= 0:
                continue
            bitmap = self._read(inode_bitmap * self.block_size, -(-self.inodes_per_group // 8))
            table = self._read(inode_table * self.block_size, count * self.inode_size)
            for i in _set_bits(bitmap, count):
                ino = g * self.inodes_per_group + i + 1
                if ino < self.first_ino and ino != self.journal_ino:
                    continue  # reserved inodes (root dir, resize inode, ...) keep their blocks
                self._inode(table, i * self.inode_size, out)
        return out

    def _inode(self, table: bytes, at: int, out: list[tuple[int, int]]) -> None:
        mode = int.from_bytes(table[at + _I_MODE:at + _I_MODE + 2], "little")
        if mode & L.LINUX_S_IFMT != L.LINUX_S_IFREG:
            return  # directories, symlinks, ...: their blocks are metadata here
        flags = int.from_bytes(table[at + _I_FLAGS:at + _I_FLAGS + 4], "little")
        if flags & L.EXT4_INLINE_DATA_FL or not flags & L.EXT4_EXTENTS_FL:
            return  # inline data has no blocks; block-mapped files keep theirs (not parsed)
        self._extents(table[at + _I_BLOCK:at + _I_BLOCK + _I_BLOCK_SIZE], out, depth_limit=8)

    def _extents(self, node: bytes, out: list[tuple[int, int]], depth_limit: int) -> None:
        magic, entries, max_entries, depth, _gen = L.EXT_HEADER.unpack_from(node, 0)
        if magic != L.EXT3_EXT_MAGIC or entries > max_entries or depth_limit <= 0:
            raise _Unsupported("bad extent header")
        if 12 + entries * 12 > len(node):
            raise _Unsupported("extent node overflows its block")
        for k in range(entries):
            if depth == 0:
                _lblk, length, start_hi, start_lo = L.EXT_LEAF.unpack_from(node, 12 + 12 * k)
                if length > L.EXT_INIT_MAX_LEN:
                    length -= L.EXT_INIT_MAX_LEN  # an unwritten extent: still the file's blocks
                start = start_lo | start_hi << 32
                if start + length > self.blocks_count:
                    raise _Unsupported("extent beyond the filesystem")
                out.append((start, length))
            else:
                _lblk, leaf_lo, leaf_hi, _unused = L.EXT_INDEX.unpack_from(node, 12 + 12 * k)
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
