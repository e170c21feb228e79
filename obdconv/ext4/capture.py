"""Capture of every block libext2fs writes, through its stock `test_io_manager` callbacks.

Pitfalls handled (libext2fs-notes §2): callbacks report (block, count) in the channel's *current*
block size, which starts at 1024 and changes via set_blksize; count < 0 means -count bytes; the
primary superblock goes through write_byte (offset, length). Contents must be read after
ext2fs_close2 (the callback fires when the write enters unix_io's cache).

The callbacks are process-global variables of libext2fs, so only one capture can be active per
process at a time: `WriteCapture` holds a module lock while installed.

With the C fast path built (fast.py), the callbacks are C functions that append block numbers to
a C array (a Python callback per block write cost ~1 µs, ~4 per file); `blocks` is filled from it
on exit. Same blocks either way.
"""

from __future__ import annotations

import threading
from ctypes import c_void_p, cast

from obdconv.errors import ObdconvError
from obdconv.ext4 import fast
from obdconv.ext4 import libext2fs as L

BLOCK_SIZE = 4096
_lock = threading.Lock()


class WriteCapture:
    """Collects the 4 KiB block numbers touched by writes while installed (a context manager)."""

    def __init__(self) -> None:
        self.blocks: set[int] = set()
        self._blksize = 1024
        blocks = self.blocks

        def on_write(block: int, count: int, err: int) -> None:
            if err:
                return
            nbytes = -count if count < 0 else count * self._blksize
            start = block * self._blksize
            first = start // BLOCK_SIZE
            last = (start + nbytes - 1) // BLOCK_SIZE
            if first == last:
                blocks.add(first)
            else:
                blocks.update(range(first, last + 1))

        def on_write_byte(offset: int, count: int, err: int) -> None:
            if err or count <= 0:
                return
            blocks.update(range(offset // BLOCK_SIZE, (offset + count - 1) // BLOCK_SIZE + 1))

        def on_set_blksize(blksize: int, err: int) -> None:
            if not err:
                self._blksize = blksize

        # Keep the CFUNCTYPE objects referenced for as long as C may call them.
        self._callbacks = (
            ("test_io_cb_write_blk64", L.WriteBlk64Callback(on_write)),
            ("test_io_cb_write_blk", L.WriteBlkCallback(on_write)),
            ("test_io_cb_write_byte", L.WriteBlkCallback(on_write_byte)),
            ("test_io_cb_set_blksize", L.SetBlksizeCallback(on_set_blksize)),
        )

    def __enter__(self) -> WriteCapture:
        _lock.acquire()
        self._fast = fast.FAST
        if self._fast is not None:
            self._fast.lib.obd_capture_start()
            return self
        try:
            c_void_p.in_dll(L.lib, "test_io_backing_manager").value = L.manager("unix_io_manager")
            for name, cb in self._callbacks:
                c_void_p.in_dll(L.lib, name).value = cast(cb, c_void_p).value
        except BaseException:
            _lock.release()
            raise
        return self

    @property
    def resumable(self) -> bool:
        """Whether a later capture can record the writes of a channel opened in this one."""
        return self._fast is not None

    def channel_opened_before(self, block_size: int) -> None:
        """The writes go through a channel opened before this capture began (C path only: the
        ctypes callbacks are copied into a channel when it opens, so they must be installed
        first), whose block size is now `block_size`, not a new channel's 1 KiB."""
        if self._fast is None:
            raise ObdconvError("ext4 write capture: the ctypes path captures only channels opened inside it")
        self._fast.lib.obd_capture_set_blksize(block_size)

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if self._fast is not None:
                self._fast.lib.obd_capture_stop()
                if exc_type is None:  # a failed apply's blocks are never read; its error is what counts
                    self._take_fast()
                return
            for name, _ in self._callbacks:
                c_void_p.in_dll(L.lib, name).value = None
        finally:
            _lock.release()

    def _take_fast(self) -> None:
        ffi, lib = self._fast.ffi, self._fast.lib  # type: ignore[union-attr]
        out = ffi.new("uint64_t **")
        n = lib.obd_capture_take(out)
        if n < 0:
            raise ObdconvError("ext4 write capture: out of memory")
        # Nothing recorded (a layer that changes nothing): the C buffer may never have been
        # allocated in this process, and cffi refuses to unpack a NULL pointer even for 0 items.
        if n:
            self.blocks.update(ffi.unpack(out[0], n))
