"""`Ext4Builder`: the metadata pass. mkfs once, then apply each layer's entry list with libext2fs.

Per layer: with every block libext2fs writes recorded (its test_io manager, under which the image
is opened once, by the first layer), apply the entries (whiteouts, dirs, inodes, links, xattrs,
modes, times), *allocate* regular files' blocks with ext2fs_fallocate(FORCE_INIT) without writing
data, read back each live file's extents, write out everything ext2fs_close2 would (bitmaps,
superblock and group descriptors, the io cache) but keep the filesystem open for the next layer
(C path; the ctypes path closes it), then read the captured blocks from the image. `close()`
frees the handle (also on `with`-exit, or when the builder is collected). The layer's segment
is the captured set minus the blocks owned by files of this layer that are live at its end (a metadata
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
import weakref
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from itertools import accumulate, chain
from operator import add, itemgetter
from pathlib import Path
from typing import Protocol

from obdconv.entries import LayerEntry
from obdconv.errors import BadInputError, ObdconvError, UnsupportedError
from obdconv.ext4 import libext2fs as L
from obdconv.ext4.capture import WriteCapture
from obdconv.ext4.dirs import DirIndex
from obdconv.ext4.filedata import regular_file_data, subtract
from obdconv.ext4.layer import LayerApply
from obdconv.ext4.mkfs import FAKE_TIME, data_blocks, mkfs
from obdconv.ext4.segment import BLOCK_SIZE, Extent, LayerMetadata
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
        # The open ext2_filsys handle, kept between layers (see `_open`); 0 when closed. The
        # finalizer frees it if the builder is dropped without `close()`.
        self._fs = 0
        self._fs_finalizer: weakref.finalize | None = None

    # --- starting points ---
    def mkfs(self) -> None:
        self.close()
        mkfs(self.image_path, self.vsize_bytes, self.fs_uuid)
        self._reset()
        self._pending = set(data_blocks(self.image_path))

    def load_parents(self, device: BlockDevice) -> None:
        """Start from already converted parents: copy the device's mapped ranges into a fresh image."""
        vsize = getattr(device, "virtual_size", self.vsize_bytes)
        if vsize != self.vsize_bytes:
            raise BadInputError(f"parents' virtual size {vsize} differs from this conversion's {self.vsize_bytes}")
        self.close()
        chunk = 1 << 20
        # Regular files' data is never read by a metadata pass: left out (as zeros), the parents'
        # file bytes are never fetched (see filedata.py). None: copy everything.
        file_data = regular_file_data(device)
        fd = os.open(self.image_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

        def copy(offset: int, length: int) -> None:
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

        try:
            os.ftruncate(fd, self.vsize_bytes)
            # (offset, length, ...): LSMTStack adds layer info
            mapped = [(extent[0], extent[1]) for extent in device.extents()]
            subtract(mapped, file_data or [], copy)
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
            if self._fs and not capture.resumable:
                self.close()  # written out by the last apply: nothing is lost
            fs = self._fs
            if fs:
                capture.channel_opened_before(L.filsys(fs).blocksize)
            else:
                fs = self._open()
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
                if capture.resumable:  # the next layer's capture can go on over this channel
                    _write_out(fs, str(self.image_path))
                else:
                    self._forget_fs()  # ext2fs_close2 frees it (or the handler below, if it fails)
                    L.check(L.lib.ext2fs_close2(fs, EXT2_FLAG_FLUSH_NO_SYNC), "ext2fs_close2", str(self.image_path))
            except BaseException as exc:
                self._broken = f"{type(exc).__name__}: {exc}"
                # Dropped without flushing; the image is inconsistent now.
                if self._fs:
                    self.close()
                else:
                    L.lib.ext2fs_free(fs)
                raise
            finally:
                self._dirs.fs = 0
        captured = capture.blocks | self._pending
        self._pending = set()
        segment = _unowned(sorted(captured), file_extents)
        return LayerMetadata(self._read_blocks(segment), file_extents)

    def _open(self) -> int:
        """Open the image for the first layer (or the first after mkfs/load_parents) and keep it
        open: re-opening per layer cost ~15 ms each (ext2fs_read_bitmaps of every used group).
        Called with a `WriteCapture` installed: its test_io channel records the writes."""
        fs = L.open_fs(str(self.image_path), rw=True, io_manager="test_io_manager")
        missing = _missing_features(fs)
        if missing:
            L.lib.ext2fs_free(fs)
            raise UnsupportedError(f"{self.image_path}: the filesystem lacks feature(s) {', '.join(missing)}")
        self._fs = fs
        self._fs_finalizer = weakref.finalize(self, L.lib.ext2fs_free, fs)
        return fs

    def close(self) -> None:
        """Free the open filesystem handle (nothing is written: each `apply` wrote its layer out).
        The builder can go on: the next `apply` opens the image again."""
        if self._fs_finalizer is not None:
            self._fs_finalizer()
        self._forget_fs()

    def _forget_fs(self) -> None:
        if self._fs_finalizer is not None:
            self._fs_finalizer.detach()
        self._fs = 0
        self._fs_finalizer = None

    def __enter__(self) -> Ext4Builder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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


def _write_out(fs: int, what: str) -> None:
    """Everything `ext2fs_close2(fs, EXT2_FLAG_FLUSH_NO_SYNC)` writes, in its order, without
    freeing `fs`: the dirty bitmaps; the superblock and group descriptors if dirty (its
    s_kbytes_written step is skipped, as close2 skips it for the pinned 0); then the blocks
    unix_io still caches, which close2 writes when it closes the channel, so that the image file
    holds the layer for `_read_blocks` and the next pass starts with a clean cache. The in-memory
    state left is what re-opening the image would read: libext2fs updates its copies (orig_super,
    dirty flags) as it writes them. No fsync: the metadata image is scratch (re-made from the
    entries after a crash) and the captured blocks are read back through the page cache; a sync
    per layer only waits for the disk."""
    L.check(L.lib.ext2fs_write_bitmaps(fs), "ext2fs_write_bitmaps", what)
    if L.filsys(fs).flags & L.EXT2_FLAG_DIRTY:
        L.check(L.lib.ext2fs_flush2(fs, EXT2_FLAG_FLUSH_NO_SYNC), "ext2fs_flush2", what)
    # unix_io's "cache=off" writes the cached dirty blocks (no fsync, unlike io_channel_flush);
    # test_io passes options through to it. Back on at once: the cache speeds the next layer.
    io = L.filsys(fs).io
    L.check(L.lib.io_channel_set_options(io, b"cache=off"), "io_channel_set_options(cache=off)", what)
    L.check(L.lib.io_channel_set_options(io, b"cache=on"), "io_channel_set_options(cache=on)", what)


# Features the engine relies on: extent-mapped files and typed directory entries.
_REQUIRED_INCOMPAT = {"filetype": 0x0002, "extent": 0x0040}
_SB_FEATURE_INCOMPAT = 0x60


def _missing_features(fs: int) -> list[str]:
    incompat = L.super_u32(fs, _SB_FEATURE_INCOMPAT)
    return [name for name, bit in _REQUIRED_INCOMPAT.items() if not incompat & bit]


_PBLK, _LENGTH = itemgetter(1), itemgetter(2)  # of an Extent (lblk, pblk, length)
_EXTENTS = itemgetter(1)  # of a (file index, extents) pair


def _unowned(blocks: list[int], file_extents: list[tuple[int, list[Extent]]]) -> list[int]:
    """Sorted `blocks` minus the blocks the files' extents cover. Bisects the extents per block
    (a few thousand blocks against tens of thousands of extents), the extent lists gathered and
    sorted with C-level helpers: no Python-level step per extent."""
    extents = sorted(chain.from_iterable(map(_EXTENTS, file_extents)), key=_PBLK)
    starts = list(map(_PBLK, extents))
    # The furthest end among the extents starting at or before each one: a block is covered
    # iff that reaches past it (overlapping extents, which live files never have, would count too).
    reach = list(accumulate(map(add, starts, map(_LENGTH, extents)), max))
    out: list[int] = []
    for b in blocks:
        i = bisect_right(starts, b)
        if not i or reach[i - 1] <= b:
            out.append(b)
    return out
