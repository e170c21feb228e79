"""Open a layer blob as the runtime does (spec §2.4): optional tar wrapper -> optional ZFile -> LSMT."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

from obdconv.formats import tarwrap
from obdconv.formats.lsmt import LSMTFile
from obdconv.formats.source import RandomAccess, WindowSource, as_source, source_size
from obdconv.formats.zfile import ZFileReader, is_zfile

BlobInput = RandomAccess | BinaryIO | bytes | str | os.PathLike[str]


@dataclass
class LayerPayload:
    """What `open_payload` found: the LSMT bytes as a source, and the wrappers around them."""

    source: RandomAccess
    size: int
    tar: tuple[int, int] | None  # (payload offset, payload size) of the tar wrapper
    zfile: ZFileReader | None


def open_payload(f: BlobInput) -> LayerPayload:
    """Peel the tar wrapper and the ZFile (each only if present) off a layer blob."""
    src = as_source(f)
    size = source_size(src)
    tar = tarwrap.unwrap(src)
    if tar is not None:
        src = WindowSource(src, tar[0], min(tar[1], size - tar[0]))
        size = src.size
    zf: ZFileReader | None = None
    if is_zfile(src.pread(0, 24)):
        zf = ZFileReader(src, size)
        src, size = zf, zf.size
    return LayerPayload(src, size, tar, zf)


def open_layer_blob(f: BlobInput, target: BlobInput | None = None, warp: bool = False) -> LSMTFile:
    """An overlaybd layer blob (or a bare ZFile / LSMT) as an `LSMTFile`. `target` makes it a warp
    (turboOCI fs.meta) file whose tag-1 entries read from the original layer tar."""
    payload = open_payload(f)
    return LSMTFile.open(payload.source, target, payload.size, warp=warp)  # type: ignore[arg-type]
