"""Directory state kept in Python: a name index per directory and O(1) appends of new entries.

Why not plain `ext2fs_link`/`ext2fs_lookup`: in libext2fs 1.47.0 both scan the whole (linear)
directory on every call, so filling one directory with n entries costs O(n^2) block reads (100k
entries: ~30M block reads). Instead:
- `names(dir)` reads a directory once (ext2fs_dir_iterate2) into a dict and keeps it current as we
  add and remove entries (only this engine writes the image);
- `add()` appends into the directory's last block (we remember the block and the offset of its
  last entry), and when it is full calls `ext2fs_expand_dir` (which adds an empty block) once.
  Space freed by earlier unlinks in other blocks is not reused; the directory stays valid.
- Directories with the htree index flag (e.g. from reference-converted parents) go through
  `ext2fs_link`, which maintains the index.
The state stays valid across layers; `clear()` after the image is replaced under us.

With the C fast path (fast.py) `add()` runs `obd_dir_add` in _fastapply_impl.c (the same calls as
`_find_tail`/`_append` below, in C) and a directory's tail is a C `struct obd_dir_tail`; the C
`obd_create_file` appends through the same tail.
"""

from __future__ import annotations

import ctypes
import struct

from obdconv.ext4 import fast
from obdconv.ext4 import libext2fs as L

BLOCK_SIZE = 4096
_DIRENT = struct.Struct("<IHBB")  # inode, rec_len, name_len, file_type
_RECORD = struct.Struct("<IBB")  # obd_iterate_dir's records: inode, file type, name length
_CSUM_TAIL_TYPE = 0xDE  # EXT2_DIR_NAME_LEN_CSUM >> 8: the fake entry holding a dir block's checksum


def dirent_size(name_len: int) -> int:
    return (8 + name_len + 3) & ~3


class DirIndex:
    """Names of directories, by directory inode, and where each one's next entry goes."""

    def __init__(self) -> None:
        self.fs = 0  # the open ext2_filsys handle; set by the builder for each pass
        self._names: dict[int, dict[bytes, tuple[int, int]]] = {}
        self.loaded_names = self._names  # read-only view for hot loops: names() of loaded dirs
        # dir -> (pblk of its last block, offset of that block's last entry, the block's bytes).
        # Keeping the bytes saves a read per append: only we change that block until the tail is
        # dropped (unlink) or replaced (expand_dir).
        self._tail: dict[int, tuple[int, int, bytearray]] = {}
        self.fast = fast.FAST
        # C path: dir -> its `struct obd_dir_tail` (valid = 0 until found), and one result struct.
        self.fast_tails: dict[int, object] = {}
        self.fast_result = self.fast.ffi.new("struct obd_result *") if self.fast else None
        self._buf = ctypes.create_string_buffer(BLOCK_SIZE)
        self._inode = L.Ext2InodeLarge()
        self._pblk = L.blk64_t()

    def clear(self) -> None:
        self._names.clear()
        self._tail.clear()
        self.fast_tails.clear()

    def names(self, dir_ino: int) -> dict[bytes, tuple[int, int]]:
        """name -> (inode, file type) of a directory (loaded once, then kept current)."""
        names = self._names.get(dir_ino)
        if names is None:
            entries = self._fast_iterate(dir_ino) if self.fast is not None else L.iterate_dir(self.fs, dir_ino)
            names = {name: (ino, ftype) for name, ino, ftype in entries}
            self._names[dir_ino] = names
        return names

    def _fast_iterate(self, dir_ino: int) -> list[tuple[bytes, int, int]]:
        """`L.iterate_dir` in C (obd_iterate_dir: the same ext2fs_dir_iterate2 call, no Python callback)."""
        ffi, lib = self.fast.ffi, self.fast.lib  # type: ignore[union-attr]
        out, size = ffi.new("const unsigned char **"), ffi.new("size_t *")
        rc = lib.obd_iterate_dir(self.fs, dir_ino, out, size)
        L.check(rc, "ext2fs_dir_iterate2", f"inode {dir_ino}")
        raw = ffi.buffer(out[0], size[0])[:]
        entries = []
        pos, end = 0, len(raw)
        while pos < end:  # records: u32 inode, u8 file type, u8 name length, name
            ino, ftype, name_len = _RECORD.unpack_from(raw, pos)
            pos += _RECORD.size
            entries.append((raw[pos:pos + name_len], ino, ftype))
            pos += name_len
        return entries

    def made_empty(self, dir_ino: int) -> None:
        """A directory we just made (only "." and ".."): no need to read it back."""
        self._names[dir_ino] = {}

    def forget(self, dir_ino: int) -> None:
        """The directory was deleted."""
        self._names.pop(dir_ino, None)
        self._tail.pop(dir_ino, None)
        self.fast_tails.pop(dir_ino, None)

    def remove(self, dir_ino: int, name: bytes, ino: int) -> None:
        L.check(L.lib.ext2fs_unlink(self.fs, dir_ino, name, ino, 0), "ext2fs_unlink", name.decode(errors="replace"))
        self.names(dir_ino).pop(name, None)
        # unlink may have merged the last entry into its predecessor: find the tail again next time.
        self._tail.pop(dir_ino, None)
        self.fast_tails.pop(dir_ino, None)

    def fast_tail(self, dir_ino: int) -> object:
        """The C tail struct of a directory (C path only)."""
        tail = self.fast_tails.get(dir_ino)
        if tail is None:
            tail = self.fast_tails[dir_ino] = self.fast.ffi.new("struct obd_dir_tail *")  # type: ignore[union-attr]
        return tail

    def add(self, dir_ino: int, name: bytes, ino: int, ftype: int) -> None:
        names = self.names(dir_ino)
        if self.fast is not None:
            res = self.fast_result
            rc = self.fast.lib.obd_dir_add(self.fs, dir_ino, name, len(name), ino, ftype, self.fast_tail(dir_ino), res)
            if rc == self.fast.lib.OBD_NEED_LINK:
                self.link_with_libext2fs(dir_ino, name, ino, ftype)
            elif rc:
                raise L.Ext2fsError(self.fast.ffi.string(res.call).decode(), rc, name.decode(errors="replace"))
            names[name] = (ino, ftype)
            return
        tail = self._tail.get(dir_ino)
        if tail is None:
            tail = self._find_tail(dir_ino)
        if tail is None:  # indexed or inline directory: let libext2fs maintain its structure
            self.link_with_libext2fs(dir_ino, name, ino, ftype)
        elif not self._append(dir_ino, tail, name, ino, ftype):
            L.check(L.lib.ext2fs_expand_dir(self.fs, dir_ino), "ext2fs_expand_dir", name.decode(errors="replace"))
            tail = self._find_tail(dir_ino)
            if tail is None or not self._append(dir_ino, tail, name, ino, ftype):
                raise L.Ext2fsError("directory append", L.EXT2_ET_DIR_NO_SPACE, name.decode(errors="replace"))
        names[name] = (ino, ftype)

    def link_with_libext2fs(self, dir_ino: int, name: bytes, ino: int, ftype: int) -> None:
        """ext2fs_link (for directories we cannot append to: indexed, inline, checksum tail)."""
        rc = L.lib.ext2fs_link(self.fs, dir_ino, name, ino, ftype)
        if rc == L.EXT2_ET_DIR_NO_SPACE:
            L.check(L.lib.ext2fs_expand_dir(self.fs, dir_ino), "ext2fs_expand_dir")
            rc = L.lib.ext2fs_link(self.fs, dir_ino, name, ino, ftype)
        L.check(rc, "ext2fs_link", name.decode(errors="replace"))

    def _find_tail(self, dir_ino: int) -> tuple[int, int, bytearray] | None:
        inode = self._inode
        L.check(L.lib.ext2fs_read_inode_full(self.fs, dir_ino, ctypes.byref(inode), L.EXT2_INODE_SIZE),
                "ext2fs_read_inode_full", f"directory inode {dir_ino}")
        if inode.i_flags & (L.EXT2_INDEX_FL | L.EXT4_INLINE_DATA_FL):
            return None
        size = inode.i_size | (inode.i_size_high << 32)
        if size < BLOCK_SIZE:
            return None
        lblk = size // BLOCK_SIZE - 1
        L.check(L.lib.ext2fs_bmap2(self.fs, dir_ino, ctypes.byref(inode), None, 0, lblk, None,
                                   ctypes.byref(self._pblk)), "ext2fs_bmap2", f"directory inode {dir_ino}")
        pblk = self._pblk.value
        if not pblk:
            return None
        L.check(L.lib.ext2fs_read_dir_block4(self.fs, pblk, self._buf, 0, dir_ino), "ext2fs_read_dir_block4")
        off = 0
        while True:
            _, rec_len, _, _ = _DIRENT.unpack_from(self._buf, off)
            if rec_len < 8 or off + rec_len > BLOCK_SIZE:
                return None  # unexpected layout: fall back to ext2fs_link
            if off + rec_len == BLOCK_SIZE:
                break
            off += rec_len
        last_ino, rec_len, name_len, file_type = _DIRENT.unpack_from(self._buf, off)
        if not last_ino and off and (rec_len, name_len, file_type) == (12, 0, _CSUM_TAIL_TYPE):
            return None  # a metadata_csum parent's checksum tail: let ext2fs_link maintain it
        tail = (pblk, off, bytearray(self._buf.raw))
        self._tail[dir_ino] = tail
        return tail

    def _append(self, dir_ino: int, tail: tuple[int, int, bytearray], name: bytes, ino: int, ftype: int) -> bool:
        """Put the entry into the last block if it fits; False if the block is full."""
        pblk, off, block = tail
        last_ino, rec_len, last_name_len, last_type = _DIRENT.unpack_from(block, off)
        used = dirent_size(last_name_len) if last_ino else 0
        need = dirent_size(len(name))
        if rec_len - used < need:
            return False
        if used:
            _DIRENT.pack_into(block, off, last_ino, used, last_name_len, last_type)
            new_off = off + used
        else:
            new_off = off
        _DIRENT.pack_into(block, new_off, ino, rec_len - used, len(name), ftype)
        block[new_off + 8:new_off + need] = name.ljust(need - 8, b"\0")
        view = (ctypes.c_char * BLOCK_SIZE).from_buffer(block)  # no copy: libext2fs reads our bytes
        L.check(L.lib.ext2fs_write_dir_block4(self.fs, pblk, view, 0, dir_ino), "ext2fs_write_dir_block4")
        self._tail[dir_ino] = (pblk, new_off, block)
        return True
