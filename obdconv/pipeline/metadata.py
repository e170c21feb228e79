"""Stage 2, metadata: apply every layer's entry list to ext4, in layer order, in one process.

One pass serves both output formats: the ext4 metadata of a layer does not depend on where its
file bytes live (native data area or turboOCI source tar), only on the entries and the parents.
The filesystem UUID is derived from the chain id of layer 0, so the same image gives the same
bytes on any machine.

When dedup finds layers 0..k-1 already converted, `parents` is a reader over those converted
layers (anything with `pread(offset, length)` and `extents()`, e.g. `formats.lsmt.LSMTStack` of
their blobs) and only layers k.. are applied on top.

`encode_metadata`/`decode_metadata` give a compact, deterministic byte form of a
`LayerMetadata` for moving it between processes or machines (zstd-compressed, no pickle).
"""

from __future__ import annotations

import contextlib
import os
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zstandard

from obdconv.errors import BadInputError, FormatError
from obdconv.ext4 import Ext4Builder, Extent, LayerMetadata
from obdconv.oci.digests import chain_id_to_uuid
from obdconv.pipeline.layout import FS_BLOCK
from obdconv.pipeline.prepare import PreparedLayer

METADATA_IMAGE = "metadata.img"
_MAGIC = b"OBDMETA1"
_COUNTS = struct.Struct("<QQ")
_BLOCK = struct.Struct("<Q")
_FILE = struct.Struct("<QI")
_EXTENT = struct.Struct("<QQI")


def fs_uuid_for(chain_id: str) -> uuid.UUID:
    """The ext4 UUID of an image: its layer-0 chain id formatted as a UUID (deterministic)."""
    return uuid.UUID(chain_id_to_uuid(chain_id))


class MetadataPass:
    """The metadata pass one layer at a time (so a runner can apply layer i while later layers are
    still being prepared): mkfs (or the parents) on construction, then `apply` in layer order.
    `close()` removes the scratch metadata image unless `keep_image`."""

    def __init__(self, vsize_gb: int, chain_ids: Sequence[str], workdir: str | os.PathLike[str],
                 parents: Any = None, *, keep_image: bool = False) -> None:
        if not chain_ids:
            raise BadInputError("the metadata pass needs the image's chain ids")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.image = workdir / METADATA_IMAGE
        self.keep_image = keep_image
        with contextlib.suppress(FileNotFoundError):
            self.image.unlink()
        self.builder = Ext4Builder(self.image, vsize_gb << 30, fs_uuid_for(chain_ids[0]))
        try:
            if parents is None:
                self.builder.mkfs()
            else:
                self.builder.load_parents(parents)
        except BaseException:
            self.close()
            raise

    def apply(self, prepared: PreparedLayer) -> LayerMetadata:
        return self.builder.apply(prepared.load_entries())

    def close(self) -> None:
        if not self.keep_image:
            with contextlib.suppress(FileNotFoundError):
                self.image.unlink()

    def __enter__(self) -> MetadataPass:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_metadata(
    prepared_layers: Sequence[PreparedLayer],
    vsize_gb: int,
    chain_ids: Sequence[str],
    workdir: str | os.PathLike[str],
    parents: Any = None,
    *,
    keep_image: bool = False,
) -> list[LayerMetadata]:
    """The `LayerMetadata` of each prepared layer, applied in order.

    `chain_ids` are the image's source chain ids from layer 0 (for the fs UUID); without
    `parents` the prepared layers start at layer 0 (mkfs first), with `parents` they continue
    the converted stack it reads. The scratch metadata image in `workdir` is removed afterwards
    unless `keep_image`."""
    if not prepared_layers:
        return []
    with MetadataPass(vsize_gb, chain_ids, workdir, parents, keep_image=keep_image) as metadata_pass:
        return [metadata_pass.apply(p) for p in prepared_layers]


def encode_metadata(m: LayerMetadata) -> bytes:
    parts = [_MAGIC, _COUNTS.pack(len(m.blocks), len(m.file_extents))]
    for pblk, data in m.blocks:
        if len(data) != FS_BLOCK:
            raise FormatError(f"metadata block {pblk}: {len(data)} bytes")
        parts.append(_BLOCK.pack(pblk))
        parts.append(bytes(data))
    for index, extents in m.file_extents:
        parts.append(_FILE.pack(index, len(extents)))
        parts.extend(_EXTENT.pack(e.lblk, e.pblk, e.length) for e in extents)
    return zstandard.ZstdCompressor(level=3).compress(b"".join(parts))


def decode_metadata(data: bytes) -> LayerMetadata:
    raw = memoryview(zstandard.ZstdDecompressor().decompress(data))
    if bytes(raw[:8]) != _MAGIC:
        raise FormatError("not an encoded LayerMetadata")
    pos = 8
    nblocks, nfiles = _COUNTS.unpack_from(raw, pos)
    pos += _COUNTS.size
    blocks = []
    for _ in range(nblocks):
        (pblk,) = _BLOCK.unpack_from(raw, pos)
        pos += _BLOCK.size
        blocks.append((pblk, bytes(raw[pos:pos + FS_BLOCK])))
        pos += FS_BLOCK
    files = []
    for _ in range(nfiles):
        index, n = _FILE.unpack_from(raw, pos)
        pos += _FILE.size
        extents = []
        for _ in range(n):
            lblk, pblk, length = _EXTENT.unpack_from(raw, pos)
            pos += _EXTENT.size
            extents.append(Extent(lblk, pblk, length))
        files.append((index, extents))
    return LayerMetadata(blocks, files)
