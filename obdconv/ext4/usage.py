"""Which blocks of an ext4 image are in use: the block bitmap as libext2fs sees it.

`--flatten` keeps only what the image's final filesystem still uses: a block that a later layer
freed (a deleted or replaced file's data, a directory block of a removed directory) is no longer
allocated, and its bytes never reach the flattened layer. The bitmap is read through libext2fs, not
parsed here: groups with BLOCK_UNINIT have no bitmap on disk, and libext2fs derives theirs.
"""

from __future__ import annotations

import ctypes
import errno
import os

from obdconv.ext4 import libext2fs as L


def allocated_ranges(image_path: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """(first block, block count) of every run of in-use blocks of the ext4 image, sorted."""
    path = os.fspath(image_path)
    fs = L.open_fs(path, rw=False)
    try:
        L.check(L.lib.ext2fs_read_block_bitmap(fs), "ext2fs_read_block_bitmap", path)
        bitmap = L.filsys(fs).block_map
        first = L.super_u32(fs, L.SB_FIRST_DATA_BLOCK)
        last = int(L.lib.ext2fs_blocks_count(L.filsys(fs).super)) - 1
        out: list[tuple[int, int]] = []
        found = L.blk64_t()
        pos = first
        while pos <= last:  # alternate: next set bit, then the next clear one after it
            rc = L.lib.ext2fs_find_first_set_block_bitmap2(bitmap, pos, last, ctypes.byref(found))
            if rc == errno.ENOENT:
                break
            L.check(rc, "ext2fs_find_first_set_block_bitmap2", path)
            start = found.value
            rc = L.lib.ext2fs_find_first_zero_block_bitmap2(bitmap, start, last, ctypes.byref(found))
            if rc == errno.ENOENT:
                end = last + 1
            else:
                L.check(rc, "ext2fs_find_first_zero_block_bitmap2", path)
                end = found.value
            out.append((start, end - start))
            pos = end
        return out
    finally:
        L.lib.ext2fs_free(fs)
