"""Tree models: what filesystem a stack of tar layers describes, and what a mounted directory holds.

`tree_from_tar_layers` is an INDEPENDENT model for checking conversions: it reads layers with
Python's `tarfile` (not `obdconv.oci.tarscan`) and applies them in order with overlay semantics,
following the reference untar (spec overlaybd-format §4 "Untar semantics") where that is right:

* missing parent directories are created 0755, 0:0, mtime 0 (also for whiteout entries);
* `.wh.NAME` removes `dir/NAME` recursively; `.wh..wh..opq` removes everything below `dir` that
  did not come from the same layer (the directory itself is kept); other `.wh..wh.*` (aufs
  metadata) and everything below them are ignored;
* an existing non-directory is replaced; a directory replaced by a non-directory is removed
  recursively; a directory over a directory is merged (the new metadata applies, xattrs are set
  one by one, so lower xattrs not named again stay);
* a hard link shares the inode of its target (this layer or a lower one); the link's header
  metadata (owner, mode, mtime, xattrs) is applied to that shared inode, as the reference does;
* symlinks have mode 0777 (Linux ignores chmod on symlinks);
* mtime is the PAX `mtime` to the nanosecond if present, else the header's seconds;
* the documented differences of a conversion (`obdconv.faithful`: sockets skipped, xattrs ext4
  does not store dropped, times clamped to ext4's range) are applied, so the tree is what a
  faithful conversion holds; `differences` collects each one applied;
* entries resolving to the root ("./") are ignored, as the reference and containerd do; the Tree
  has NO entry for the root itself. Paths escaping the root raise `UnsafePathError`; GNU sparse
  members raise `UnsupportedError`; unknown types raise `UnsafePathError`.

`tree_from_directory` walks a mounted filesystem with lstat (root excluded, `lost+found` at the
root skipped unless asked for), so both can be compared with `obdconv.tree.diff_trees`. Nothing
here recurses: layers and filesystems can nest directories thousands deep.

`link_group` is set for every entry: the smallest path among the paths sharing its inode (its own
path when it has no other links), so it compares across producers.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

from obdconv.errors import BadInputError, UnsafePathError, UnsupportedError
from obdconv.faithful import (
    MTIME_CLAMPED,
    SOCKET_SKIPPED,
    Difference,
    Rule,
    clamp_time_ns,
    is_socket,
    xattr_dropped_by,
)
from obdconv.tree import Tree, TreeEntry

_WHITEOUT_PREFIX = ".wh."
_WHITEOUT_META_PREFIX = ".wh..wh."
_WHITEOUT_OPAQUE = ".wh..wh..opq"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_HASH_CHUNK = 1 << 20
MAX_TIME_DIGITS = 30  # digits of seconds in a PAX time, as the tar scanner allows (tarscan.MAX_TIME_DIGITS)


@dataclass(slots=True)
class _Inode:
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    sha256: str = ""
    link_target: str = ""
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _clean(name: str, entry: str) -> str:
    if not name.startswith((".", "/")) and "/." not in name and "//" not in name:
        return name.rstrip("/")  # nothing to clean but a trailing slash (no loop per component)
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise UnsafePathError(f"tar entry {entry!r}: path {name!r} escapes the root")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def _mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text is None:
        return int(member.mtime) * 1_000_000_000
    # As the tar scanner reads it (tarscan.parse_pax_time): what it refuses is bad input here too.
    text = text.strip()
    negative = text.startswith("-")
    whole, _, frac = (text[1:] if negative else text).partition(".")
    if not (whole.isascii() and whole.isdigit()) or (frac and not (frac.isascii() and frac.isdigit())) \
            or len(whole) > MAX_TIME_DIGITS:
        raise BadInputError(f"tar entry {member.name!r}: bad PAX mtime {text[:64]!r}")
    ns = int(whole) * 1_000_000_000 + int((frac[:9] or "0").ljust(9, "0"))
    return -ns if negative else ns


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            # tarfile decodes PAX values as UTF-8 with surrogateescape; this recovers the raw bytes.
            out[key[len("SCHILY.xattr.") :]] = value.encode("utf-8", "surrogateescape")
    return out


@contextmanager
def _open_layer(path: Path) -> Iterator[tarfile.TarFile]:
    """A streaming tarfile over a plain, gzip or zstd layer (compression sniffed from magic)."""
    with open(path, "rb") as raw:
        head = raw.read(4)
        raw.seek(0)
        stream: BinaryIO
        if head.startswith(_GZIP_MAGIC):
            stream = gzip.GzipFile(fileobj=raw)  # type: ignore[assignment]
        elif head == _ZSTD_MAGIC:
            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[assignment]
        else:
            stream = raw
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            yield tar


class _Model:
    """The tree being built. Paths are keys of `paths`; `kids` indexes each directory's entries so
    removing a subtree or hiding one (opaque) touches only that subtree, and nothing recurses:
    layers can nest directories thousands deep."""

    def __init__(self, differences: list[Difference] | None = None) -> None:
        self.paths: dict[str, _Inode] = {}
        self.kids: dict[str, set[str]] = {"": set()}  # directory path ("" = root) -> paths of its entries
        self.layer_paths: set[str] = set()  # entries of the layer being applied
        self.layer_dirs: set[str] = set()  # their ancestors (the way to them)
        self.layer = -1
        self.differences = differences

    def start_layer(self, index: int) -> None:
        self.layer = index
        self.layer_paths = set()
        self.layer_dirs = set()

    def differ(self, rule: Rule, path: str, detail: str = "") -> None:
        if self.differences is not None:
            self.differences.append(Difference(rule, path, detail, self.layer))

    # -- helpers ----------------------------------------------------------------------------

    def add(self, path: str, inode: _Inode) -> None:
        """Set `path` (its parents exist; anything there was removed first unless it is `inode`)."""
        if path not in self.paths:
            self.kids[path.rpartition("/")[0]].add(path)
        self.paths[path] = inode
        if inode.kind == "dir":
            self.kids.setdefault(path, set())

    def remove(self, path: str) -> None:
        """Remove `path` and, for a directory, everything below it."""
        if path not in self.paths:
            return
        self.kids[path.rpartition("/")[0]].discard(path)
        stack = [path]
        while stack:
            p = stack.pop()
            del self.paths[p]
            stack.extend(self.kids.pop(p, ()))

    def make_parents(self, path: str, entry: str) -> None:
        """Create the missing directories above `path` (0755, 0:0, time 0). Every existing path's
        parents exist, so the walk up stops at the first one found."""
        missing: list[str] = []
        parent = path.rpartition("/")[0]
        while parent:
            existing = self.paths.get(parent)
            if existing is not None:
                if existing.kind != "dir":
                    raise BadInputError(f"tar entry {entry!r}: parent {parent!r} is not a directory")
                break
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        for p in reversed(missing):
            self.add(p, _Inode("dir", 0o755, 0, 0, 0))

    def mark_layer(self, path: str) -> None:
        """`path` comes from the layer being applied: an opaque marker keeps it and the way to it."""
        self.layer_paths.add(path)
        parent = path.rpartition("/")[0]
        while parent and parent not in self.layer_dirs:
            self.layer_dirs.add(parent)
            parent = parent.rpartition("/")[0]

    def opaque(self, directory: str) -> None:
        """Remove everything below `directory` that did not come from this layer (nor leads to
        what did); a kept directory's lower content is hidden too."""
        stack = [directory]
        while stack:
            for child in list(self.kids.get(stack.pop(), ())):
                if child in self.layer_paths or child in self.layer_dirs:
                    stack.append(child)
                else:
                    self.remove(child)

    # -- one member -------------------------------------------------------------------------

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        if member.isreg() and is_socket(member.mode):
            self.differ(SOCKET_SKIPPED, name.strip("/"))
            return
        path = _clean(name, name)
        if path == "":
            return
        first = path.partition("/")[0]
        if first.startswith(_WHITEOUT_META_PREFIX) and first != _WHITEOUT_OPAQUE:
            return  # aufs metadata tree
        if member.issparse() or member.type == tarfile.GNUTYPE_SPARSE:
            raise UnsupportedError(f"tar entry {name!r}: GNU sparse files are not supported")
        if any(k.startswith("GNU.sparse.") for k in member.pax_headers):
            raise UnsupportedError(f"tar entry {name!r}: GNU sparse files are not supported")

        parent, _, base = path.rpartition("/")
        if base.startswith(_WHITEOUT_PREFIX):
            self.make_parents(path, name)
            if base == _WHITEOUT_OPAQUE:
                self.opaque(parent)
            elif not base.startswith(_WHITEOUT_META_PREFIX):
                hidden = base[len(_WHITEOUT_PREFIX) :]
                self.remove(f"{parent}/{hidden}" if parent else hidden)
            return

        self.make_parents(path, name)
        mtime_ns = _mtime_ns(member)
        stored = clamp_time_ns(mtime_ns)
        if stored != mtime_ns:
            self.differ(MTIME_CLAMPED, path, f"{mtime_ns} ns stored as {stored}")
        xattrs = _xattrs(member)
        mode = member.mode & 0o7777
        existing = self.paths.get(path)

        if member.islnk():
            target = _clean(member.linkname, name)
            inode = self.paths.get(target)
            if inode is None:
                raise BadInputError(f"tar entry {name!r}: hard link target {target!r} does not exist")
            if inode.kind == "dir":
                raise BadInputError(f"tar entry {name!r}: hard link to directory {target!r}")
            if existing is not inode:
                self.remove(path)
            self.add(path, inode)
            self._set_meta(path, inode, member, mode, stored, xattrs)
            self.mark_layer(path)
            return

        if member.isdir():
            if existing is not None and existing.kind == "dir":
                self._set_meta(path, existing, member, mode, stored, xattrs)
                self.mark_layer(path)
                return
            inode = _Inode("dir", mode, member.uid, member.gid, stored)
        elif member.isreg():
            digest = hashlib.sha256()
            source = tar.extractfile(member)
            assert source is not None  # a regular member always has a file object
            while chunk := source.read(_HASH_CHUNK):
                digest.update(chunk)
            inode = _Inode("file", mode, member.uid, member.gid, stored, member.size, digest.hexdigest())
        elif member.issym():
            target_bytes = member.linkname.encode("utf-8", "surrogateescape")
            inode = _Inode("symlink", 0o777, member.uid, member.gid, stored, len(target_bytes),
                           link_target=member.linkname)
        elif member.ischr() or member.isblk():
            kind = "char" if member.ischr() else "block"
            inode = _Inode(kind, mode, member.uid, member.gid, stored,
                           rdev=(member.devmajor, member.devminor))
        elif member.isfifo():
            inode = _Inode("fifo", mode, member.uid, member.gid, stored)
        else:
            raise UnsafePathError(f"tar entry {name!r}: unsupported tar entry type {member.type!r}")
        self.remove(path)
        self._set_xattrs(path, inode, xattrs)
        self.add(path, inode)
        self.mark_layer(path)

    def _set_meta(self, path: str, inode: _Inode, member: tarfile.TarInfo, mode: int, mtime_ns: int,
                  xattrs: dict[str, bytes]) -> None:
        inode.uid, inode.gid, inode.mtime_ns = member.uid, member.gid, mtime_ns
        if inode.kind != "symlink":
            inode.mode = mode
        self._set_xattrs(path, inode, xattrs)

    def _set_xattrs(self, path: str, inode: _Inode, xattrs: dict[str, bytes]) -> None:
        file_or_dir = inode.kind in ("file", "dir")
        for key, value in xattrs.items():
            rule = xattr_dropped_by(key, file_or_dir)
            if rule is not None:
                self.differ(rule, path, key)
                continue
            inode.xattrs[key] = value

    def tree(self) -> Tree:
        groups: dict[int, list[str]] = {}
        for path, inode in self.paths.items():
            groups.setdefault(id(inode), []).append(path)
        out: Tree = {}
        for path in sorted(self.paths):
            inode = self.paths[path]
            group = groups[id(inode)]
            out[path] = TreeEntry(
                path=path, kind=inode.kind, mode=inode.mode, uid=inode.uid, gid=inode.gid,
                size=inode.size, sha256=inode.sha256, link_target=inode.link_target, rdev=inode.rdev,
                mtime_ns=inode.mtime_ns, nlink=len(group), link_group=min(group),
                xattrs=dict(sorted(inode.xattrs.items())),
            )
        return out


def tree_from_tar_layers(paths: list[Path], differences: list[Difference] | None = None) -> Tree:
    """Apply tar layers (plain, gzip or zstd; bottom first) and return the tree ext4 holds after a
    faithful conversion; each documented difference applied (`obdconv.faithful`) is appended to
    `differences` when given."""
    model = _Model(differences)
    for index, layer in enumerate(paths):
        model.start_layer(index)
        try:
            with _open_layer(Path(layer)) as tar:
                for member in tar:
                    model.apply(tar, member)
        except tarfile.TarError as exc:
            raise BadInputError(f"layer {layer}: not a readable tar: {exc}") from exc
    return model.tree()


_KINDS = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
}


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _sha256_at(dir_fd: int, name: str) -> str:
    digest = hashlib.sha256()
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dir_fd)
    with open(fd, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _xattrs_at(dir_fd: int, name: str) -> dict[str, bytes]:
    # No *xattr call takes a directory fd, and one cannot open a symlink or a device for them;
    # /proc/self/fd/N names the directory by its open file (any depth), then `name` is one step.
    path = f"/proc/self/fd/{dir_fd}/{name}"
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # filesystem without xattr support
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def _enter(dir_fd: int, name: str, expected: tuple[int, int]) -> int:
    """Open directory `name` (".." to go up) relative to `dir_fd`, close `dir_fd`, check it is the
    directory the walk expects (nothing is renamed in a read-only mount; this makes sure)."""
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    st = os.fstat(fd)
    os.close(dir_fd)
    if (st.st_dev, st.st_ino) != expected:
        os.close(fd)
        raise BadInputError(f"directory {name!r} changed while the tree was read")
    return fd


def tree_from_directory(root: Path, *, skip_lost_found: bool = True) -> Tree:
    """The tree of a mounted filesystem (root itself excluded; root-level `lost+found` skipped
    unless `skip_lost_found` is False).

    Nothing recurses and no full path is handed to the kernel: the walk holds ONE directory fd,
    opens each entry relative to it and climbs back with "..", so any depth and any path length
    (beyond PATH_MAX) work with a constant number of open files."""
    found: dict[str, TreeEntry] = {}
    inode_of: dict[str, tuple[int, int]] = {}

    def read_dir(fd: int, rel: str) -> list[tuple[str, tuple[int, int]]]:
        """Record the entries of the directory open as `fd`; returns its subdirectories."""
        with os.scandir(fd) as it:
            names = sorted(e.name for e in it)
        subdirs: list[tuple[str, tuple[int, int]]] = []
        for name in names:
            if skip_lost_found and not rel and name == "lost+found":
                continue
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            kind = _KINDS.get(stat.S_IFMT(st.st_mode))
            if kind is None:
                continue  # sockets: not representable in a layer
            relpath = f"{rel}/{name}" if rel else name
            entry = TreeEntry(
                path=relpath, kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                size=st.st_size, mtime_ns=st.st_mtime_ns, nlink=st.st_nlink, xattrs=_xattrs_at(fd, name),
            )
            if kind == "file":
                entry.sha256 = _sha256_at(fd, name)
            elif kind == "symlink":
                entry.link_target = os.readlink(name, dir_fd=fd)
            elif kind in ("char", "block"):
                entry.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            elif kind == "dir":
                subdirs.append((name, (st.st_dev, st.st_ino)))
            found[relpath] = entry
            inode_of[relpath] = (st.st_dev, st.st_ino)
        return subdirs

    fd = os.open(os.fspath(root), _DIR_FLAGS)
    try:
        top = os.fstat(fd)
        # One level per open directory of the walk: (its path, its subdirectories not yet
        # visited, its (dev, ino)).
        stack = [("", iter(read_dir(fd, "")), (top.st_dev, top.st_ino))]
        while stack:
            rel, pending, _ = stack[-1]
            child = next(pending, None)
            if child is None:
                stack.pop()
                if stack:
                    fd = _enter(fd, "..", stack[-1][2])
                continue
            name, key = child
            fd = _enter(fd, name, key)
            child_rel = f"{rel}/{name}" if rel else name
            stack.append((child_rel, iter(read_dir(fd, child_rel)), key))
    finally:
        os.close(fd)

    groups: dict[tuple[int, int], list[str]] = {}
    for relpath, key in inode_of.items():
        groups.setdefault(key, []).append(relpath)
    out: Tree = {}
    for relpath in sorted(found):
        entry = found[relpath]
        entry.link_group = min(groups[inode_of[relpath]])
        out[relpath] = entry
    return out
