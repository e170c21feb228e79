"""Stage 2, metadata: apply every layer's entry list to ext4, in layer order, in one process.

One pass serves both output formats: the ext4 metadata of a layer does not depend on where its
file bytes live (native data area or turboOCI source tar), only on the entries and the parents.
The filesystem UUID is derived from the chain id of layer 0, so the same image gives the same
bytes on any machine.

When dedup finds layers 0..k-1 already converted, `parents` is a reader over those converted
layers (anything with `pread(offset, length)` and `extents()`, e.g. `formats.lsmt.LSMTStack` of
their blobs) and only layers k.. are applied on top.

A layer's result is an `AppliedLayer`: its metadata blocks and, per file, where the file's bytes
are and its extents, so assemble (in another process or on another machine) needs nothing else.
`encode_metadata`/`decode_metadata` give it a compact, deterministic byte form for moving it between
processes or machines (zstd-compressed, no pickle).
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import struct
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import Any, NamedTuple

import zstandard

from obdconv.entries import LayerEntry
from obdconv.errors import BadInputError, FormatError
from obdconv.ext4 import Ext4Builder, Extent, LayerMetadata
from obdconv.ext4.usage import allocated_ranges
from obdconv.faithful import out_of_range_times
from obdconv.gcpause import gc_paused
from obdconv.oci.digests import chain_id_to_uuid
from obdconv.pipeline.layout import FS_BLOCK
from obdconv.pipeline.prepare import PreparedLayer

log = logging.getLogger(__name__)

METADATA_IMAGE = "metadata.img"
_MAGIC = b"OBDMETA2"
_COUNTS = struct.Struct("<QQQQ")  # blocks, files, extents, bytes of the joined paths


class FilePlacement(NamedTuple):
    """Where a regular file's bytes are, taken from its `LayerEntry`: all assemble needs of it
    besides its extents (`path` only names the file in errors)."""

    path: str
    size: int
    data_offset: int  # in the native data area; -1 when it has no bytes there
    tar_offset: int  # in the uncompressed source tar (turboOCI)

    @classmethod
    def of(cls, entry: LayerEntry) -> FilePlacement:
        return cls(entry.path, entry.size, entry.data_offset, entry.tar_offset)


@dataclass(slots=True)
class AppliedLayer:
    """One layer's metadata pass result, self-contained for assemble (which never loads the entry
    list): the layer's ext4 metadata blocks (4 KiB block number, bytes), and for every regular file
    created in this layer and still live at its end, where its bytes are and the extents they fill."""

    blocks: list[tuple[int, bytes]] = field(default_factory=list)
    files: list[tuple[FilePlacement, list[Extent]]] = field(default_factory=list)

    @classmethod
    def of(cls, entries: Sequence[LayerEntry], metadata: LayerMetadata) -> AppliedLayer:
        return cls(metadata.blocks, [(FilePlacement.of(entries[i]), exts) for i, exts in metadata.file_extents])


def warn_out_of_range_times(layer_digest: str, entries: Sequence[LayerEntry]) -> None:
    """One warning per layer whose entries carry times ext4 cannot store (they are clamped: a
    documented difference, `faithful.MTIME_CLAMPED`), naming one path and the count."""
    count, first = out_of_range_times(entries)
    if count:
        log.warning("layer %s: %d entr%s with a time outside ext4's range (1901-12-13 .. 2446-05-10), "
                    "e.g. %r: clamped to the nearest end", layer_digest, count, "y" if count == 1 else "ies",
                    first)


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
        self.busy_seconds = 0.0
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

    def apply(self, prepared: PreparedLayer) -> AppliedLayer:
        # Loading a big entry list and building its placements allocate ~10 objects per entry and
        # make no cycles: the cyclic GC would rescan the growing heap again and again (a third of
        # this pass on the benchmark image). Paused as `Ext4Builder.apply` pauses it.
        # One part, all the layer: whether its paths need tracking is known (opaque markers only).
        with gc_paused():
            return self.apply_parts([prepared.load_entries()], prepared.source_digest, track_touched=None)

    def apply_parts(self, parts: Iterable[Sequence[LayerEntry]], layer_digest: str = "", *,
                    track_touched: bool | None = True) -> AppliedLayer:
        """`apply` of layer `layer_digest` whose entries come in parts, each applied as it comes
        (e.g. `entrystream.streamed_entries`, while the layer is still being prepared): the same
        result. `busy_seconds` grows by the time spent applying, not waiting for parts.
        `track_touched`: as `Ext4Builder.begin_layer`."""
        with gc_paused():
            session = self.builder.begin_layer(track_touched=track_touched)
            try:
                for part in parts:
                    t = time.monotonic()
                    session.add(part)
                    self.busy_seconds += time.monotonic() - t
                t = time.monotonic()
                warn_out_of_range_times(layer_digest, session.entries)
                metadata = session.finish()
                applied = AppliedLayer.of(session.entries, metadata)
                self.busy_seconds += time.monotonic() - t
                return applied
            except BaseException:
                session.abort()
                raise

    def allocated_blocks(self) -> list[tuple[int, int]]:
        """(first block, count) of every run of blocks in use in the filesystem as the layers
        applied so far leave it (what `--flatten` keeps)."""
        return allocated_ranges(self.image)

    def close(self) -> None:
        self.builder.close()
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
) -> list[AppliedLayer]:
    """The `AppliedLayer` of each prepared layer, applied in order.

    `chain_ids` are the image's source chain ids from layer 0 (for the fs UUID); without
    `parents` the prepared layers start at layer 0 (mkfs first), with `parents` they continue
    the converted stack it reads. The scratch metadata image in `workdir` is removed afterwards
    unless `keep_image`."""
    if not prepared_layers:
        return []
    with MetadataPass(vsize_gb, chain_ids, workdir, parents, keep_image=keep_image) as metadata_pass:
        return [metadata_pass.apply(p) for p in prepared_layers]


def _array(typecode: str, raw: memoryview, pos: int, count: int) -> tuple[array.array, int]:
    """`count` little-endian items of `typecode` at `pos` of `raw`, and the position after them."""
    a = array.array(typecode)
    end = pos + count * a.itemsize
    a.frombytes(raw[pos:end])
    if sys.byteorder != "little":
        a.byteswap()
    return a, end


def _little(a: array.array) -> bytes:
    if sys.byteorder != "little":
        a = array.array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


def encode_metadata(m: AppliedLayer) -> bytes:
    """Column-wise (one array per field), so decoding is a few `array.frombytes` calls, not a
    Python loop over every file and extent."""
    for pblk, data in m.blocks:
        if len(data) != FS_BLOCK:
            raise FormatError(f"metadata block {pblk}: {len(data)} bytes")
    places = [p for p, _ in m.files]
    extents = [x for _, exts in m.files for e in exts for x in e]
    paths = "\0".join(p.path for p in places).encode("utf-8", "surrogateescape")
    parts = [
        _MAGIC, _COUNTS.pack(len(m.blocks), len(m.files), len(extents) // 3, len(paths)),
        _little(array.array("Q", [pblk for pblk, _ in m.blocks])), *(bytes(d) for _, d in m.blocks),
        _little(array.array("q", [p.size for p in places])),
        _little(array.array("q", [p.data_offset for p in places])),
        _little(array.array("q", [p.tar_offset for p in places])),
        _little(array.array("I", [len(exts) for _, exts in m.files])),
        _little(array.array("Q", extents)), paths,
    ]
    return zstandard.ZstdCompressor(level=3).compress(b"".join(parts))


def decode_metadata(data: bytes) -> AppliedLayer:
    raw = memoryview(zstandard.ZstdDecompressor().decompress(data))
    if len(raw) < 8 + _COUNTS.size or bytes(raw[:8]) != _MAGIC:
        raise FormatError("not an encoded AppliedLayer (or one of an older obdconv)")
    nblocks, nfiles, nextents, paths_size = _COUNTS.unpack_from(raw, 8)
    pos = 8 + _COUNTS.size
    if len(raw) != pos + nblocks * (8 + FS_BLOCK) + nfiles * (3 * 8 + 4) + nextents * 3 * 8 + paths_size:
        raise FormatError("encoded AppliedLayer is inconsistent (truncated or corrupt)")
    numbers, pos = _array("Q", raw, pos, nblocks)
    blocks = [(pblk, bytes(raw[pos + i * FS_BLOCK:pos + (i + 1) * FS_BLOCK])) for i, pblk in enumerate(numbers)]
    pos += nblocks * FS_BLOCK
    sizes, pos = _array("q", raw, pos, nfiles)
    data_offsets, pos = _array("q", raw, pos, nfiles)
    tar_offsets, pos = _array("q", raw, pos, nfiles)
    counts, pos = _array("I", raw, pos, nfiles)
    flat, pos = _array("Q", raw, pos, nextents * 3)
    paths = bytes(raw[pos:pos + paths_size]).decode("utf-8", "surrogateescape").split("\0") if nfiles else []
    if len(paths) != nfiles or sum(counts) != nextents:
        raise FormatError("encoded AppliedLayer is inconsistent (truncated or corrupt)")
    # tuple.__new__ straight from the zipped tuples: NamedTuple._make's Python frame per item was
    # half of this function (a big layer has ~70k files and ~130k extents).
    triples = list(map(partial(tuple.__new__, Extent), zip(flat[0::3], flat[1::3], flat[2::3], strict=True)))
    places = map(partial(tuple.__new__, FilePlacement), zip(paths, sizes, data_offsets, tar_offsets, strict=True))
    ends = list(accumulate(counts))
    starts = [0, *ends[:-1]]
    files = list(zip(places, map(triples.__getitem__, map(slice, starts, ends)), strict=True))
    return AppliedLayer(blocks, files)
