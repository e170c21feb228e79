"""Checks of an entry list that need no filesystem: done before anything is written."""

from __future__ import annotations

from collections.abc import Sequence

from obdconv.entries import EntryType, LayerEntry
from obdconv.errors import BadInputError, UnsafePathError
from obdconv.ext4.segment import BLOCK_SIZE
from obdconv.faithful import xattr_supported  # which xattrs are written: one definition (faithful.py)

MAX_NAME = 255
MAX_SYMLINK = BLOCK_SIZE - 1
# Room in one external EA block: 32-byte header, 4-byte end marker; per entry 16 bytes + padded name/value.
XATTR_BLOCK_ROOM = BLOCK_SIZE - 32 - 4
_BAD_COMPONENTS = frozenset(("", ".", ".."))


def entry_label(index: int, path: str, limit: int = 200) -> str:
    """How errors name an entry: its index and path, the path shortened past `limit` characters
    (a malicious tar can carry a path of megabytes; the index still identifies the entry)."""
    shown = path if len(path) <= limit else f"{path[:limit]}...({len(path) - limit} more characters)"
    return f"entry {index} {shown!r}"


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def validate_entries(entries: Sequence[LayerEntry], start: int = 0) -> None:
    """Checks that need no filesystem; raise naming the first bad entry (nothing written yet).
    `start` is the index of `entries[0]` in its layer (errors name entries by layer index)."""
    file_type, dir_type = EntryType.FILE, EntryType.DIR
    bad_components = _BAD_COMPONENTS
    for i, e in enumerate(entries, start):
        # The common case first, cheaply (it runs once per entry of every layer): a short clean
        # ASCII path (so no name is over MAX_NAME bytes) of a file (size >= 0) or directory
        # without xattrs, in-range owner and mode. Anything else gets every check in _validate_entry.
        path = e.path
        t = e.type
        if ((t is file_type and e.size >= 0) or (t is dir_type and path != ".")) and not e.xattrs \
                and 0 < len(path) <= MAX_NAME and path.isascii() and path[0] != "/" and "\0" not in path \
                and bad_components.isdisjoint(path.split("/")) \
                and 0 <= e.uid < 1 << 32 and 0 <= e.gid < 1 << 32 and 0 <= e.mode <= 0o7777:
            continue
        _validate_entry(i, e)


def _validate_entry(i: int, e: LayerEntry) -> None:
    """All checks of one entry."""
    where = entry_label(i, e.path)
    if not isinstance(e.type, EntryType):
        raise UnsafePathError(f"{where}: unsupported entry type {e.type!r}")
    if e.path == "." and e.type in (EntryType.DIR, EntryType.OPAQUE):
        pass  # the root directory itself (the scanner reports "./" this way)
    elif not e.path or e.path.startswith("/") or "\0" in e.path:
        raise UnsafePathError(f"{where}: path must be relative, non-empty, without NUL")
    comps = e.path.split("/") if e.path != "." else []
    if not _BAD_COMPONENTS.isdisjoint(comps):
        raise UnsafePathError(f"{where}: path is not clean (empty, '.' or '..' component)")
    if any(len(encode_name(c)) > MAX_NAME for c in comps):
        raise BadInputError(f"{where}: a name is longer than {MAX_NAME} bytes")
    if not (0 <= e.uid < 1 << 32 and 0 <= e.gid < 1 << 32):
        raise BadInputError(f"{where}: uid/gid {e.uid}:{e.gid} out of the 32-bit range")
    if not 0 <= e.mode <= 0o7777:
        raise BadInputError(f"{where}: mode {e.mode:o} has bits outside 07777")
    if e.type is EntryType.FILE and e.size < 0:
        raise BadInputError(f"{where}: negative size")
    if e.type is EntryType.SYMLINK:
        target = encode_name(e.link_target)
        if not target or len(target) > MAX_SYMLINK or b"\0" in target:
            raise BadInputError(f"{where}: symlink target must be 1..{MAX_SYMLINK} bytes without NUL")
    if e.type is EntryType.HARDLINK:
        t = e.link_target
        if not t or t.startswith("/") or any(c in ("", ".", "..") for c in t.split("/")):
            raise UnsafePathError(f"{where}: hardlink target {t!r} is not a clean relative path")
        if t == e.path:
            raise BadInputError(f"{where}: hardlink to itself")
    if e.type in (EntryType.CHAR, EntryType.BLOCK) and not (
        0 <= e.devmajor < 1 << 12 and 0 <= e.devminor < 1 << 20
    ):
        raise BadInputError(f"{where}: device {e.devmajor}:{e.devminor} out of range (12:20 bits)")
    room = 0
    for name, value in e.xattrs:
        if not xattr_supported(name):
            continue
        if len(encode_name(name)) > MAX_NAME:
            raise BadInputError(f"{where}: xattr name {name!r} too long")
        room += 16 + ((len(encode_name(name)) + 3) & ~3) + ((len(value) + 3) & ~3)
    if room > XATTR_BLOCK_ROOM:
        raise BadInputError(f"{where}: xattrs take {room} bytes; at most one 4 KiB block fits")
