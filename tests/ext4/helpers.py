"""Test helpers for the ext4 engine: make tars, scan them, run the builder, assemble a device, mount it."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from obdconv.entries import EntryType, LayerEntry
from obdconv.ext4 import Ext4Builder, LayerMetadata

BLOCK = 4096
VSIZE = 1 << 30
FS_UUID = uuid.UUID("1b1e3f50-c815-fd19-ced3-d36687784b7a")


@dataclass
class Member:
    """One tar member to write. kind: file, dir, symlink, hardlink, char, block, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: str = "1704067200"  # PAX mtime text (may be negative, with up to 9 decimals)
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] | None = None


_TYPES = {
    "file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE,
}


def write_tar(path: Path, members: Sequence[Member]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = _TYPES[m.kind]
            info.mode = m.mode
            info.uid, info.gid = m.uid, m.gid
            info.mtime = int(float(m.mtime))
            pax = {"mtime": m.mtime}
            for k, v in (m.xattrs or {}).items():
                pax["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
            info.pax_headers = pax
            if m.kind in ("symlink", "hardlink"):
                info.linkname = m.link
            if m.kind in ("char", "block"):
                info.devmajor, info.devminor = m.dev
            if m.kind == "file":
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)
    return path


def scan(tar_path: Path) -> tuple[list[LayerEntry], bytes]:
    """Entries and data area of a tar, through the real scanner."""
    from obdconv.oci.tarscan import TarScanner

    area = io.BytesIO()
    scanner = TarScanner(area)
    with open(tar_path, "rb") as f:
        while chunk := f.read(1 << 16):
            scanner.feed(chunk)
    return scanner.finish(), area.getvalue()


@dataclass
class Layer:
    entries: list[LayerEntry]
    data: bytes  # the data area (entry.data_offset indexes into it)
    meta: LayerMetadata | None = None


def build(image: Path, layers: Sequence[Layer], vsize: int = VSIZE) -> Ext4Builder:
    b = Ext4Builder(image, vsize, FS_UUID)
    b.mkfs()
    for layer in layers:
        layer.meta = b.apply(layer.entries)
    return b


def file_bytes_entries(entries: Sequence[LayerEntry], contents: dict[str, bytes]) -> tuple[list[LayerEntry], bytes]:
    """Give FILE entries made in code a data area holding `contents[path]` (sizes set from it)."""
    area = bytearray()
    out = []
    for e in entries:
        if e.type is EntryType.FILE:
            data = contents.get(e.path, b"")
            e.size = len(data)
            e.data_offset = len(area) if data else -1
            area += data + b"\0" * (-len(data) % BLOCK)
        out.append(e)
    return out, bytes(area)


def assemble(device: Path, layers: Sequence[Layer], vsize: int = VSIZE) -> None:
    """What the pipeline does: per layer, metadata segment, then file bytes at their extents."""
    with open(device, "wb") as f:
        f.truncate(vsize)
        fd = f.fileno()
        for layer in layers:
            assert layer.meta is not None
            for number, content in layer.meta.blocks:
                os.pwrite(fd, content, number * BLOCK)
            for index, extents in layer.meta.file_extents:
                e = layer.entries[index]
                data = layer.data[e.data_offset:e.data_offset + e.size] if e.size else b""
                assert len(data) == e.size
                for ext in extents:
                    chunk = data[ext.lblk * BLOCK:(ext.lblk + ext.length) * BLOCK]
                    os.pwrite(fd, chunk.ljust(ext.length * BLOCK, b"\0"), ext.pblk * BLOCK)


def fsck(image: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)


@contextlib.contextmanager
def mounted(image: Path) -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(prefix="obdconv-ext4-mnt-"))
    subprocess.run(["mount", "-o", "loop,ro", str(image), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-d", str(mnt)], check=True, capture_output=True)
        mnt.rmdir()
