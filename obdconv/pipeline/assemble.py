"""Stage 3, assemble: one converted layer blob from its prepared spool and its ext4 metadata.

Native blob = tar wrapper( ZFile( LSMT ) ), streamed straight into `target_repo.upload_blob`:

    LSMT  = commit header | zero pad to one block | prepared data area | metadata blocks
            | index (metadata blocks -> themselves, file extents -> data area) | trailer
    ZFile = header | block(header region) | prepared blocks, verbatim | fresh blocks of the
            metadata/index/trailer region | jump table + trailer

Sizes are known before the first byte is sent (the prepared blocks' lengths are in the spool, the
rest is small), so the ZFile header with the final index fields goes first and nothing is
buffered whole. LSMT uuid / parent uuid are the chain ids formatted as UUIDs, uppercase, like the
reference (`overlaybd-commit --uuid`).

TurboOCI blob = `turboOCIv1.tar.gz` holding `ext4.fs.meta` (a ZFile of a warp LSMT: metadata
blocks as tag-0 data, file extents as tag-1 entries into the uncompressed source tar, index not
padded), an empty `.turbo.ociv1` and, for gzip sources, `gzip.meta`. Deterministic: tar entries
carry no mtime/uid/gid/names, gzip mtime is 0. Its diff_id is the sha256 of the tar.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from obdconv.errors import BadInputError
from obdconv.formats.lsmt import SegmentMapping, commit_header, commit_tail
from obdconv.formats.tarwrap import wrap_prefix, wrap_suffix
from obdconv.formats.zfile import BlockCompressor, compress_zfile, zfile_parts
from obdconv.oci import mediatypes
from obdconv.oci.digests import chain_id_to_uuid
from obdconv.pipeline.annotations import descriptor, layer_annotations, layer_media_type
from obdconv.pipeline.layout import (
    FS_BLOCK,
    LSMT_HEADER_SIZE,
    SECTOR,
    NativeLayout,
    data_area_start,
    round_up,
)
from obdconv.pipeline.mapping import Run, native_runs, turbo_runs, verify_runs
from obdconv.pipeline.prepare import PreparedLayer
from obdconv.pipeline.request import ConversionProfile

log = logging.getLogger(__name__)

STREAM_CHUNK = 1 << 20
TURBO_ARCHIVE_NAME = "turboOCIv1.tar.gz"
TURBO_MARKER = ".turbo.ociv1"
GZIP_META_NAME = "gzip.meta"
# gzip level of turboOCIv1.tar.gz. The reference uses Go's default (6), but the archive is mostly
# already-compressed bytes (LZ4 blocks of fs.meta, zlib windows of gzip.meta): level 1 takes half
# the time for ~3 % more bytes. Any level reads the same; the output stays deterministic.
TURBO_GZIP_LEVEL = 1


@dataclass(slots=True)
class ConvertedLayer:
    """One converted layer blob: what the manifest lists for it."""

    digest: str
    size: int
    media_type: str
    diff_id: str
    annotations: dict[str, str] = field(default_factory=dict)

    def descriptor(self) -> dict[str, Any]:
        return descriptor(self.media_type, self.digest, self.size, self.annotations)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConvertedLayer:
        return cls(**d)


def fs_meta_name(fstype: str) -> str:
    return f"{fstype or 'ext4'}.fs.meta"


def _to_mappings(runs: Iterable[Run]) -> list[SegmentMapping]:
    return [SegmentMapping(r.offset, r.length, r.moffset, r.zeroed, r.tag) for r in runs]


def _uuid(chain_id: str) -> str | None:
    return chain_id_to_uuid(chain_id).upper() if chain_id else None


class _Hashing:
    """Pass chunks through while computing their sha256 and size (for --no-upload)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = chunks
        self.hash = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for c in self.chunks:
            self.hash.update(c)
            self.size += len(c)
            yield c

    def drain(self) -> tuple[str, int]:
        for _ in self:
            pass
        return "sha256:" + self.hash.hexdigest(), self.size


def _store(target_repo: Any, chunks: Iterable[bytes], upload: bool) -> tuple[str, int]:
    if upload:
        return target_repo.upload_blob(chunks)
    return _Hashing(chunks).drain()


# --------------------------------------------------------------------------------------------
# native


@dataclass(slots=True)
class NativeBlobPlan:
    """Everything about a native blob except the prepared blocks themselves."""

    zheader: bytes
    head_blocks: list[bytes]
    tail_blocks: list[bytes]
    ztail: bytes
    zfile_size: int
    lsmt_size: int
    mappings: list[SegmentMapping]


def plan_native_blob(prepared: PreparedLayer, metadata: Any, profile: ConversionProfile, chain_id: str,
                     parent_chain_id: str) -> NativeBlobPlan:
    if not prepared.native:
        raise BadInputError(f"layer {prepared.source_digest} was prepared without a data area")
    if prepared.algorithm != profile.algorithm or prepared.block_size != profile.block_size:
        raise BadInputError(f"layer {prepared.source_digest} was prepared for "
                            f"{prepared.algorithm}/{prepared.block_size}, profile wants "
                            f"{profile.algorithm}/{profile.block_size}")
    bs = prepared.block_size
    vsize = profile.vsize_gb << 30
    entries = prepared.load_entries()
    data_start = data_area_start(bs)
    ordered, runs = native_runs(entries, metadata.blocks, metadata.file_extents,
                                data_start=data_start, data_area_size=prepared.data_area_size)
    layout = NativeLayout(bs, prepared.data_area_size, len(ordered))
    verify_runs(runs, local_lo=data_start // SECTOR, local_hi=layout.index_offset // SECTOR, virtual_size=vsize)
    mappings = _to_mappings(runs)
    uuid, parent_uuid = _uuid(chain_id), _uuid(parent_chain_id)
    header = commit_header(vsize, uuid, parent_uuid)
    head_region = header + bytes(data_start - len(header))
    tail = commit_tail(mappings, layout.index_offset, vsize, uuid, parent_uuid)
    tail_region = b"".join(data for _, data in ordered) + tail
    lsmt_size = layout.index_offset + len(tail)
    compressor = BlockCompressor(profile.algorithm, bs)
    head_blocks = compressor.compress(head_region)
    tail_blocks = compressor.compress(tail_region)
    lengths = [len(b) for b in head_blocks] + prepared.block_lengths() + [len(b) for b in tail_blocks]
    zheader, ztail = zfile_parts(lengths, lsmt_size, profile.algorithm, bs)
    zfile_size = len(zheader) + sum(lengths) + len(ztail)
    return NativeBlobPlan(zheader, head_blocks, tail_blocks, ztail, zfile_size, lsmt_size, mappings)


def native_blob_chunks(prepared: PreparedLayer, plan: NativeBlobPlan) -> Iterator[bytes]:
    """The blob's bytes in order: tar prefix, ZFile (prepared blocks streamed from the spool), suffix."""
    yield wrap_prefix(plan.zfile_size) + plan.zheader + b"".join(plan.head_blocks)
    with open(prepared.blocks_path, "rb") as f:
        while chunk := f.read(STREAM_CHUNK):
            yield chunk
    yield b"".join(plan.tail_blocks) + plan.ztail + wrap_suffix(plan.zfile_size)


def assemble_native(prepared: PreparedLayer, metadata: Any, profile: ConversionProfile, chain_id: str,
                    parent_chain_id: str, target_repo: Any, upload: bool = True, *, oci: bool = False) -> ConvertedLayer:
    plan = plan_native_blob(prepared, metadata, profile, chain_id, parent_chain_id)
    digest, size = _store(target_repo, native_blob_chunks(prepared, plan), upload)
    expected = len(wrap_prefix(plan.zfile_size)) + plan.zfile_size + len(wrap_suffix(plan.zfile_size))
    if size != expected:
        raise BadInputError(f"layer {prepared.source_digest}: wrote {size} bytes, planned {expected}")
    # The blob is an uncompressed tar, so its digest is also its diff_id.
    return ConvertedLayer(digest, size, layer_media_type("native", oci), digest,
                          layer_annotations("native", digest, size))


# --------------------------------------------------------------------------------------------
# turbo


def build_fs_meta(prepared: PreparedLayer, metadata: Any, profile: ConversionProfile) -> bytes:
    """ZFile(warp LSMT) of this layer's ext4 metadata, file data pointing into the source tar."""
    vsize = profile.vsize_gb << 30
    entries = prepared.load_entries()
    ordered, runs = turbo_runs(entries, metadata.blocks, metadata.file_extents, metadata_start=LSMT_HEADER_SIZE)
    index_offset = LSMT_HEADER_SIZE + FS_BLOCK * len(ordered)
    verify_runs(runs, local_lo=LSMT_HEADER_SIZE // SECTOR, local_hi=index_offset // SECTOR, virtual_size=vsize)
    tar_sectors = round_up(prepared.tar_size, SECTOR) // SECTOR
    for r in runs:
        if r.tag and r.mend > tar_sectors:
            raise BadInputError(f"layer {prepared.source_digest}: extent reads tar sectors up to {r.mend}, "
                                f"tar has {tar_sectors}")
    # The reference commits turbo fs.meta without --uuid: zero uuids (spec reference §3.6).
    lsmt = b"".join([
        commit_header(vsize, None, None),
        *(data for _, data in ordered),
        commit_tail(_to_mappings(runs), index_offset, vsize, None, None, pad_index=False),
    ])
    return compress_zfile(lsmt, profile.algorithm, profile.block_size)


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def turbo_archive(fs_meta_file: str, fs_meta: bytes, gzip_meta: bytes | None) -> tuple[bytes, bytes]:
    """(tar, gzip of it) of the turbo layer, in the reference's member order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(*_tar_member(fs_meta_file, fs_meta))
        tar.addfile(*_tar_member(TURBO_MARKER, b""))
        if gzip_meta is not None:
            tar.addfile(*_tar_member(GZIP_META_NAME, gzip_meta))
    raw = buf.getvalue()
    return raw, gzip.compress(raw, compresslevel=TURBO_GZIP_LEVEL, mtime=0)


def ensure_target_blob(target_repo: Any, source_repo: Any, prepared: PreparedLayer) -> None:
    """A turbo layer reads file data from the ORIGINAL blob, so it must exist in the output
    repository: mount it (same registry) or copy it when writing elsewhere."""
    digest = prepared.source_digest
    if source_repo is None or source_repo is target_repo or target_repo.head_blob(digest) is not None:
        return
    same_host = getattr(source_repo, "host", None) == getattr(target_repo, "host", None) and source_repo.host
    if same_host and target_repo.mount_blob(digest, source_repo.name):
        return
    with source_repo.open_blob(digest) as f:
        target_repo.push_blob(f, digest, prepared.source_size)


def assemble_turbo(prepared: PreparedLayer, metadata: Any, profile: ConversionProfile, target_repo: Any,
                   upload: bool = True, *, oci: bool = False, source_repo: Any = None) -> ConvertedLayer:
    if not prepared.turbo:
        raise BadInputError(f"layer {prepared.source_digest} was prepared without turbo data")
    fs_meta = build_fs_meta(prepared, metadata, profile)
    gzip_meta_path = prepared.gzip_meta_path
    gzip_meta = gzip_meta_path.read_bytes() if gzip_meta_path is not None else None
    tar, blob = turbo_archive(fs_meta_name(profile.fstype), fs_meta, gzip_meta)
    if upload:
        ensure_target_blob(target_repo, source_repo, prepared)
    digest, size = _store(target_repo, [blob], upload)
    target_type = mediatypes.turbo_target_media_type(prepared.source_media_type, prepared.compression == "gzip")
    annotations = layer_annotations("turbo", digest, size, target_digest=prepared.source_digest,
                                    target_media_type=target_type)
    return ConvertedLayer(digest, size, layer_media_type("turbo", oci), "sha256:" + hashlib.sha256(tar).hexdigest(),
                          annotations)


def assemble_layer(prepared: PreparedLayer, metadata: Any, profile: ConversionProfile, chain_id: str,
                   parent_chain_id: str, target_repo: Any, upload: bool = True, *, oci: bool = False,
                   source_repo: Any = None) -> ConvertedLayer:
    """Assemble and (unless `upload` is False) upload one layer in `profile.format`.

    `chain_id`/`parent_chain_id` are the SOURCE chain ids of this layer and the one below ("" for
    layer 0); only native uses them. `source_repo` is where the source blob lives (turbo copies
    or mounts it into `target_repo` when they differ)."""
    if profile.format == "native":
        return assemble_native(prepared, metadata, profile, chain_id, parent_chain_id, target_repo, upload, oci=oci)
    if profile.format == "turbo":
        return assemble_turbo(prepared, metadata, profile, target_repo, upload, oci=oci, source_repo=source_repo)
    raise BadInputError(f"unknown output format {profile.format!r}")
