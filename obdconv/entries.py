"""`LayerEntry`: one tar member of a layer, as the tar scan yields it and the ext4 engine applies it.

This is the contract between `obdconv.oci.tarscan` (producer), `obdconv.ext4` (consumer) and the
pipeline (which moves entry lists between workers, so they must serialise compactly).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EntryType(enum.Enum):
    FILE = "f"
    DIR = "d"
    SYMLINK = "l"
    HARDLINK = "h"  # `link_target` is the cleaned path of the link's target (this layer or lower)
    CHAR = "c"
    BLOCK = "b"
    FIFO = "p"
    WHITEOUT = "w"  # `.wh.NAME`: `path` is the path to delete (recursively)
    OPAQUE = "o"  # `.wh..wh..opq`: `path` is the directory whose lower children are hidden


@dataclass(slots=True)
class LayerEntry:
    """One entry, in tar order.

    path: lexically cleaned, relative to the root, no leading "/", never empty, never escaping.
    mode: permission bits incl. setuid/setgid/sticky (`& 0o7777`); the type is in `type`.
    mtime_ns: nanoseconds since the epoch; may be negative or beyond 2038 (PAX sub-second times kept).
    size: regular files only (bytes of content).
    link_target: symlink target as stored (not cleaned), or hardlink target path (cleaned).
    xattrs: (name, value) in tar order, from PAX `SCHILY.xattr.*`.
    tar_offset: byte offset of a regular file's content in the *uncompressed* tar stream (turboOCI).
    data_offset: byte offset of a regular file's content in the layer's data area (native);
        4 KiB aligned; -1 when the file has no bytes there (empty file).
    """

    path: str
    type: EntryType
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    link_target: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: list[tuple[str, bytes]] = field(default_factory=list)
    tar_offset: int = -1
    data_offset: int = -1

    def to_list(self) -> list:
        """Compact JSON/msgpack-able form (positional), for moving entry lists through the broker."""
        return [
            self.path, self.type.value, self.mode, self.uid, self.gid, self.mtime_ns, self.size,
            self.link_target, self.devmajor, self.devminor,
            [[k, v.hex()] for k, v in self.xattrs], self.tar_offset, self.data_offset,
        ]

    @classmethod
    def from_list(cls, row: list) -> LayerEntry:
        # Runs once per entry of every layer the metadata pass loads (~70k per image), so: one
        # call with the row spread (quicker than indexing it 13 times), then the two fields that
        # need converting; the type by a dict lookup instead of `EntryType(value)` (Enum.__call__
        # costs ~1 µs; it still handles, and words the error for, anything the dict does not
        # hold); no list comprehension for the xattrs, which are nearly always empty.
        entry = cls(*row)
        try:
            entry.type = _TYPE_OF_VALUE[row[1]]
        except (KeyError, TypeError):
            entry.type = EntryType(row[1])
        xattrs = row[10]
        entry.xattrs = [(k, bytes.fromhex(v)) for k, v in xattrs] if xattrs else []
        return entry


_TYPE_OF_VALUE: dict[str, EntryType] = {t.value: t for t in EntryType}
