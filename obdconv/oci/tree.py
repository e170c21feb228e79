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
* symlinks have mode 0777 (Linux ignores chmod on symlinks); `user.*` xattrs are dropped on
  anything but files and directories (the kernel refuses them, the reference skips them); xattrs
  outside the namespaces user/trusted/security/system/gnu are dropped;
* mtime is the PAX `mtime` to the nanosecond if present, else the header's seconds;
* entries resolving to the root ("./") are ignored, as the reference and containerd do; the Tree
  has NO entry for the root itself. Paths escaping the root raise `UnsafePathError`; GNU sparse
  members raise `UnsupportedError`; unknown types raise `UnsafePathError`.

`tree_from_directory` walks a mounted filesystem with lstat (root excluded, `lost+found` at the
root skipped), so both can be compared with `obdconv.tree.diff_trees`.

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
from obdconv.tree import Tree, TreeEntry

_ALLOWED_XATTR_NAMESPACES = ("user.", "trusted.", "security.", "system.", "gnu.")
_WHITEOUT_PREFIX = ".wh."
_WHITEOUT_META_PREFIX = ".wh..wh."
_WHITEOUT_OPAQUE = ".wh..wh..opq"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_HASH_CHUNK = 1 << 20


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
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
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
    def __init__(self) -> None:
        self.paths: dict[str, _Inode] = {}
        self.layer_paths: set[str] = set()

    # -- helpers ----------------------------------------------------------------------------

    def _children(self, directory: str) -> list[str]:
        prefix = directory + "/" if directory else ""
        return [p for p in self.paths if p.startswith(prefix) and p != directory]

    def remove(self, path: str) -> None:
        inode = self.paths.pop(path, None)
        if inode is not None and inode.kind == "dir":
            for child in self._children(path):
                del self.paths[child]

    def make_parents(self, path: str, entry: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            existing = self.paths.get(parent)
            if existing is None:
                self.paths[parent] = _Inode("dir", 0o755, 0, 0, 0)
            elif existing.kind != "dir":
                raise BadInputError(f"tar entry {entry!r}: parent {parent!r} is not a directory")

    def opaque(self, directory: str) -> None:
        keep: set[str] = set()
        for p in self.layer_paths:
            keep.add(p)
            parts = p.split("/")
            keep.update("/".join(parts[:i]) for i in range(1, len(parts)))
        for child in self._children(directory):
            if child not in keep:
                self.paths.pop(child, None)

    # -- one member -------------------------------------------------------------------------

    def apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        path = _clean(name, name)
        if path == "":
            return
        first = path.split("/")[0]
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
            self.paths[path] = inode
            self._set_meta(inode, member, mode, mtime_ns, xattrs)
            self.layer_paths.add(path)
            return

        if member.isdir():
            if existing is not None and existing.kind == "dir":
                self._set_meta(existing, member, mode, mtime_ns, xattrs)
                self.layer_paths.add(path)
                return
            inode = _Inode("dir", mode, member.uid, member.gid, mtime_ns)
        elif member.isreg():
            digest = hashlib.sha256()
            source = tar.extractfile(member)
            assert source is not None  # a regular member always has a file object
            while chunk := source.read(_HASH_CHUNK):
                digest.update(chunk)
            inode = _Inode("file", mode, member.uid, member.gid, mtime_ns, member.size, digest.hexdigest())
        elif member.issym():
            target_bytes = member.linkname.encode("utf-8", "surrogateescape")
            inode = _Inode("symlink", 0o777, member.uid, member.gid, mtime_ns, len(target_bytes),
                           link_target=member.linkname)
        elif member.ischr() or member.isblk():
            kind = "char" if member.ischr() else "block"
            inode = _Inode(kind, mode, member.uid, member.gid, mtime_ns,
                           rdev=(member.devmajor, member.devminor))
        elif member.isfifo():
            inode = _Inode("fifo", mode, member.uid, member.gid, mtime_ns)
        else:
            raise UnsafePathError(f"tar entry {name!r}: unsupported tar entry type {member.type!r}")
        self.remove(path)
        self._set_xattrs(inode, xattrs)
        self.paths[path] = inode
        self.layer_paths.add(path)

    def _set_meta(self, inode: _Inode, member: tarfile.TarInfo, mode: int, mtime_ns: int,
                  xattrs: dict[str, bytes]) -> None:
        inode.uid, inode.gid, inode.mtime_ns = member.uid, member.gid, mtime_ns
        if inode.kind != "symlink":
            inode.mode = mode
        self._set_xattrs(inode, xattrs)

    @staticmethod
    def _set_xattrs(inode: _Inode, xattrs: dict[str, bytes]) -> None:
        for key, value in xattrs.items():
            if not key.startswith(_ALLOWED_XATTR_NAMESPACES):
                continue
            if key.startswith("user.") and inode.kind not in ("file", "dir"):
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


def tree_from_tar_layers(paths: list[Path]) -> Tree:
    """Apply tar layers (plain, gzip or zstd; bottom first) and return the resulting tree."""
    model = _Model()
    for layer in paths:
        model.layer_paths = set()
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


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _dir_xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # filesystem without xattr support
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}


def tree_from_directory(root: Path) -> Tree:
    """The tree of a mounted filesystem (root itself excluded, root-level `lost+found` skipped)."""
    root_str = os.fspath(root)
    found: dict[str, tuple[os.stat_result, str]] = {}

    def walk(directory: str, rel: str) -> None:
        with os.scandir(directory) as it:
            names = sorted(e.name for e in it)
        for name in names:
            if not rel and name == "lost+found":
                continue
            full = os.path.join(directory, name)
            relpath = f"{rel}/{name}" if rel else name
            st = os.lstat(full)
            kind = _KINDS.get(stat.S_IFMT(st.st_mode))
            if kind is None:
                continue  # sockets: not representable in a layer
            found[relpath] = (st, kind)
            if kind == "dir":
                walk(full, relpath)

    walk(root_str, "")
    groups: dict[tuple[int, int], list[str]] = {}
    for relpath, (st, _) in found.items():
        groups.setdefault((st.st_dev, st.st_ino), []).append(relpath)
    out: Tree = {}
    for relpath in sorted(found):
        st, kind = found[relpath]
        full = os.path.join(root_str, relpath)
        entry = TreeEntry(
            path=relpath, kind=kind, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
            size=st.st_size, mtime_ns=st.st_mtime_ns, nlink=st.st_nlink,
            link_group=min(groups[(st.st_dev, st.st_ino)]), xattrs=_dir_xattrs(full),
        )
        if kind == "file":
            entry.sha256 = _file_sha256(full)
        elif kind == "symlink":
            entry.link_target = os.readlink(full)
        elif kind in ("char", "block"):
            entry.rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        out[relpath] = entry
    return out
