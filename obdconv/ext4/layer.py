"""`LayerApply`: one layer's entry list applied to an open filesystem with libext2fs.

Tar semantics as in /work/shared/spec/overlaybd-format.md §4 (see `Ext4Builder` for the pass
around it): missing parents 0755 0:0 time 0; whiteouts and opaque markers; replacement of
files by directories and back; directory merges; hard links (this layer or lower); fast and slow
symlinks; devices; xattrs; owners, modes and times; regular files' blocks allocated, not written.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from functools import partial
from operator import attrgetter, itemgetter
from types import ModuleType

from obdconv.entries import EntryType, LayerEntry
from obdconv.errors import BadInputError, ObdconvError, UnsafePathError
from obdconv.ext4 import fields
from obdconv.ext4 import libext2fs as L
from obdconv.ext4.dirs import DirIndex
from obdconv.ext4.mkfs import FAKE_TIME
from obdconv.ext4.segment import BLOCK_SIZE, Extent
from obdconv.ext4.validate import encode_name, entry_label
from obdconv.faithful import LOST_FOUND, xattr_dropped_by

ROOT = L.EXT2_ROOT_INO
NO_GOAL = (1 << 64) - 1  # ~0ULL: let libext2fs pick the goal (ext2fs_find_inode_goal)
EXT4_LINK_MAX = 65000  # the kernel's limit on i_links_count

_FTYPE = {
    EntryType.FILE: L.EXT2_FT_REG_FILE, EntryType.DIR: L.EXT2_FT_DIR, EntryType.SYMLINK: L.EXT2_FT_SYMLINK,
    EntryType.CHAR: L.EXT2_FT_CHRDEV, EntryType.BLOCK: L.EXT2_FT_BLKDEV, EntryType.FIFO: L.EXT2_FT_FIFO,
}
_IFMT = {
    EntryType.FILE: L.LINUX_S_IFREG, EntryType.DIR: L.LINUX_S_IFDIR, EntryType.SYMLINK: L.LINUX_S_IFLNK,
    EntryType.CHAR: L.LINUX_S_IFCHR, EntryType.BLOCK: L.LINUX_S_IFBLK, EntryType.FIFO: L.LINUX_S_IFIFO,
}

# A new regular file's inode, bytes 0..0xA0 of struct ext2_inode_large (padding after it is zero):
# mode, uid, size, atime, ctime, mtime, [dtime 0], gid, links, [blocks 0], flags, [version 0],
# i_block[0] (extent magic | entries 0), i_block[1] (max 4 | depth 0), [i_block[2..14], generation,
# file_acl 0], size_high, [faddr, blocks_hi, file_acl_high 0], uid_high, gid_high, [checksum_lo,
# reserved 0], extra_isize, [checksum_hi 0], ctime_extra, mtime_extra, atime_extra, crtime,
# crtime_extra, [version_hi, projid 0].
_NEW_FILE_INODE = struct.Struct("<HHIIII4xHH4xI4xII52x8xI8xHH4xH2xIIIII8x")
assert _NEW_FILE_INODE.size == 0xA0
_INODE_TAIL_ZEROS = bytes(L.EXT2_INODE_SIZE - 0xA0)
_I_BLOCK = L.Ext2InodeLarge.i_block.offset
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1  # mtime_ns the C fast path takes (int64_t)
_TYPE_OF = attrgetter("type")


class LayerApply:
    """Applies one entry list to an open filesystem (one instance per layer)."""

    def __init__(self, fs: int, dirs: DirIndex, entries: Sequence[LayerEntry], *,
                 track_touched: bool | None = None) -> None:
        self.fs = fs
        self.dirs = dirs
        self.entries = entries
        self.live_files: dict[int, int] = {}  # inode -> index of the FILE entry that created it
        self.known_extents: dict[int, list[Extent]] = {}  # inode -> extents read at creation
        self.dir_entries: dict[int, int] = {}  # inode -> index of the last DIR entry for it
        self.dir_cache: dict[str, int] = {"": ROOT}  # directory path -> inode, within this layer
        self.touched: set[str] = set()  # paths of entries applied in this layer
        self.touched_parents: set[str] = set()  # their ancestor directories
        # Only opaque markers need to know what this layer touched; skip the bookkeeping otherwise.
        # (`in` over the mapped types runs in C, identity first: no Python-level loop per entry.)
        # A layer applied in parts (see Ext4Builder.begin_layer) cannot know yet: it tracks.
        self.track_touched = EntryType.OPAQUE in map(_TYPE_OF, entries) if track_touched is None else track_touched
        self.inode_buf = bytearray(L.EXT2_INODE_SIZE)  # one inode buffer, shared by all helpers
        self.inode = L.Ext2InodeLarge.from_buffer(self.inode_buf)
        self.inode_ref = ctypes.byref(self.inode)
        self.ino = L.ext2_ino_t()
        self.where = ""

    # --- driver ---
    def apply_range(self, start: int, end: int) -> None:
        """Apply entries [start, end) (`entries` may grow between calls: a layer applied in parts)."""
        # A new pass, or a part after others (perhaps another builder's) ran in between: the C
        # allocation hint starts over (it only saves scanning; the allocations are the same).
        self.blocks_freed()
        if self.dirs.fast is not None:
            self.run_fast(start, end)
        else:
            for i in range(start, end):
                self.apply_one(i, self.entries[i])

    def finish(self) -> None:
        """After the last entry: each directory made or changed in this layer gets its entry's times
        (set after all its children were added)."""
        self.where = "directory times"
        fastmod = self.dirs.fast
        for ino, i in self.dir_entries.items():  # after all children were added
            mtime_ns = self.entries[i].mtime_ns
            if fastmod is not None and _I64_MIN <= mtime_ns <= _I64_MAX:
                self.fast_check(fastmod.lib.obd_set_times(self.fs, ino, mtime_ns, self.dirs.fast_result))
                continue
            inode = self.read_inode(ino)
            fields.set_times(inode, self.entries[i].mtime_ns)
            self.write_inode(ino, inode)

    def apply_one(self, i: int, e: LayerEntry) -> None:
        self.where = entry_label(i, e.path)
        try:
            self.apply_entry(i, e)
        except L.Ext2fsError as exc:
            raise BadInputError(f"{self.where}: {exc}") from exc

    def run_fast(self, start: int, end: int) -> None:
        """`run` with the C fast path: a new regular file without xattrs in a directory already
        resolved in this layer (nearly every entry) is created by one C call (`obd_create_file`:
        the calls of `create_file` + `DirIndex.add`, same order); everything else goes through
        `apply_one`. Kept flat on purpose: this loop runs once per entry."""
        fastmod = self.dirs.fast
        assert fastmod is not None
        create = fastmod.lib.obd_create_file
        res = self.dirs.fast_result
        res_ext = res.ext
        file_type = EntryType.FILE
        ft_reg = L.EXT2_FT_REG_FILE
        unpack = fastmod.ffi.unpack
        make_extent = partial(tuple.__new__, Extent)  # Extent._make without its Python frame per extent
        fs = self.fs
        dirs = self.dirs
        names_of = dirs.names
        loaded_names = dirs.loaded_names
        tails = dirs.fast_tails
        dir_cache = self.dir_cache
        live_files = self.live_files
        known_extents = self.known_extents
        track_touched = self.track_touched
        # Files come grouped by directory (tar order): the last directory's inode, names and C
        # tail are kept for the next file. Only `apply_one` (removals, new directories) can change
        # what those lookups give, so it clears them.
        last_dir: str | None = None
        parent = 0
        names: dict[bytes, tuple[int, int]] = {}
        tail: object = None
        for i in range(start, end):
            e = self.entries[i]
            if e.type is file_type and not e.xattrs and _I64_MIN <= e.mtime_ns <= _I64_MAX:
                path = e.path
                slash = path.rfind("/")
                dir_path = path[:slash] if slash >= 0 else ""
                if dir_path != last_dir:
                    found = dir_cache.get(dir_path)
                    if found is not None:
                        parent = found
                        names = loaded_names.get(parent) or names_of(parent)
                        tail = tails.get(parent) or dirs.fast_tail(parent)
                        last_dir = dir_path
                if dir_path == last_dir:
                    name = path[slash + 1:].encode("utf-8", "surrogateescape")
                    if name not in names:
                        if track_touched:
                            self.mark_touched(path)
                        ino = create(fs, parent, e.mode, e.uid, e.gid, e.size, e.mtime_ns, name, len(name), tail, res)
                        if not ino:
                            ino = self.fast_failed(i, e, parent, name)
                        names[name] = (ino, ft_reg)
                        n = res.nextents
                        if n == 1:
                            known_extents[ino] = [make_extent(unpack(res_ext, 3))]
                        elif n >= 0:
                            flat = unpack(res_ext, 3 * n)
                            known_extents[ino] = [make_extent(flat[k:k + 3]) for k in range(0, 3 * n, 3)]
                        live_files[ino] = i
                        continue
            last_dir = None
            self.apply_one(i, e)

    def fast_failed(self, i: int, e: LayerEntry, parent: int, name: bytes) -> int:
        """obd_create_file did not finish: link with ext2fs_link (no appendable tail) and return
        the new inode, or raise."""
        self.where = entry_label(i, e.path)
        fastmod = self.dirs.fast
        assert fastmod is not None
        res = self.dirs.fast_result
        try:
            if res.rc != fastmod.lib.OBD_NEED_LINK:
                raise L.Ext2fsError(fastmod.ffi.string(res.call).decode(), res.rc)
            self.dirs.link_with_libext2fs(parent, name, res.ino, L.EXT2_FT_REG_FILE)
        except L.Ext2fsError as exc:
            raise BadInputError(f"{self.where}: {exc}") from exc
        return res.ino

    def file_extents(self) -> list[tuple[int, list[Extent]]]:
        out = []
        for ino, index in sorted(self.live_files.items(), key=itemgetter(1)):
            extents = self.known_extents.get(ino)
            out.append((index, extents if extents is not None else self.extents_of(ino)))
        return out

    def apply_entry(self, i: int, e: LayerEntry) -> None:
        if e.path == ".":  # the root directory: its metadata, or its lower content hidden
            if e.type is EntryType.OPAQUE:
                self.opaque(ROOT, "")
            else:
                self.set_metadata(ROOT, e, replace_xattrs=False)
                self.dir_entries[ROOT] = i
            return
        comps = e.path.split("/")
        name = encode_name(comps[-1])
        if e.type is EntryType.OPAQUE:
            d = self.resolve_dir(comps, create=True)
            self.touched_parents.add(e.path)
            self.opaque(d, e.path)
            return
        parent = self.resolve_dir(comps[:-1], create=True)
        existing = self.dirs.names(parent).get(name)
        if e.type is EntryType.WHITEOUT:
            if existing:
                self.remove(parent, name, *existing)
            return
        self.mark_touched(e.path)
        if e.type is EntryType.DIR:
            if existing and existing[1] == L.EXT2_FT_DIR:
                ino = existing[0]
                # Merge: the new metadata applies; xattrs are set one by one (lower ones not named
                # again stay), as the reference untar's lsetxattr calls do.
                self.set_metadata(ino, e, replace_xattrs=False)
            else:
                if existing:
                    self.remove(parent, name, *existing)
                ino = self.mkdir(parent, name, e.mode, e.uid, e.gid, e.mtime_ns)
                self.set_xattrs(ino, e, replace=False)
            self.dir_cache[e.path] = ino
            self.dir_entries[ino] = i
            return
        if e.type is EntryType.HARDLINK:
            self.hardlink(parent, name, existing, e)
            return
        if existing:
            self.remove(parent, name, *existing)
        if e.type is EntryType.FILE:
            ino = self.create_file(parent, name, e)
            self.live_files[ino] = i
        elif e.type is EntryType.SYMLINK:
            self.create_symlink(parent, name, e)
        elif e.type in (EntryType.CHAR, EntryType.BLOCK, EntryType.FIFO):
            self.create_special(parent, name, e)
        else:  # pragma: no cover - validate_entries rejects other types
            raise UnsafePathError(f"{self.where}: unsupported entry type {e.type}")

    def mark_touched(self, path: str) -> None:
        if not self.track_touched:
            return
        self.touched.add(path)
        while "/" in path:
            path = path.rsplit("/", 1)[0]
            if path in self.touched_parents:
                break
            self.touched_parents.add(path)

    # --- lookups ---
    def resolve_dir(self, comps: list[str], *, create: bool) -> int:
        """Inode of the directory at `comps` (creating missing ones 0755 0:0 time 0 if `create`).

        A miss walks down from the root by name, one lookup of a short name per component: looking
        up every prefix path would hash d prefixes of up to d components, O(d^2) for a deep tree.
        """
        path = "/".join(comps)
        ino = self.dir_cache.get(path)
        if ino is not None:
            return ino
        ino = ROOT
        for depth, comp in enumerate(comps):
            hit = self.dirs.names(ino).get(encode_name(comp))
            if hit is None:
                if not create:
                    raise BadInputError(f"{self.where}: {'/'.join(comps[: depth + 1])!r} does not exist")
                ino = self.mkdir(ino, encode_name(comp), 0o755, 0, 0, 0)
                self.mark_touched("/".join(comps[: depth + 1]))
            elif hit[1] == L.EXT2_FT_SYMLINK:
                raise UnsafePathError(f"{self.where}: parent {'/'.join(comps[: depth + 1])!r} is a symlink; "
                                      "not following it")
            elif hit[1] != L.EXT2_FT_DIR:
                raise BadInputError(f"{self.where}: parent {'/'.join(comps[: depth + 1])!r} is not a directory")
            else:
                ino = hit[0]
        self.dir_cache[path] = ino
        return ino

    # --- inode helpers ---
    def read_inode(self, ino: int) -> L.Ext2InodeLarge:
        inode = self.inode
        L.check(L.lib.ext2fs_read_inode_full(self.fs, ino, ctypes.byref(inode), L.EXT2_INODE_SIZE),
                "ext2fs_read_inode_full", self.where)
        return inode

    def write_inode(self, ino: int, inode: L.Ext2InodeLarge) -> None:
        L.check(L.lib.ext2fs_write_inode_full(self.fs, ino, ctypes.byref(inode), L.EXT2_INODE_SIZE),
                "ext2fs_write_inode_full", self.where)

    def new_inode(self, parent: int, mode: int) -> int:
        L.check(L.lib.ext2fs_new_inode(self.fs, parent, mode, None, ctypes.byref(self.ino)),
                "ext2fs_new_inode", self.where)
        return self.ino.value

    def fresh_inode(self, mode: int, e: LayerEntry) -> L.Ext2InodeLarge:
        inode = self.inode
        ctypes.memset(ctypes.addressof(inode), 0, L.EXT2_INODE_SIZE)
        inode.i_mode = mode
        inode.i_links_count = 1
        inode.i_extra_isize = L.EXT2_INODE_EXTRA_ISIZE
        fields.set_owner(inode, e.uid, e.gid)
        fields.set_times(inode, e.mtime_ns)
        return inode

    # --- creators ---
    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int, mtime_ns: int) -> int:
        fastmod = self.dirs.fast
        if fastmod is not None and _I64_MIN <= mtime_ns <= _I64_MAX:
            return self.mkdir_fast(fastmod, parent, name, mode, uid, gid, mtime_ns)
        ino = self.new_inode(parent, L.LINUX_S_IFDIR | 0o755)
        # name=NULL: ext2fs_mkdir builds the inode, its block, "." and "..", bumps the parent's link
        # count and the allocation stats, but does not link it (its lookup+link scan the parent).
        L.check(L.lib.ext2fs_mkdir(self.fs, parent, ino, None), "ext2fs_mkdir", self.where)
        parent_inode = self.read_inode(parent)
        if parent_inode.i_links_count > EXT4_LINK_MAX or parent_inode.i_links_count < 3:
            # ext2fs_mkdir's plain 16-bit increment passed EXT4_LINK_MAX, or turned dir_nlink's 1
            # ("too many subdirectories to count", as the kernel sets it) into 2: keep it at 1.
            # (After a counted mkdir the parent has at least 3: ".", its name, the child's "..".)
            parent_inode.i_links_count = 1
            self.write_inode(parent, parent_inode)
        self.dirs.add(parent, name, ino, L.EXT2_FT_DIR)
        self.dirs.made_empty(ino)
        inode = self.read_inode(ino)
        inode.i_mode = L.LINUX_S_IFDIR | mode
        inode.i_extra_isize = L.EXT2_INODE_EXTRA_ISIZE
        fields.set_owner(inode, uid, gid)
        fields.set_times(inode, mtime_ns)
        self.write_inode(ino, inode)
        return ino

    def mkdir_fast(self, fastmod: ModuleType, parent: int, name: bytes, mode: int, uid: int, gid: int,
                   mtime_ns: int) -> int:
        """`mkdir` in one C call (obd_mkdir: the same libext2fs calls in the same order)."""
        res = self.dirs.fast_result
        names = self.dirs.names(parent)
        rc = fastmod.lib.obd_mkdir(self.fs, parent, name, len(name), mode, uid, gid, mtime_ns,
                                   self.dirs.fast_tail(parent), res)
        ino = res.ino
        if rc == fastmod.lib.OBD_NEED_LINK:  # no appendable tail: ext2fs_link, then the inode's fields
            self.dirs.link_with_libext2fs(parent, name, ino, L.EXT2_FT_DIR)
            rc = fastmod.lib.obd_finish_dir(self.fs, ino, mode, uid, gid, mtime_ns, res)
        self.fast_check(rc)
        names[name] = (ino, L.EXT2_FT_DIR)
        self.dirs.made_empty(ino)
        return ino

    def blocks_freed(self) -> None:
        """Blocks may be freed now: drop the C path's "all in use up to here" allocation hint
        (obd_alloc_hint_reset in _fastapply_impl.c)."""
        if self.dirs.fast is not None:
            self.dirs.fast.lib.obd_alloc_hint_reset()

    def fast_check(self, rc: int) -> None:
        """Raise `Ext2fsError` for a failed C fast-path call (its result names the call)."""
        if rc:
            assert self.dirs.fast is not None
            raise L.Ext2fsError(self.dirs.fast.ffi.string(self.dirs.fast_result.call).decode(), rc, self.where)

    def create_file(self, parent: int, name: bytes, e: LayerEntry) -> int:
        """The hot path (most entries): the inode is packed in one struct call, not field by field."""
        mode = L.LINUX_S_IFREG | e.mode
        fs = self.fs
        ino = self.new_inode(parent, mode)
        L.lib.ext2fs_inode_alloc_stats2(fs, ino, 1, 0)
        t_lo, t_extra = fields.encode_time(e.mtime_ns)
        size = e.size
        # i_size is set before fallocate: blocks past EOF would come out uninitialised.
        # i_block starts as an empty extent tree root: {magic, entries 0, max 4, depth 0}.
        _NEW_FILE_INODE.pack_into(
            self.inode_buf, 0, mode, e.uid & 0xFFFF, size & 0xFFFFFFFF, t_lo, t_lo, t_lo, e.gid & 0xFFFF, 1,
            L.EXT4_EXTENTS_FL, L.EXT3_EXT_MAGIC, 4, size >> 32, e.uid >> 16, e.gid >> 16,
            L.EXT2_INODE_EXTRA_ISIZE, t_extra, t_extra, t_extra, t_lo, t_extra,
        )
        self.inode_buf[_NEW_FILE_INODE.size:] = _INODE_TAIL_ZEROS  # no in-inode xattrs of an earlier inode
        nblocks = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
        if nblocks:
            # fallocate works on our buffer and writes its first 128 bytes; the full write follows.
            rc = L.lib.ext2fs_fallocate(fs, L.EXT2_FALLOCATE_FORCE_INIT, ino, self.inode_ref, NO_GOAL, 0, nblocks)
            L.check(rc, "ext2fs_fallocate", self.where)
        L.check(L.lib.ext2fs_write_inode_full(fs, ino, self.inode_ref, L.EXT2_INODE_SIZE),
                "ext2fs_write_inode_full", self.where)
        extents = _root_extents(self.inode_buf)
        if extents is not None:
            self.known_extents[ino] = extents
        self.dirs.add(parent, name, ino, L.EXT2_FT_REG_FILE)
        if e.xattrs:
            self.set_xattrs(ino, e, replace=False)
        return ino

    def create_symlink(self, parent: int, name: bytes, e: LayerEntry) -> None:
        ino = self.new_inode(parent, L.LINUX_S_IFLNK | 0o777)
        # name=NULL: no lookup/link scan; ext2fs_symlink picks fast (in i_block) or slow (one block).
        L.check(L.lib.ext2fs_symlink(self.fs, parent, ino, None, encode_name(e.link_target)),
                "ext2fs_symlink", self.where)
        self.dirs.add(parent, name, ino, L.EXT2_FT_SYMLINK)
        inode = self.read_inode(ino)
        inode.i_extra_isize = L.EXT2_INODE_EXTRA_ISIZE
        fields.set_owner(inode, e.uid, e.gid)
        fields.set_times(inode, e.mtime_ns)  # the mode of a symlink stays 0777 (Linux ignores it)
        self.write_inode(ino, inode)
        self.set_xattrs(ino, e, replace=False)

    def create_special(self, parent: int, name: bytes, e: LayerEntry) -> None:
        mode = _IFMT[e.type] | e.mode
        ino = self.new_inode(parent, mode)
        L.lib.ext2fs_inode_alloc_stats2(self.fs, ino, 1, 0)
        inode = self.fresh_inode(mode, e)
        if e.type is not EntryType.FIFO:
            fields.set_rdev(inode, e.devmajor, e.devminor)
        self.write_inode(ino, inode)
        self.dirs.add(parent, name, ino, _FTYPE[e.type])
        self.set_xattrs(ino, e, replace=False)

    def hardlink(self, parent: int, name: bytes, existing: tuple[int, int] | None, e: LayerEntry) -> None:
        tcomps = e.link_target.split("/")
        tdir = self.resolve_dir(tcomps[:-1], create=False)
        target = self.dirs.names(tdir).get(encode_name(tcomps[-1]))
        if target is None:
            raise BadInputError(f"{self.where}: hardlink target {e.link_target!r} does not exist")
        tino, tftype = target
        if tftype == L.EXT2_FT_DIR:
            raise BadInputError(f"{self.where}: hardlink target {e.link_target!r} is a directory")
        if existing and existing[0] == tino:
            pass  # already a name of that inode: only the metadata below applies
        else:
            if existing:
                if existing[1] == L.EXT2_FT_DIR and e.link_target.startswith(e.path + "/"):
                    raise BadInputError(f"{self.where}: hardlink target lies inside the directory it replaces")
                self.remove(parent, name, *existing)
            inode = self.read_inode(tino)
            if inode.i_links_count >= EXT4_LINK_MAX:
                raise BadInputError(f"{self.where}: {e.link_target!r} already has {EXT4_LINK_MAX} links (ext4's limit)")
            inode.i_links_count += 1
            self.write_inode(tino, inode)
            self.dirs.add(parent, name, tino, tftype)
        # The link's header metadata applies to the shared inode (as containerd and the reference
        # untar do: lchown, xattrs, utimes, chmod on the new name).
        self.set_metadata(tino, e, replace_xattrs=False, keep_mode=tftype == L.EXT2_FT_SYMLINK)

    def set_metadata(self, ino: int, e: LayerEntry, *, replace_xattrs: bool, keep_mode: bool = False) -> None:
        inode = self.read_inode(ino)
        if not keep_mode:
            inode.i_mode = (inode.i_mode & L.LINUX_S_IFMT) | e.mode
        fields.set_owner(inode, e.uid, e.gid)
        fields.set_times(inode, e.mtime_ns)
        self.write_inode(ino, inode)
        self.set_xattrs(ino, e, replace=replace_xattrs)

    def set_xattrs(self, ino: int, e: LayerEntry, *, replace: bool) -> None:
        """Set the entry's xattrs, those `faithful.xattr_dropped_by` lets through (supported
        namespaces; `user.` only on files and dirs, as the kernel)."""
        if not e.xattrs and not replace:
            return  # nothing to set or remove (every directory made comes here)
        special = e.type not in (EntryType.FILE, EntryType.DIR)
        if e.type is EntryType.HARDLINK:
            special = (self.read_inode(ino).i_mode & L.LINUX_S_IFMT) != L.LINUX_S_IFREG
        wanted = [(k, v) for k, v in e.xattrs if xattr_dropped_by(k, not special) is None]
        if not wanted and not replace:
            return
        self.blocks_freed()  # changing xattrs may free or replace the inode's EA block
        h = L.P()
        L.check(L.lib.ext2fs_xattrs_open(self.fs, ino, ctypes.byref(h)), "ext2fs_xattrs_open", self.where)
        try:
            L.check(L.lib.ext2fs_xattrs_read(h), "ext2fs_xattrs_read", self.where)
            if replace:
                keep = {k for k, _ in wanted}
                for old in _xattr_names(h):
                    if old.decode("utf-8", "surrogateescape") not in keep:
                        L.check(L.lib.ext2fs_xattr_remove(h, old), "ext2fs_xattr_remove", self.where)
            for k, v in wanted:
                L.check(L.lib.ext2fs_xattr_set(h, encode_name(k), v, len(v)), "ext2fs_xattr_set",
                        f"{self.where}: xattr {k!r}")
        finally:
            L.lib.ext2fs_xattrs_close(ctypes.byref(h))

    # --- removal ---
    def remove(self, parent: int, name: bytes, ino: int, ftype: int) -> None:
        """Unlink `name` from `parent`, recursively for directories, freeing unreferenced inodes."""
        self.dirs.remove(parent, name, ino)
        self.drop(ino, ftype)
        if ftype == L.EXT2_FT_DIR:
            inode = self.read_inode(parent)
            if inode.i_links_count > 2:  # 1 = dir_nlink's "uncounted": stays 1
                inode.i_links_count -= 1
            self.write_inode(parent, inode)

    def drop(self, ino: int, ftype: int) -> None:
        """One name of `ino` is gone (already unlinked): free it when it was the last; a directory's
        children are dropped first. Iterative (a tar can nest directories thousands deep), in the
        order a recursive walk would take: children in directory order, then the directory."""
        stack: list[tuple[int, int, bool]] = [(ino, ftype, False)]
        while stack:
            ino, ftype, children_done = stack.pop()
            if ftype == L.EXT2_FT_DIR and not children_done:
                self.blocks_freed()
                # The directory's blocks are freed whole, so its children need no unlinking one by one.
                stack.append((ino, ftype, True))
                stack.extend((child, cftype, False) for child, cftype in reversed(self.dirs.names(ino).values()))
                continue
            if ftype == L.EXT2_FT_DIR:
                self.dirs.forget(ino)
                # Emptied in place, not replaced: run_fast holds this dict in a local (a new dict left
                # it resolving paths under the deleted directory to its freed inode).
                self.dir_cache.clear()
                self.dir_cache[""] = ROOT
                self.dir_entries.pop(ino, None)
            else:
                self.blocks_freed()
            self.free_name(ino, ftype)

    def free_name(self, ino: int, ftype: int) -> None:
        """The last step of `drop` for one inode: one link less, or the inode freed."""
        inode = self.read_inode(ino)
        if ftype != L.EXT2_FT_DIR and inode.i_links_count > 1:
            inode.i_links_count -= 1
            self.write_inode(ino, inode)
            return
        if L.lib.ext2fs_inode_has_valid_blocks2(self.fs, ctypes.byref(inode)):
            L.check(L.lib.ext2fs_punch(self.fs, ino, ctypes.byref(inode), None, 0, NO_GOAL),
                    "ext2fs_punch", self.where)
        if inode.i_file_acl or inode.l_i_file_acl_high:
            L.check(L.lib.ext2fs_free_ext_attr(self.fs, ino, ctypes.byref(inode)), "ext2fs_free_ext_attr",
                    self.where)
        inode.i_links_count = 0
        inode.i_dtime = FAKE_TIME
        self.write_inode(ino, inode)
        L.lib.ext2fs_inode_alloc_stats2(self.fs, ino, -1, 1 if ftype == L.EXT2_FT_DIR else 0)
        self.live_files.pop(ino, None)
        self.known_extents.pop(ino, None)

    def opaque(self, dir_ino: int, path: str) -> None:
        """Hide lower children of `path`: keep what this layer put there (and the way to it).

        A kept directory's own lower children are hidden too, as overlayfs shows an opaque
        directory: only the upper layer's content below it. Iterative (directories can nest
        thousands deep), visiting in the order a recursive walk would."""
        stack = [(path, iter(list(self.dirs.names(dir_ino).items())), dir_ino)]
        while stack:
            path, children, dir_ino = stack[-1]
            item = next(children, None)
            if item is None:
                stack.pop()
                continue
            name, (ino, ftype) = item
            base = name.decode("utf-8", "surrogateescape")
            child = f"{path}/{base}" if path else base
            # Kept: what this layer touched, and mkfs's lost+found (e2fsck expects it;
            # faithful.LOST_FOUND_ADDED); what lower layers put in them is hidden all the same.
            if (not path and base == LOST_FOUND) or child in self.touched or child in self.touched_parents:
                if ftype == L.EXT2_FT_DIR:
                    stack.append((child, iter(list(self.dirs.names(ino).items())), ino))
                continue
            self.remove(dir_ino, name, ino, ftype)

    # --- read-back ---
    def extents_of(self, ino: int) -> list[Extent]:
        inode = self.read_inode(ino)
        handle = L.P()
        L.check(L.lib.ext2fs_extent_open2(self.fs, ino, ctypes.byref(inode), ctypes.byref(handle)),
                "ext2fs_extent_open2", f"inode {ino}")
        out: list[Extent] = []
        ext = L.Ext2fsExtent()
        try:
            op = L.EXT2_EXTENT_ROOT
            while True:
                rc = L.lib.ext2fs_extent_get(handle, op, ctypes.byref(ext))
                if rc == L.EXT2_ET_EXTENT_NO_NEXT:
                    break
                L.check(rc, "ext2fs_extent_get", f"inode {ino}")
                op = L.EXT2_EXTENT_NEXT
                if ext.e_flags & L.EXT2_EXTENT_FLAGS_LEAF and ext.e_len:
                    if ext.e_flags & L.EXT2_EXTENT_FLAGS_UNINIT:
                        raise ObdconvError(f"inode {ino}: fallocate left an uninitialised extent")
                    out.append(Extent(ext.e_lblk, ext.e_pblk, ext.e_len))
        finally:
            L.lib.ext2fs_extent_free(handle)
        return out


def _root_extents(inode: bytearray) -> list[Extent] | None:
    """Extents straight from the inode's i_block when the tree is only its root (depth 0), which
    is every file of up to 4 extents; None for deeper trees (read those through libext2fs)."""
    raw = memoryview(inode)[_I_BLOCK:_I_BLOCK + 60]
    magic, entries, _, depth, _ = L.EXT_HEADER.unpack_from(raw, 0)
    if magic != L.EXT3_EXT_MAGIC or depth != 0:
        return None
    out = []
    for k in range(entries):
        lblk, length, hi, lo = L.EXT_LEAF.unpack_from(raw, 12 + 12 * k)
        if length > L.EXT_INIT_MAX_LEN:
            return None  # uninitialised: let extents_of() report it
        out.append(Extent(lblk, (hi << 32) | lo, length))
    return out


def _xattr_names(h: int) -> list[bytes]:
    names: list[bytes] = []

    def on_attr(name: int, _value: int, _len: int, _data: int) -> int:
        names.append(ctypes.string_at(name))
        return 0

    cb = L.XattrIterateFunc(on_attr)
    L.check(L.lib.ext2fs_xattrs_iterate(h, cb, None), "ext2fs_xattrs_iterate")
    return names
