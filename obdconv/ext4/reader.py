"""`tree_from_ext4`: read an ext4 image's tree in userspace through libext2fs (no mount, no root).

Used by `obdconv verify` and by tests. Reads every file's content through the libext2fs file API
(so uninitialised extents read as zeros, like the kernel), xattrs in the Linux format (POSIX ACLs
converted back from ext4's on-disk form by libext2fs), and both symlink kinds.
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
from pathlib import Path

from obdconv.ext4 import fields
from obdconv.ext4 import libext2fs as L
from obdconv.tree import Tree, TreeEntry

_KIND = {
    L.LINUX_S_IFREG: "file", L.LINUX_S_IFDIR: "dir", L.LINUX_S_IFLNK: "symlink",
    L.LINUX_S_IFCHR: "char", L.LINUX_S_IFBLK: "block", L.LINUX_S_IFIFO: "fifo", L.LINUX_S_IFSOCK: "socket",
}
_EA_MAGIC = 0xEA020000
_CHUNK = 1 << 20
_ACL_ENTRY = struct.Struct("<HHI")
_ACL_TAGS_WITHOUT_ID = (0x01, 0x04, 0x10, 0x20)  # USER_OBJ, GROUP_OBJ, MASK, OTHER
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def tree_from_ext4(image_path: Path | str, *, skip_lost_found: bool = True) -> Tree:
    """The tree of the filesystem in a raw image (paths relative, no leading "/").

    Like `obdconv.oci.tree.tree_from_directory`: no entry for the root, root-level `lost+found`
    skipped unless `skip_lost_found` is False, `link_group` = smallest path sharing the inode (own
    path for directories). Iterative: any depth.
    """
    fs = L.open_fs(str(image_path), rw=False)
    try:
        return _Walker(fs, skip_lost_found).walk()
    finally:
        L.check(L.lib.ext2fs_close2(fs, 0), "ext2fs_close2")


class _Walker:
    def __init__(self, fs: int, skip_lost_found: bool) -> None:
        self.fs = fs
        self.skip_lost_found = skip_lost_found
        self.inode = L.Ext2InodeLarge()
        self.buf = ctypes.create_string_buffer(_CHUNK)
        self.got = ctypes.c_uint()
        self.seen: dict[int, TreeEntry] = {}  # inode -> first entry (hard links share content)
        self.paths: dict[int, list[str]] = {}

    def walk(self) -> Tree:
        tree: Tree = {}
        stack: list[tuple[int, str]] = [(L.EXT2_ROOT_INO, "")]
        while stack:
            dir_ino, dir_path = stack.pop()
            for name, ino, _ftype in L.iterate_dir(self.fs, dir_ino):
                if self.skip_lost_found and not dir_path and name == b"lost+found":
                    continue  # mkfs's, not the image's (as tree_from_directory skips it)
                path = dir_path + name.decode("utf-8", "surrogateescape")
                entry = self.entry(path, ino)
                if entry.kind == "socket":
                    continue  # not representable in a layer (tree_from_directory skips them too)
                tree[path] = entry
                if entry.kind == "dir":
                    entry.link_group = path
                    stack.append((ino, path + "/"))
                else:
                    self.paths.setdefault(ino, []).append(path)
        for paths in self.paths.values():
            group = min(paths)
            for p in paths:
                tree[p].link_group = group
        return tree

    def entry(self, path: str, ino: int) -> TreeEntry:
        first = self.seen.get(ino)
        if first is not None:
            return TreeEntry(path, first.kind, first.mode, first.uid, first.gid, first.size, first.sha256,
                             first.link_target, first.rdev, first.mtime_ns, first.nlink, "", dict(first.xattrs))
        inode = self.inode
        L.check(L.lib.ext2fs_read_inode_full(self.fs, ino, ctypes.byref(inode), L.EXT2_INODE_SIZE),
                "ext2fs_read_inode_full", path)
        fmt = inode.i_mode & L.LINUX_S_IFMT
        kind = _KIND.get(fmt, f"unknown-{fmt:o}")
        uid, gid = fields.owner_of(inode)
        e = TreeEntry(path, kind, inode.i_mode & 0o7777, uid, gid, mtime_ns=fields.mtime_ns_of(inode),
                      nlink=inode.i_links_count)
        size = fields.size_of(inode)
        has_xattrs = self.has_xattrs(inode)
        if kind == "file":
            e.size = size
            e.sha256 = self.content_sha256(ino, path)
        elif kind == "symlink":
            e.size = size
            if L.lib.ext2fs_is_fast_symlink(ctypes.byref(inode)):
                target = ctypes.string_at(ctypes.addressof(inode) + L.Ext2InodeLarge.i_block.offset, size)
            else:
                target = self.content(ino, path)
            e.link_target = target.decode("utf-8", "surrogateescape")
        elif kind in ("char", "block"):
            e.rdev = fields.rdev_of(inode)
        if has_xattrs:
            e.xattrs = self.xattrs(ino, path)
        self.seen[ino] = e
        return e

    def has_xattrs(self, inode: L.Ext2InodeLarge) -> bool:
        if inode.i_file_acl or inode.l_i_file_acl_high:
            return True
        off = L.EXT2_GOOD_OLD_INODE_SIZE + inode.i_extra_isize
        if off + 4 > L.EXT2_INODE_SIZE:
            return False
        return ctypes.c_uint32.from_address(ctypes.addressof(inode) + off).value == _EA_MAGIC

    def open_file(self, ino: int, path: str) -> int:
        f = L.P()
        L.check(L.lib.ext2fs_file_open2(self.fs, ino, None, 0, ctypes.byref(f)), "ext2fs_file_open2", path)
        return f.value or 0

    def content_sha256(self, ino: int, path: str) -> str:
        h = hashlib.sha256()
        f = self.open_file(ino, path)
        try:
            view = memoryview(self.buf)
            while True:
                L.check(L.lib.ext2fs_file_read(f, self.buf, _CHUNK, ctypes.byref(self.got)), "ext2fs_file_read", path)
                n = self.got.value
                if not n:
                    break
                h.update(view[:n])
        finally:
            L.lib.ext2fs_file_close(f)
        return h.hexdigest()

    def content(self, ino: int, path: str) -> bytes:
        parts: list[bytes] = []
        f = self.open_file(ino, path)
        try:
            while True:
                L.check(L.lib.ext2fs_file_read(f, self.buf, _CHUNK, ctypes.byref(self.got)), "ext2fs_file_read", path)
                if not self.got.value:
                    break
                parts.append(self.buf.raw[: self.got.value])
        finally:
            L.lib.ext2fs_file_close(f)
        return b"".join(parts)

    def xattrs(self, ino: int, path: str) -> dict[str, bytes]:
        out: dict[str, bytes] = {}

        def on_attr(name: int, value: int, length: int, _data: int) -> int:
            key = ctypes.string_at(name).decode("utf-8", "surrogateescape")
            out[key] = ctypes.string_at(value, length) if length else b""
            return 0

        h = L.P()
        cb = L.XattrIterateFunc(on_attr)
        L.check(L.lib.ext2fs_xattrs_open(self.fs, ino, ctypes.byref(h)), "ext2fs_xattrs_open", path)
        try:
            L.check(L.lib.ext2fs_xattrs_read(h), "ext2fs_xattrs_read", path)
            L.check(L.lib.ext2fs_xattrs_iterate(h, cb, None), "ext2fs_xattrs_iterate", path)
            # iterate hands out stored values; ext2fs_xattr_get converts POSIX ACLs from ext4's
            # on-disk form back to the Linux xattr form (what getxattr returns on a mount).
            for key in [k for k in out if k.startswith("system.posix_acl_")]:
                value = ctypes.c_void_p()
                length = ctypes.c_size_t()
                L.check(L.lib.ext2fs_xattr_get(h, key.encode(), ctypes.byref(value), ctypes.byref(length)),
                        "ext2fs_xattr_get", f"{path}: {key}")
                try:
                    out[key] = _kernel_acl_form(ctypes.string_at(value.value, length.value) if length.value else b"")
                finally:
                    L.libc.free(value)
        finally:
            L.lib.ext2fs_xattrs_close(ctypes.byref(h))
        return dict(sorted(out.items()))


def _kernel_acl_form(value: bytes) -> bytes:
    """libext2fs converts ACL entries without a qualifier with id 0; the kernel reports
    ACL_UNDEFINED_ID (0xffffffff) for them. Rewrite to the kernel's form so trees compare."""
    if len(value) < 4 or (len(value) - 4) % _ACL_ENTRY.size:
        return value
    out = bytearray(value)
    for off in range(4, len(value), _ACL_ENTRY.size):
        tag, perm, _ = _ACL_ENTRY.unpack_from(value, off)
        if tag in _ACL_TAGS_WITHOUT_ID:
            _ACL_ENTRY.pack_into(out, off, tag, perm, _ACL_UNDEFINED_ID)
    return bytes(out)
