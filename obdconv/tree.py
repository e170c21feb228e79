"""`TreeEntry`: what a filesystem tree looks like, for comparing an image with its source.

Producers: a model of tar layers applied in order (`obdconv.oci.tree`), a mounted directory
(`obdconv.oci.tree.tree_from_directory`), an ext4 image read in userspace (`obdconv.ext4.reader`).
`diff_trees` gives readable differences; an empty list means equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class TreeEntry:
    """One path. `kind` is one of "file", "dir", "symlink", "char", "block", "fifo".

    `link_group` identifies the inode among hard links (equal values = same inode): producers set
    it to the smallest path of the group (so it is comparable across trees); `sha256` is the hex
    digest of a regular file's content; `mtime_ns` is the modification time; xattrs sorted by name.
    """

    path: str
    kind: str
    mode: int  # & 0o7777
    uid: int
    gid: int
    size: int = 0
    sha256: str = ""
    link_target: str = ""
    rdev: tuple[int, int] = (0, 0)
    mtime_ns: int = 0
    nlink: int = 1
    link_group: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)


Tree = dict[str, TreeEntry]

# Fields not compared for directories (size and nlink of a directory depend on the filesystem).
_DIR_SKIP = {"size", "nlink", "sha256"}


def diff_trees(expected: Tree, actual: Tree, *, ignore: set[str] | None = None) -> list[str]:
    """Human-readable differences between two trees (path-sorted). Empty list = same tree.

    `ignore` names TreeEntry fields to skip (e.g. {"mtime_ns"} for a source that lacks them),
    and paths to skip entirely (e.g. {"lost+found"}).
    """
    ignore = ignore or set()
    out: list[str] = []
    for path in sorted(set(expected) | set(actual)):
        if path in ignore:
            continue
        a, b = expected.get(path), actual.get(path)
        if a is None:
            out.append(f"+ {path}: unexpected {b.kind if b else '?'}")
            continue
        if b is None:
            out.append(f"- {path}: missing {a.kind}")
            continue
        for f in fields(TreeEntry):
            name = f.name
            if name in ignore or name == "path":
                continue
            if a.kind == "dir" and name in _DIR_SKIP:
                continue
            va, vb = getattr(a, name), getattr(b, name)
            if name == "mode":
                va, vb = oct(va), oct(vb)
            if va != vb:
                out.append(f"~ {path}: {name} expected {va!r}, got {vb!r}")
    return out
