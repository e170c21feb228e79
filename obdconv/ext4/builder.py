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

import os
import uuid
import weakref
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
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
from obdconv.gcpause import gc_paused


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
        with gc_paused():
            session = self.begin_layer(track_touched=None)
            session.add(entries)
            return session.finish()

    def begin_layer(self, *, track_touched: bool | None = True) -> LayerSession:
        """Apply one layer's entry list in parts, as they become known (e.g. while the layer is
        still being scanned): `add` each part in order, then `finish` for the layer's metadata.
        The result is the same as one `apply` of all the parts. `track_touched=None` decides from
        the first part whether the layer's paths need tracking (only opaque markers need them;
        right when that part is all the layer), True tracks them whatever comes."""
        if self._broken:
            raise ObdconvError(f"ext4 builder is unusable after an earlier failure: {self._broken}")
        if not self._ready:
            raise ObdconvError("ext4 builder: call mkfs() or load_parents() before apply()")
        return LayerSession(self, track_touched)

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


class LayerSession:
    """One layer applied part by part (see `Ext4Builder.begin_layer`).

    Every part is validated before any of it is written, and applied with every block libext2fs
    writes recorded (its test_io manager, under which the image is opened once, by the first
    layer); `finish` sets the directories' times, reads back each live file's extents, writes out
    everything ext2fs_close2 would (bitmaps, superblock and group descriptors, the io cache) but
    keeps the filesystem open for the next layer (C path; the ctypes path closes it), then reads
    the captured blocks from the image. On the C path the write capture (one per process, see
    capture.py) is held only while a part is applied, so other builders in this process (other
    manifests) may apply theirs in between; the ctypes path holds it from the first part to the end.

    A failure once something was written leaves the builder unusable (see the module doc); a part
    rejected by validation before anything was written leaves it unchanged.
    """

    def __init__(self, builder: Ext4Builder, track_touched: bool | None) -> None:
        self.builder = builder
        self.track_touched = track_touched
        self.entries: list[LayerEntry] = []
        self.captured: set[int] = set()
        self.layer: LayerApply | None = None
        self.fs = 0
        self._capture: WriteCapture | None = None  # held across parts (ctypes path)
        self._done = False

    def _run(self, step: Callable[[], object]) -> None:
        """Run `step` on the open filesystem with its writes captured. A failure breaks the builder."""
        with gc_paused():
            self._run_captured(step)

    def _run_captured(self, step: Callable[[], object]) -> None:
        try:
            if self._capture is not None:  # ctypes path, after the first part: still installed
                self._step(step)
                return
            capture = WriteCapture()
            capture.__enter__()
            try:
                if self.fs == 0:
                    self._start(capture)
                else:
                    capture.channel_opened_before(L.filsys(self.fs).blocksize)
                self._step(step)
            except BaseException as exc:
                if self._capture is not capture:  # the ctypes path's stays installed until _release
                    capture.__exit__(type(exc), exc, exc.__traceback__)
                raise
            if self._capture is not capture:
                capture.__exit__(None, None, None)
                self.captured |= capture.blocks
        except BaseException as exc:
            self._fail(exc)
            raise

    def _step(self, step: Callable[[], object]) -> None:
        b = self.builder
        b._dirs.fs = self.fs
        try:
            step()
        finally:
            b._dirs.fs = 0

    def _start(self, capture: WriteCapture) -> None:
        """Open (or resume) the filesystem for this layer, inside the first part's capture."""
        b = self.builder
        if not capture.resumable:
            # The ctypes callbacks reach only channels opened while they are installed: keep
            # this capture for the whole layer, and start from a closed filesystem.
            self._capture = capture
            if b._fs:
                b.close()  # written out by the last apply: nothing is lost
        if b._fs:
            capture.channel_opened_before(L.filsys(b._fs).blocksize)
            self.fs = b._fs
        else:
            self.fs = b._open()
        L.filsys(self.fs).now = FAKE_TIME  # stamps s_wtime; all inode times are set explicitly

    def _fail(self, exc: BaseException) -> None:
        b = self.builder
        self._done = True
        b._broken = f"{type(exc).__name__}: {exc}"
        # Dropped without flushing; the image is inconsistent now.
        if b._fs:
            b.close()
        elif self.fs:
            L.lib.ext2fs_free(self.fs)
        self.fs = 0
        self._release()

    def _release(self) -> None:
        if self._capture is not None:
            capture, self._capture = self._capture, None
            capture.__exit__(None, None, None)
            self.captured |= capture.blocks

    def add(self, entries: Sequence[LayerEntry]) -> None:
        """Apply the next entries of the layer (in tar order)."""
        if self._done:
            raise ObdconvError("ext4 layer session: add() after finish() or a failure")
        if not entries:
            return
        start = len(self.entries)
        try:
            validate_entries(entries, start)
        except BaseException as exc:
            if start:  # earlier parts are in the image: it cannot be taken back
                self._fail(exc)
            else:
                self._done = True
                self._release()
            raise
        self.entries.extend(entries)

        def step() -> None:
            if self.layer is None:  # (None: LayerApply decides from the first part, then the only one)
                self.layer = LayerApply(self.fs, self.builder._dirs, self.entries, track_touched=self.track_touched)
            self.layer.apply_range(start, len(self.entries))

        self._run(step)

    def finish(self) -> LayerMetadata:
        """The layer's metadata: its blocks (captured, minus those its live files own) and each
        live file's extents."""
        if self._done:
            raise ObdconvError("ext4 layer session: finish() twice or after a failure")
        b = self.builder
        file_extents: list[tuple[int, list[Extent]]] = []

        def step() -> None:
            nonlocal file_extents
            if self.layer is None:  # an empty layer: nothing changes but the superblock's write time
                self.layer = LayerApply(self.fs, b._dirs, self.entries, track_touched=False)
            self.layer.finish()
            file_extents = self.layer.file_extents()
            # s_kbytes_written would count the bytes the io channel pushed to the file, which
            # depends on its cache (when blocks get evicted), not on the layer. 0 means "not
            # tracked", and ext2fs_close2 leaves a 0 alone: pinned, the bytes are the layer's.
            L.set_super_u64(self.fs, L.SB_KBYTES_WRITTEN, 0)
            if self._capture is None:  # C path: the next layer's capture can go on over this channel
                _write_out(self.fs, str(b.image_path))
            else:
                b._forget_fs()  # ext2fs_close2 frees it (or _fail, if it fails)
                L.check(L.lib.ext2fs_close2(self.fs, EXT2_FLAG_FLUSH_NO_SYNC), "ext2fs_close2", str(b.image_path))
                self.fs = 0

        self._run(step)
        self._done = True
        self._release()
        captured = self.captured | b._pending
        b._pending = set()
        with gc_paused():
            segment = _unowned(sorted(captured), file_extents)
            return LayerMetadata(b._read_blocks(segment), file_extents)

    def abort(self) -> None:
        """Give up on this layer (its entries will not all come): the builder is unusable after it
        if anything was applied, unchanged otherwise."""
        if self._done:
            return
        if self.entries:
            self._fail(ObdconvError("ext4 layer session aborted before its layer was complete"))
        else:
            self._done = True
            self._release()


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
