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

Steps, so a runner can do the heavy parts early: `build_layer` (CPU only, touches no registry:
everything but the prepared blocks written to two small files), `send_built` (streams the files
and the prepared blocks into an upload session, hashing as it sends; nothing is a blob yet) and
`commit_built` (the blob appears); `upload_built` is the last two. `assemble_layer` is all of it in
one call, with nothing written to disk. Either way the blob bytes are the same.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from obdconv.errors import BadInputError
from obdconv.formats.lsmt import commit_header, commit_tail
from obdconv.formats.tarwrap import PREFIX_SIZE, wrap_prefix, wrap_suffix
from obdconv.formats.zfile import HEADER_SPACE, BlockCompressor, compress_zfile, zfile_parts
from obdconv.oci import mediatypes
from obdconv.oci.digests import chain_id_to_uuid, ranges_sha256
from obdconv.pipeline.annotations import descriptor, layer_annotations, layer_media_type
from obdconv.pipeline.inplace import finish_in_place
from obdconv.pipeline.layout import (
    FS_BLOCK,
    LSMT_HEADER_SIZE,
    SECTOR,
    NativeLayout,
    data_area_start,
    round_up,
)
from obdconv.pipeline.mapping import native_runs, turbo_runs, verify_runs
from obdconv.pipeline.metadata import AppliedLayer
from obdconv.pipeline.prepare import PreparedLayer
from obdconv.registry.repository import ChunkSource, PendingBlob
from obdconv.request import ConversionProfile

log = logging.getLogger(__name__)

STREAM_CHUNK = 1 << 20
TURBO_ARCHIVE_NAME = "turboOCIv1.tar.gz"
TURBO_MARKER = ".turbo.ociv1"
GZIP_META_NAME = "gzip.meta"
# gzip level of turboOCIv1.tar.gz. The reference uses Go's default (6), but the archive is mostly
# already-compressed bytes (LZ4 blocks of fs.meta, zlib windows of gzip.meta): on the benchmark
# image level 1 saves only 12 % of 20 MB for 0.39 s of CPU, level 0 (stored blocks) costs nothing.
# Not isal's faster deflate: its bytes depend on the CPU's instruction set, and a fleet must give
# the same digest on every worker. Any level reads the same to every gzip reader.
TURBO_GZIP_LEVEL = 0


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


def _store(target_repo: Any, chunks: Iterable[bytes], upload: bool, size: int) -> tuple[str, int]:
    """Upload (or only hash, for --no-upload) a blob of `size` bytes known in advance: the registry
    client sends it with Content-Length, and a blob coming out at another size is an error."""
    if upload:
        return target_repo.upload_blob(chunks, size=size)
    digest, written = _Hashing(chunks).drain()
    _check_planned(digest, written, size)
    return digest, written


def _check_planned(digest: str, size: int, planned: int) -> None:
    """A blob hashed without uploading (--no-upload), or finished in place, came out at the size its
    plan said."""
    if size != planned:
        raise BadInputError(f"blob {digest}: {size} bytes, planned {planned}")


def _file_chunks(path: str | os.PathLike[str], offset: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0 and (chunk := f.read(min(STREAM_CHUNK, length))):
            length -= len(chunk)
            yield chunk


@dataclass(slots=True)
class BlobParts:
    """A layer blob as `head` + `body_size` bytes of file `body_path` (if any) from `body_offset`
    + `tail`."""

    head: bytes
    body_path: str
    body_size: int
    tail: bytes
    body_offset: int = 0

    @property
    def size(self) -> int:
        return len(self.head) + self.body_size + len(self.tail)

    def chunks(self) -> Iterator[bytes]:
        yield self.head
        if self.body_path:
            yield from _file_chunks(self.body_path, self.body_offset, self.body_size)
        yield self.tail


@dataclass(slots=True)
class BuiltLayer:
    """A layer blob built by `build_layer`, waiting for `upload_built`: its bytes are the file
    `head_path`, then `body_size` bytes of `body_path` from `body_offset` (the prepared blocks,
    verbatim; "" for turbo), then each `[path, offset, length]` of `body_ranges` (pieces of several
    spools: a flattened layer, see flatten.py), then `tail_path`."""

    format: str
    head_path: str
    body_path: str
    tail_path: str
    size: int
    diff_id: str  # turbo: sha256 of the uncompressed tar; native: "" (the blob's own digest)
    source_digest: str
    source_size: int
    target_media_type: str  # turbo annotation; "" for native
    body_ranges: list[list[Any]] = field(default_factory=list)
    body_offset: int = 0
    body_size: int = 0

    def ranges(self) -> list[list[Any]]:
        """The blob as `[path, offset, length]` byte ranges of files, in order (what an upload
        copies, see `Repository.begin_upload_ranges`)."""
        head = [[self.head_path, 0, os.path.getsize(self.head_path)]] if self.head_path else []
        body = [[self.body_path, self.body_offset, self.body_size]] if self.body_path else []
        tail = [[self.tail_path, 0, os.path.getsize(self.tail_path)]] if self.tail_path else []
        return [*head, *body, *self.body_ranges, *tail]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BuiltLayer:
        return cls(**d)


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


def plan_native_blob(prepared: PreparedLayer, metadata: AppliedLayer, profile: ConversionProfile, chain_id: str,
                     parent_chain_id: str) -> NativeBlobPlan:
    if not prepared.native:
        raise BadInputError(f"layer {prepared.source_digest} was prepared without a data area")
    if prepared.algorithm != profile.algorithm or prepared.block_size != profile.block_size:
        raise BadInputError(f"layer {prepared.source_digest} was prepared for "
                            f"{prepared.algorithm}/{prepared.block_size}, profile wants "
                            f"{profile.algorithm}/{profile.block_size}")
    bs = prepared.block_size
    vsize = profile.vsize_gb << 30
    data_start = data_area_start(bs)
    ordered, runs = native_runs(metadata.blocks, metadata.files, data_start=data_start,
                                data_area_size=prepared.data_area_size)
    layout = NativeLayout(bs, prepared.data_area_size, len(ordered))
    verify_runs(runs, local_lo=data_start // SECTOR, local_hi=layout.index_offset // SECTOR, virtual_size=vsize)
    uuid, parent_uuid = _uuid(chain_id), _uuid(parent_chain_id)
    tail = commit_tail(runs, layout.index_offset, vsize, uuid, parent_uuid)
    tail_region = b"".join(data for _, data in ordered) + tail
    lsmt_size = layout.index_offset + len(tail)
    head_blocks = _native_head_blocks(profile, chain_id, parent_chain_id)
    tail_blocks = BlockCompressor(profile.algorithm, bs).compress(tail_region)
    lengths = [len(b) for b in head_blocks] + prepared.block_lengths() + [len(b) for b in tail_blocks]
    zheader, ztail = zfile_parts(lengths, lsmt_size, profile.algorithm, bs)
    zfile_size = len(zheader) + sum(lengths) + len(ztail)
    return NativeBlobPlan(zheader, head_blocks, tail_blocks, ztail, zfile_size, lsmt_size)


def _native_head_blocks(profile: ConversionProfile, chain_id: str, parent_chain_id: str) -> list[bytes]:
    """The ZFile block(s) of the LSMT header region (the header, zeros up to the data area)."""
    header = commit_header(profile.vsize_gb << 30, _uuid(chain_id), _uuid(parent_chain_id))
    head_region = header + bytes(data_area_start(profile.block_size) - len(header))
    return BlockCompressor(profile.algorithm, profile.block_size).compress(head_region)


def native_head_size(profile: ConversionProfile, chain_id: str, parent_chain_id: str) -> int:
    """Bytes of a native blob before its prepared blocks (tar prefix, ZFile header, the LSMT header's
    block): known before the layer is prepared, so prepare can leave this much room in front of
    the blocks for the blob to be finished in place (inplace.py)."""
    return PREFIX_SIZE + HEADER_SPACE + sum(map(len, _native_head_blocks(profile, chain_id, parent_chain_id)))


def native_head_room(profiles: Iterable[ConversionProfile], upload: bool, target_repo: Any, chain_ids: Sequence[str],
                     index: int) -> int:
    """The room prepare should leave in front of layer `index`'s blocks (`prepare_layer(head_room=)`):
    its native blob's head size when that blob can be finished in place (a layered native output,
    uploaded to a target that takes files: inplace.py), else 0. Sized for this chain: the same
    layer under another chain (another head) is copied instead."""
    native = next((p for p in profiles if p.format == "native" and not p.flatten), None)
    if native is None or not upload or not target_repo.adopts_files:
        return 0
    return native_head_size(native, chain_ids[index], chain_ids[index - 1] if index else "")


def native_blob_parts(prepared: PreparedLayer, plan: NativeBlobPlan) -> BlobParts:
    """The blob's bytes in order: tar prefix, ZFile (prepared blocks streamed from the spool), suffix."""
    body_size = prepared.compressed_size
    expected = plan.zfile_size - len(plan.zheader) - len(plan.ztail) - sum(len(b) for b in plan.head_blocks) \
        - sum(len(b) for b in plan.tail_blocks)
    file_size = os.path.getsize(prepared.blocks_path)
    if body_size != expected or file_size < prepared.blocks_offset + body_size:
        raise BadInputError(f"layer {prepared.source_digest}: prepared blocks are {body_size} bytes "
                            f"({file_size} in the file from byte {prepared.blocks_offset}), their lengths "
                            f"add up to {expected}")
    return BlobParts(wrap_prefix(plan.zfile_size) + plan.zheader + b"".join(plan.head_blocks),
                     str(prepared.blocks_path), body_size,
                     b"".join(plan.tail_blocks) + plan.ztail + wrap_suffix(plan.zfile_size), prepared.blocks_offset)


def native_blob_chunks(prepared: PreparedLayer, plan: NativeBlobPlan) -> Iterator[bytes]:
    return native_blob_parts(prepared, plan).chunks()


def _native_converted(digest: str, size: int, oci: bool) -> ConvertedLayer:
    # The blob is an uncompressed tar, so its digest is also its diff_id.
    return ConvertedLayer(digest, size, layer_media_type("native", oci), digest,
                          layer_annotations("native", digest, size))


def assemble_native(prepared: PreparedLayer, metadata: AppliedLayer, profile: ConversionProfile, chain_id: str,
                    parent_chain_id: str, target_repo: Any, upload: bool = True, *, oci: bool = False) -> ConvertedLayer:
    parts = native_blob_parts(prepared, plan_native_blob(prepared, metadata, profile, chain_id, parent_chain_id))
    pending = _in_place(parts, target_repo) if upload else None
    if pending is not None:
        pending.commit()  # a failed commit cleans up after itself (cancel() would then do nothing)
        return _native_converted(pending.digest, pending.size, oci)
    digest, size = _store(target_repo, ChunkSource(parts.chunks), upload, parts.size)
    return _native_converted(digest, size, oci)


def _in_place(parts: BlobParts, target_repo: Any) -> PendingBlob | None:
    """`finish_in_place` of a native blob whose blocks have room in front of them."""
    if not parts.body_offset:
        return None
    return finish_in_place(parts.body_path, parts.head, parts.body_offset, parts.body_size, parts.tail, target_repo)


# --------------------------------------------------------------------------------------------
# turbo


def build_fs_meta(prepared: PreparedLayer, metadata: AppliedLayer, profile: ConversionProfile) -> bytes:
    """ZFile(warp LSMT) of this layer's ext4 metadata, file data pointing into the source tar."""
    vsize = profile.vsize_gb << 30
    ordered, runs = turbo_runs(metadata.blocks, metadata.files, metadata_start=LSMT_HEADER_SIZE)
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
        commit_tail(runs, index_offset, vsize, None, None, pad_index=False),
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


def ensure_target_blob(target_repo: Any, source_repo: Any, digest: str, size: int) -> None:
    """A turbo layer reads file data from the ORIGINAL blob `digest` (of `size` bytes), so it must
    exist in the output repository: mount it (same registry) or copy it when writing elsewhere."""
    if source_repo is None or source_repo is target_repo or target_repo.head_blob(digest) is not None:
        return
    same_host = getattr(source_repo, "host", None) == getattr(target_repo, "host", None) and source_repo.host
    if same_host and target_repo.mount_blob(digest, source_repo.name):
        return
    with source_repo.open_blob(digest) as f:
        target_repo.push_blob(f, digest, size)


def turbo_blob(prepared: PreparedLayer, metadata: AppliedLayer, profile: ConversionProfile) -> tuple[bytes, str]:
    """(the turbo layer blob, its diff_id)."""
    if not prepared.turbo:
        raise BadInputError(f"layer {prepared.source_digest} was prepared without turbo data")
    fs_meta = build_fs_meta(prepared, metadata, profile)
    gzip_meta_path = prepared.gzip_meta_path
    gzip_meta = gzip_meta_path.read_bytes() if gzip_meta_path is not None else None
    tar, blob = turbo_archive(fs_meta_name(profile.fstype), fs_meta, gzip_meta)
    return blob, "sha256:" + hashlib.sha256(tar).hexdigest()


def _turbo_target_media_type(prepared: PreparedLayer) -> str:
    return mediatypes.turbo_target_media_type(prepared.source_media_type, prepared.compression == "gzip")


def _turbo_converted(digest: str, size: int, diff_id: str, source_digest: str, target_type: str,
                     oci: bool) -> ConvertedLayer:
    annotations = layer_annotations("turbo", digest, size, target_digest=source_digest,
                                    target_media_type=target_type)
    return ConvertedLayer(digest, size, layer_media_type("turbo", oci), diff_id, annotations)


def assemble_turbo(prepared: PreparedLayer, metadata: AppliedLayer, profile: ConversionProfile, target_repo: Any,
                   upload: bool = True, *, oci: bool = False, source_repo: Any = None) -> ConvertedLayer:
    blob, diff_id = turbo_blob(prepared, metadata, profile)
    if upload:
        ensure_target_blob(target_repo, source_repo, prepared.source_digest, prepared.source_size)
    digest, size = _store(target_repo, [blob], upload, len(blob))
    return _turbo_converted(digest, size, diff_id, prepared.source_digest, _turbo_target_media_type(prepared), oci)


def assemble_layer(prepared: PreparedLayer, metadata: AppliedLayer, profile: ConversionProfile, chain_id: str,
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


# --------------------------------------------------------------------------------------------
# in two steps: build (CPU, no registry) then upload


def build_layer(prepared: PreparedLayer, metadata: AppliedLayer, profile: ConversionProfile, chain_id: str,
                parent_chain_id: str, out_dir: str | os.PathLike[str]) -> BuiltLayer:
    """Everything of `assemble_layer` that needs no registry: the blob's own bytes (all but the
    prepared blocks it streams from the spool) go to files `<out_dir>/<format>-<chain id>.head/.tail`.
    Nothing is uploaded, so a runner may build before every layer's source digest is verified."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{profile.format}-{(chain_id or prepared.source_digest).partition(':')[2] or 'layer'}"
    if profile.format == "native":
        parts = native_blob_parts(prepared, plan_native_blob(prepared, metadata, profile, chain_id, parent_chain_id))
        diff_id = target_type = ""
    elif profile.format == "turbo":
        blob, diff_id = turbo_blob(prepared, metadata, profile)
        parts = BlobParts(blob, "", 0, b"")
        target_type = _turbo_target_media_type(prepared)
    else:
        raise BadInputError(f"unknown output format {profile.format!r}")
    head, tail = Path(f"{stem}.head"), Path(f"{stem}.tail")
    head.write_bytes(parts.head)
    tail.write_bytes(parts.tail)
    return BuiltLayer(profile.format, str(head), parts.body_path, str(tail), parts.size, diff_id,
                      prepared.source_digest, prepared.source_size, target_type,
                      body_offset=parts.body_offset, body_size=parts.body_size)


def send_built(built: BuiltLayer, target_repo: Any, upload: bool = True) -> PendingBlob:
    """The heavy half of an upload: a built layer's bytes sent (or, with `upload` False, only
    hashed), not yet a blob in `target_repo` until `commit_built`."""
    if upload:
        if built.body_offset and built.body_path:
            parts = BlobParts(Path(built.head_path).read_bytes(), built.body_path, built.body_size,
                              Path(built.tail_path).read_bytes(), built.body_offset)
            pending = _in_place(parts, target_repo)
            if pending is not None:
                _check_planned(pending.digest, pending.size, built.size)
                return pending
        return target_repo.begin_upload_ranges(built.ranges(), built.size)  # type: ignore[no-any-return]
    digest, size = ranges_sha256(built.ranges())
    _check_planned(digest, size, built.size)
    return PendingBlob(digest, size, lambda: None, lambda: None)


def commit_built(built: BuiltLayer, pending: PendingBlob, target_repo: Any, upload: bool = True, *,
                 oci: bool = False, source_repo: Any = None) -> ConvertedLayer:
    """Make a sent layer a blob of `target_repo` (turbo: with its source blob there too); cancels
    `pending` if that fails."""
    try:
        if built.format == "turbo" and upload:
            ensure_target_blob(target_repo, source_repo, built.source_digest, built.source_size)
        pending.commit()
    except BaseException:
        pending.cancel()
        raise
    if built.format == "native":
        return _native_converted(pending.digest, pending.size, oci)
    return _turbo_converted(pending.digest, pending.size, built.diff_id, built.source_digest,
                            built.target_media_type, oci)


def upload_built(built: BuiltLayer, target_repo: Any, upload: bool = True, *, oci: bool = False,
                 source_repo: Any = None) -> ConvertedLayer:
    """Send and commit a built layer (or only hash it, with `upload` False); the files stay for the
    caller to remove. Same result as `assemble_layer` on the same inputs."""
    return commit_built(built, send_built(built, target_repo, upload), target_repo, upload, oci=oci,
                        source_repo=source_repo)
