"""`--flatten`: the whole image as ONE native overlaybd layer.

What it holds: the image's final filesystem and nothing else. Each block the filesystem left by
the last layer still uses (`MetadataPass.allocated_blocks`) with the content the layered stack shows
there (the topmost layer mapping it wins); file data a later layer deleted or replaced and
metadata blocks it freed are not allocated any more and are left out, as are the older copies of
blocks a later layer wrote again.

How, without copying a file byte through ext4 or decompressing a source layer twice: prepare (per
layer, in parallel) and the metadata pass (one, in layer order) are the layered output's; only
assemble differs. ONE assemble takes from each layer's prepared data area the ZFile blocks that
hold live file data and reuses them verbatim, as stored:

    LSMT  = header | zero pad to one block | data area: layer 0's kept blocks, then layer 1's, ...
            | the live metadata blocks | index | trailer
    ZFile = header | head block(s) | the kept prepared blocks | fresh tail blocks | jump table

A prepared block holds `block_size` bytes of its layer's data area, where every file starts on a
4 KiB boundary. With 4 KiB blocks (the default) each block is one file's, so it is kept whole or
dropped. With bigger blocks a kept block may also hold 4 KiB pages of dead files: such a block is
decompressed, those pages zeroed and the block compressed again (an obdconv ZFile block, not the
source layer: a few blocks at the edges of dropped runs).

Determinism: the layout depends only on the layers' prepared data areas and metadata (themselves
deterministic), the LSMT uuid is the image's top chain id (no parent).
"""

from __future__ import annotations

import array
import bisect
import heapq
import itertools
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from obdconv.errors import BadInputError, FormatError
from obdconv.formats.lsmt import commit_header, commit_tail
from obdconv.formats.tarwrap import wrap_prefix, wrap_suffix
from obdconv.formats.zfile import BlockCompressor, algorithm_id, decompress_block, zfile_parts
from obdconv.oci.digests import chain_id_to_uuid
from obdconv.pipeline.assemble import BuiltLayer
from obdconv.pipeline.layout import FS_BLOCK, SECTOR, data_area_start
from obdconv.pipeline.mapping import (
    SECTORS_PER_BLOCK,
    Run,
    metadata_runs,
    native_file_runs,
    normalise,
    ordered_metadata_blocks,
    verify_runs,
)
from obdconv.pipeline.metadata import AppliedLayer
from obdconv.pipeline.prepare import PreparedLayer
from obdconv.request import ConversionProfile

Ranges = list[tuple[int, int]]  # (first block, count), sorted, disjoint


# --------------------------------------------------------------------------------------------
# the allocated blocks, on the wire (metadata task -> assemble task)

_RANGES_MAGIC = b"OBDRNG1\0"


def encode_ranges(ranges: Sequence[tuple[int, int]]) -> bytes:
    flat = array.array("Q", itertools.chain.from_iterable(ranges))
    if sys.byteorder != "little":
        flat.byteswap()
    return zstandard.ZstdCompressor(level=3).compress(_RANGES_MAGIC + flat.tobytes())


def decode_ranges(data: bytes) -> Ranges:
    raw = zstandard.ZstdDecompressor().decompress(data)
    if raw[:8] != _RANGES_MAGIC or (len(raw) - 8) % 16:
        raise FormatError("not an encoded block range list")
    flat = array.array("Q")
    flat.frombytes(raw[8:])
    if sys.byteorder != "little":
        flat.byteswap()
    return list(zip(flat[0::2], flat[1::2], strict=True))


# --------------------------------------------------------------------------------------------
# which blocks survive (pure: device blocks in, pieces out)


@dataclass(slots=True)
class LivePieces:
    """What the flattened layer maps. `data`: (first device block, count, layer, first block of
    that layer's data area), sorted by device block. `metadata`: (device block, 4096 bytes), sorted."""

    data: list[tuple[int, int, int, int]] = field(default_factory=list)
    metadata: list[tuple[int, bytes]] = field(default_factory=list)


def _uncovered(start: int, count: int, covered: Ranges, from_index: int) -> tuple[Ranges, int]:
    """Parts of [start, start+count) outside `covered` (sorted, disjoint (start, end) pairs), and
    the index in `covered` to start from for the next (higher) range."""
    end = start + count
    out: Ranges = []
    i = from_index
    while i < len(covered) and covered[i][1] <= start:
        i += 1
    pos = start
    j = i
    while pos < end:
        if j == len(covered) or covered[j][0] >= end:
            out.append((pos, end - pos))
            break
        c_start, c_end = covered[j]
        if c_start > pos:
            out.append((pos, c_start - pos))
        pos = max(pos, c_end)
        j += 1
    return out, i


def _union(covered: Ranges, more: Ranges) -> Ranges:
    """Sorted, coalesced (start, end) pairs covering both lists (each sorted by start)."""
    out: Ranges = []
    for s, e in heapq.merge(covered, more):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _intersect(pieces: list[tuple[int, int, int, int]], allocated: Ranges) -> list[tuple[int, int, int, int]]:
    """`pieces` (sorted by device block) cut to `allocated` ((first, count), sorted)."""
    out = []
    starts = [a for a, _ in allocated]
    for dev, count, layer, src in pieces:
        end = dev + count
        i = max(bisect.bisect_right(starts, dev) - 1, 0)
        while i < len(allocated) and allocated[i][0] < end:
            a_start, a_end = allocated[i][0], allocated[i][0] + allocated[i][1]
            lo, hi = max(dev, a_start), min(end, a_end)
            if lo < hi:
                out.append((lo, hi - lo, layer, src + (lo - dev)))
            i += 1
    return out


def _is_allocated(block: int, starts: list[int], allocated: Ranges) -> bool:
    i = bisect.bisect_right(starts, block) - 1
    return i >= 0 and block < allocated[i][0] + allocated[i][1]


def live_pieces(applied: Sequence[AppliedLayer], allocated: Ranges) -> LivePieces:
    """Top layer wins per device block; then only blocks the final filesystem allocates."""
    covered: Ranges = []  # device blocks mapped by a layer above the one being looked at
    data: list[tuple[int, int, int, int]] = []
    metadata: list[tuple[int, bytes]] = []
    for layer in reversed(range(len(applied))):
        file_runs = native_file_runs(applied[layer].files, data_start=0)  # moffset = data-area sector
        blocks = ordered_metadata_blocks(applied[layer].blocks, exclude=file_runs)
        mine: list[tuple[int, int, int, bytes | None]] = [
            (r.offset // SECTORS_PER_BLOCK, r.length // SECTORS_PER_BLOCK, r.moffset // SECTORS_PER_BLOCK, None)
            for r in file_runs]
        mine += [(pblk, 1, -1, content) for pblk, content in blocks]
        mine.sort(key=lambda m: m[0])
        at = 0
        for dev, count, src, content in mine:
            parts, at = _uncovered(dev, count, covered, at)
            for start, n in parts:
                if content is None:
                    data.append((start, n, layer, src + (start - dev)))
                else:
                    metadata.append((start, content))
        covered = _union(covered, [(dev, dev + count) for dev, count, _, _ in mine])  # `mine` is sorted
    data.sort()
    starts = [a for a, _ in allocated]
    metadata = sorted(m for m in metadata if _is_allocated(m[0], starts, allocated))
    return LivePieces(_intersect(data, allocated), metadata)


# --------------------------------------------------------------------------------------------
# the flattened blob


@dataclass(slots=True)
class _Kept:
    """One layer's kept prepared blocks: merged [first, end) block ranges, and the new index of
    each range's first block in the flattened data area."""

    ranges: list[tuple[int, int]]
    firsts: list[int]
    starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.starts = [s for s, _ in self.ranges]

    def new_index(self, block: int) -> int:
        i = bisect.bisect_right(self.starts, block) - 1
        return self.firsts[i] + block - self.ranges[i][0]


def _kept_blocks(data: list[tuple[int, int, int, int]], layers: int, pages_per_block: int
                 ) -> tuple[list[list[tuple[int, int]]], dict[tuple[int, int], list[tuple[int, int]]]]:
    """Per layer, the prepared blocks live data needs (merged [first, end) ranges), and the blocks
    only partly live: (layer, block) -> the live [first, end) pages in it."""
    pages: list[list[tuple[int, int]]] = [[] for _ in range(layers)]
    for _, count, layer, src in data:
        pages[layer].append((src, src + count))
    kept: list[list[tuple[int, int]]] = []
    partial: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for layer in range(layers):
        merged = _union([], sorted(pages[layer]))
        blocks: list[tuple[int, int]] = []
        for first, end in merged:
            b_first, b_end = first // pages_per_block, -(-end // pages_per_block)
            blocks.append((b_first, b_end))
            for b in {b_first, b_end - 1}:
                lo, hi = max(first, b * pages_per_block), min(end, (b + 1) * pages_per_block)
                if hi - lo < pages_per_block:
                    partial.setdefault((layer, b), []).append((lo - b * pages_per_block, hi - b * pages_per_block))
        kept.append(_union([], sorted(blocks)))
    # a block shared by two live page runs may be whole after all
    for key, spans in list(partial.items()):
        if _union([], sorted(spans)) == [(0, pages_per_block)]:
            del partial[key]
    return kept, partial


@dataclass(slots=True)
class FlatBlob:
    """The flattened layer's blob, as `BuiltLayer` files: head, body ranges, tail."""

    head: bytes
    body_ranges: list[list[object]]  # [path, offset, length]
    patches: bytes  # re-compressed partly live blocks, referenced by body ranges of `patch_path`
    tail: bytes
    size: int


def plan_flat_blob(prepared: Sequence[PreparedLayer], applied: Sequence[AppliedLayer], allocated: Ranges,
                   profile: ConversionProfile, chain_id: str, patch_path: str) -> FlatBlob:
    """Everything of the flattened blob but the kept prepared blocks themselves (referenced by
    ranges of the layers' `blocks.bin`; partly live ones rewritten into `patch_path`)."""
    if len(prepared) != len(applied) or not prepared:
        raise BadInputError(f"flatten: {len(prepared)} prepared layers for {len(applied)} metadata results")
    bs = profile.block_size
    for p in prepared:
        if not p.native:
            raise BadInputError(f"layer {p.source_digest} was prepared without a data area")
        if p.algorithm != profile.algorithm or p.block_size != bs:
            raise BadInputError(f"layer {p.source_digest} was prepared for {p.algorithm}/{p.block_size}, "
                                f"profile wants {profile.algorithm}/{bs}")
    per = bs // FS_BLOCK
    live = live_pieces(applied, allocated)
    kept_ranges, partial = _kept_blocks(live.data, len(prepared), per)
    kept: list[_Kept] = []
    total = 0
    for ranges in kept_ranges:
        firsts = []
        for first, end in ranges:
            firsts.append(total)
            total += end - first
        kept.append(_Kept(ranges, firsts))
    data_start = data_area_start(bs)
    vsize = profile.vsize_gb << 30
    runs = []
    for dev, count, layer, src in live.data:
        block, within = divmod(src * FS_BLOCK, bs)
        moffset = data_start + kept[layer].new_index(block) * bs + within
        runs.append(_run(dev, count, moffset))
    metadata_start = data_start + total * bs
    runs += metadata_runs(live.metadata, metadata_start)
    index_offset = metadata_start + FS_BLOCK * len(live.metadata)
    runs = normalise(runs)
    verify_runs(runs, local_lo=data_start // SECTOR, local_hi=index_offset // SECTOR, virtual_size=vsize)
    uuid = chain_id_to_uuid(chain_id).upper() if chain_id else None
    header = commit_header(vsize, uuid, None)
    tail = commit_tail(runs, index_offset, vsize, uuid, None)
    compressor = BlockCompressor(profile.algorithm, bs)
    head_blocks = compressor.compress(header + bytes(data_start - len(header)))
    tail_blocks = compressor.compress(b"".join(content for _, content in live.metadata) + tail)
    body_ranges, body_lengths, patches = _body(prepared, kept, partial, per, compressor, patch_path)
    lengths = [len(b) for b in head_blocks] + body_lengths + [len(b) for b in tail_blocks]
    lsmt_size = index_offset + len(tail)
    zheader, ztail = zfile_parts(lengths, lsmt_size, profile.algorithm, bs)
    zfile_size = len(zheader) + sum(lengths) + len(ztail)
    head = wrap_prefix(zfile_size) + zheader + b"".join(head_blocks)
    tail_bytes = b"".join(tail_blocks) + ztail + wrap_suffix(zfile_size)
    size = len(head) + sum(r[2] for r in body_ranges) + len(tail_bytes)  # type: ignore[misc]
    return FlatBlob(head, body_ranges, patches, tail_bytes, size)


def _run(dev_block: int, count: int, moffset: int) -> Run:
    return Run(dev_block * SECTORS_PER_BLOCK, count * SECTORS_PER_BLOCK, moffset // SECTOR)


def _body(prepared: Sequence[PreparedLayer], kept: Sequence[_Kept], partial: dict[tuple[int, int], list[tuple[int, int]]],
          per: int, compressor: BlockCompressor, patch_path: str) -> tuple[list[list[object]], list[int], bytes]:
    """Body ranges (kept blocks of each layer's blocks.bin, partly live ones from the patch file),
    the stored length of every body block, and the patch file's bytes."""
    ranges: list[list[object]] = []
    lengths: list[int] = []
    patches = bytearray()
    algo = algorithm_id(prepared[0].algorithm)
    for layer, (p, k) in enumerate(zip(prepared, kept, strict=True)):
        if not k.ranges:
            continue
        stored = p.block_lengths()
        offsets = list(itertools.accumulate(stored, initial=p.blocks_offset))  # in the file (inplace.py)
        blocks_path = str(p.blocks_path)
        if offsets[-1] - p.blocks_offset != p.compressed_size or offsets[-1] > os.path.getsize(blocks_path):
            raise BadInputError(f"layer {p.source_digest}: prepared blocks are {os.path.getsize(blocks_path)} "
                                f"bytes from byte {p.blocks_offset} (prepare wrote {p.compressed_size}), "
                                f"their lengths add up to {offsets[-1] - p.blocks_offset}")
        with open(blocks_path, "rb") as f:
            for first, end in k.ranges:
                if end > len(stored):
                    raise BadInputError(f"layer {p.source_digest}: live data in block {end - 1} of a "
                                        f"{len(stored)}-block data area")
                run_start = first
                for b in range(first, end):
                    spans = partial.get((layer, b))
                    if spans is None:
                        continue
                    if run_start < b:
                        ranges.append([blocks_path, offsets[run_start], offsets[b] - offsets[run_start]])
                        lengths += stored[run_start:b]
                    f.seek(offsets[b])
                    raw = bytearray(decompress_block(algo, f.read(stored[b]), p.block_size,
                                                     what=f"layer {p.source_digest} data block {b}"))
                    live = bytearray(len(raw))
                    for lo, hi in spans:  # dead pages stay zero
                        live[lo * FS_BLOCK:hi * FS_BLOCK] = raw[lo * FS_BLOCK:hi * FS_BLOCK]
                    (block,) = compressor.compress(bytes(live))
                    ranges.append([patch_path, len(patches), len(block)])
                    patches += block
                    lengths.append(len(block))
                    run_start = b + 1
                if run_start < end:
                    ranges.append([blocks_path, offsets[run_start], offsets[end] - offsets[run_start]])
                    lengths += stored[run_start:end]
    return _coalesce(ranges), lengths, bytes(patches)


def _coalesce(ranges: list[list[object]]) -> list[list[object]]:
    out: list[list[object]] = []
    for path, offset, length in ranges:
        if out and out[-1][0] == path and out[-1][1] + out[-1][2] == offset:  # type: ignore[operator]
            out[-1][2] += length  # type: ignore[operator]
        else:
            out.append([path, offset, length])
    return out


def build_flat_layer(prepared: Sequence[PreparedLayer], applied: Sequence[AppliedLayer], allocated: Ranges,
                     profile: ConversionProfile, chain_id: str, out_dir: str | os.PathLike[str]) -> BuiltLayer:
    """`assemble.build_layer` for the flattened layer: its own bytes to `<out_dir>/flat-<chain id>.*`
    files, the kept prepared blocks streamed from the layers' spools at upload."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"flat-{chain_id.partition(':')[2] or 'image'}"
    patch = Path(f"{stem}.patch")
    blob = plan_flat_blob(prepared, applied, allocated, profile, chain_id, str(patch))
    head, tail = Path(f"{stem}.head"), Path(f"{stem}.tail")
    head.write_bytes(blob.head)
    tail.write_bytes(blob.tail)
    patch.write_bytes(blob.patches)
    return BuiltLayer("native", str(head), "", str(tail), blob.size, "", "", 0, "", blob.body_ranges)
