"""`Ext4Builder`: the metadata pass. mkfs once, then apply each layer's entry list with libext2fs.

Per layer: open the metadata image through libext2fs's test_io manager (every written block is
recorded), apply the entries (whiteouts, dirs, inodes, links, xattrs, modes, times), *allocate*
regular files' blocks with ext2fs_fallocate(FORCE_INIT) without writing data, read back each live
file's extents, close, then read the captured blocks from the image. The layer's segment is the
captured set minus the blocks owned by files of this layer that are live at its end (a metadata
block freed within the layer may be reused as file data; the file's bytes own it then).

Failures: an entry list that is wrong in itself (bad path, type, owner, device number, symlink
target, xattr) is rejected before anything is written, and the builder is unchanged. An error that
depends on the filesystem (a parent that is a symlink or a file, a missing hardlink target, the
image running out of space) is found while applying; the builder is then *unusable* (every later
call raises) until `mkfs()` or `load_parents()` starts it again.
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from obdconv.entries import LayerEntry
from obdconv.errors import BadInputError, ObdconvError, UnsupportedError
from obdconv.ext4 import libext2fs as L
from obdconv.ext4.capture import WriteCapture
from obdconv.ext4.dirs import DirIndex
from obdconv.ext4.layer import LayerApply
from obdconv.ext4.mkfs import FAKE_TIME, data_blocks, mkfs
from obdconv.ext4.segment import BLOCK_SIZE, LayerMetadata
from obdconv.ext4.validate import validate_entries


class BlockDevice(Protocol):
    """What `load_parents` reads: the stacked converted parents (e.g. formats.lsmt.LSMTStack)."""

    def pread(self, offset: int, length: int) -> bytes: ...

    def extents(self) -> Iterable[Sequence[int]]: ...  # (offset, length, ...) byte ranges holding data


class Ext4Builder:
    """The metadata image of one image conversion, advanced one layer per `apply`."""

    def __init__(self, image_path: Path, vsize_bytes: int, fs_uuid: uuid.UUID) -> None:
        self.image_path = Path(image_path)
        self.vsize_bytes = vsize_bytes
        self.fs_uuid = fs_uuid
        self._dirs = DirIndex()
        self._pending: set[int] = set()  # blocks written outside apply (mkfs), owed to the next segment
        self._ready = False
        self._broken: str | None = None

    # --- starting points ---
    def mkfs(self) -> None:
        mkfs(self.image_path, self.vsize_bytes, self.fs_uuid)
        self._reset()
        self._pending = set(data_blocks(self.image_path))

    def load_parents(self, device: BlockDevice) -> None:
        """Start from already converted parents: copy the device's mapped ranges into a fresh image."""
        vsize = getattr(device, "virtual_size", self.vsize_bytes)
        if vsize != self.vsize_bytes:
            raise BadInputError(f"parents' virtual size {vsize} differs from this conversion's {self.vsize_bytes}")
        chunk = 1 << 20
        fd = os.open(self.image_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, self.vsize_bytes)
            for extent in device.extents():
                offset, length = extent[0], extent[1]  # (offset, length, ...): LSMTStack adds layer info
                end = offset + length
                pos = offset
                while pos < end:
                    n = min(chunk, end - pos)
                    data = device.pread(pos, n)
                    if len(data) != n:
                        raise ObdconvError(f"parent device short read at {pos}: {len(data)} of {n}")
                    if data.count(0) != n:  # keep the image sparse where the device holds zeros
                        os.pwrite(fd, data, pos)
                    pos += n
        finally:
            os.close(fd)
        self._reset()

    def _reset(self) -> None:
        self._dirs.clear()
        self._pending = set()
        self._ready = True
        self._broken = None

    # --- one layer ---
    def apply(self, entries: Sequence[LayerEntry]) -> LayerMetadata:
        if self._broken:
            raise ObdconvError(f"ext4 builder is unusable after an earlier failure: {self._broken}")
        if not self._ready:
            raise ObdconvError("ext4 builder: call mkfs() or load_parents() before apply()")
        # The pass allocates a few small objects per entry (dict items, extent lists) that live
        # until the end: the cyclic GC would rescan them over and over (~20 % of the pass, more
        # with bigger heaps) and finds nothing (no cycles are made here). Paused, not disabled
        # for good: re-enabled at the end if it was on.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._apply(entries)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _apply(self, entries: Sequence[LayerEntry]) -> LayerMetadata:
        validate_entries(entries)
        capture = WriteCapture()
        with capture:
            fs = L.open_fs(str(self.image_path), rw=True, io_manager="test_io_manager")
            missing = _missing_features(fs)
            if missing:
                L.lib.ext2fs_free(fs)
                raise UnsupportedError(f"{self.image_path}: the filesystem lacks feature(s) {', '.join(missing)}")
            try:
                L.filsys(fs).now = FAKE_TIME  # stamps s_wtime; all inode times are set explicitly
                self._dirs.fs = fs
                layer = LayerApply(fs, self._dirs, entries)
                layer.run()
                file_extents = layer.file_extents()
                # s_kbytes_written would count the bytes the io channel pushed to the file, which
                # depends on its cache (when blocks get evicted), not on the layer. 0 means "not
                # tracked", and ext2fs_close2 leaves a 0 alone: pinned, the bytes are the layer's.
                L.set_super_u64(fs, L.SB_KBYTES_WRITTEN, 0)
                # No fsync: the metadata image is scratch (re-made from the entries after a crash)
                # and the captured blocks are read back through the page cache; a sync per layer
                # only waits for the disk.
                L.check(L.lib.ext2fs_close2(fs, EXT2_FLAG_FLUSH_NO_SYNC), "ext2fs_close2", str(self.image_path))
            except BaseException as exc:
                self._broken = f"{type(exc).__name__}: {exc}"
                L.lib.ext2fs_free(fs)  # drop without flushing; the image is inconsistent now
                raise
            finally:
                self._dirs.fs = 0
        captured = capture.blocks | self._pending
        self._pending = set()
        owned = sorted((e.pblk, e.pblk + e.length) for _, exts in file_extents for e in exts)
        segment = _subtract(sorted(captured), owned)
        return LayerMetadata(self._read_blocks(segment), file_extents)

    def _read_blocks(self, numbers: list[int]) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        with open(self.image_path, "rb") as f:
            fd = f.fileno()
            i = 0
            while i < len(numbers):  # read runs of consecutive blocks with one pread each
                j = i + 1
                while j < len(numbers) and numbers[j] == numbers[j - 1] + 1 and j - i < 256:
                    j += 1
                data = os.pread(fd, (j - i) * BLOCK_SIZE, numbers[i] * BLOCK_SIZE)
                data = data.ljust((j - i) * BLOCK_SIZE, b"\0")
                for k in range(i, j):
                    off = (k - i) * BLOCK_SIZE
                    out.append((numbers[k], data[off:off + BLOCK_SIZE]))
                i = j
        return out


EXT2_FLAG_FLUSH_NO_SYNC = 1  # ext2fs.h: ext2fs_close2/ext2fs_flush2 skip the final io_channel_flush

# Features the engine relies on: extent-mapped files and typed directory entries.
_REQUIRED_INCOMPAT = {"filetype": 0x0002, "extent": 0x0040}
_SB_FEATURE_INCOMPAT = 0x60


def _missing_features(fs: int) -> list[str]:
    incompat = L.super_u32(fs, _SB_FEATURE_INCOMPAT)
    return [name for name, bit in _REQUIRED_INCOMPAT.items() if not incompat & bit]


def _subtract(blocks: list[int], ranges: list[tuple[int, int]]) -> list[int]:
    """Sorted `blocks` minus the union of sorted half-open `ranges`."""
    out: list[int] = []
    r = 0
    for b in blocks:
        while r < len(ranges) and ranges[r][1] <= b:
            r += 1
        if r < len(ranges) and ranges[r][0] <= b:
            continue
        out.append(b)
    return out


