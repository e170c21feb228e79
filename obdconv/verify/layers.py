"""Per-layer checks: manifest and annotation rules, and opening each converted layer (native: tar
wrapper -> ZFile -> LSMT; turbo: the archive, its gzip index, a warp LSMT over the source blob)."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obdconv.errors import ObdconvError, UnsupportedError
from obdconv.formats.blob import open_payload
from obdconv.formats.gzindex import GzipIndex, GzipRandomReader
from obdconv.formats.lsmt import LSMTFile
from obdconv.formats.source import FileSource
from obdconv.oci.decompress import Decompressor
from obdconv.oci.mediatypes import FLATTEN_CREATED_BY
from obdconv.verify.images import ImagePair, Spool, descriptor_str, expected_target_media_type, short
from obdconv.verify.names import (
    ANN_BLOB_DIGEST,
    ANN_BLOB_SIZE,
    ANN_TARGET_DIGEST,
    ANN_TARGET_MEDIA_TYPE,
    ANN_VERSION,
    COPY_CHUNK,
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    NATIVE_VERSION,
    NULL_UUID,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    TURBO_FS_META,
    TURBO_GZIP_INDEX,
    TURBO_MARKER,
    TURBO_VERSION,
)
from obdconv.verify.report import ERROR, INFO, WARNING, PlatformReport


@dataclass(slots=True)
class SourceLayer:
    media_type: str
    digest: str
    path: Path | None
    compression: str = "none"


def base_layer_count(pair: ImagePair, flattened: bool = False) -> int:
    """1 when the converted image starts with a base layer the source lacks (`--mkfs=false`: the
    reference prepends its ext4 base layer, annotated as a native layer, spec §4.2), else 0. A
    `flattened` image has one layer of its own, so a second one below it is the base."""
    layers = pair.manifest.get("layers") or []
    converted = 1 if flattened else len(pair.source_manifest.get("layers") or [])
    if len(layers) == converted + 1 and layers:
        if (layers[0].get("annotations") or {}).get(ANN_VERSION) == NATIVE_VERSION:
            return 1
    return 0


def flattened_config(config: dict[str, Any] | None) -> bool:
    """The config of an image made with `--flatten` (its last history entry says so)."""
    history = (config or {}).get("history")
    return isinstance(history, list) and bool(history) and isinstance(history[-1], dict) \
        and history[-1].get("created_by") == FLATTEN_CREATED_BY


def flattened(fmt: str, converted_layers: int, source_layers: int) -> bool:
    """An overlaybd image of one layer for several source layers: made with `--flatten`, its one
    layer holds the whole filesystem (checked against every source layer applied in order)."""
    return fmt == "overlaybd" and converted_layers == 1 and source_layers > 1


def check_manifest_types(pair: ImagePair, report: PlatformReport, base: int = 0) -> tuple[str, str]:
    """Media types of manifest and config; returns (family "oci"|"docker", layer format)."""
    m = pair.manifest
    mt = pair.manifest_media_type
    if mt == OCI_MANIFEST:
        family, want_config = "oci", OCI_CONFIG
    elif mt == DOCKER_MANIFEST:
        family, want_config = "docker", DOCKER_CONFIG
    else:
        report.add(ERROR, "manifest", f"media type {mt!r} is not an OCI or Docker schema 2 image manifest")
        family, want_config = "oci", OCI_CONFIG
    if m.get("schemaVersion") != 2:
        report.add(ERROR, "manifest", f"schemaVersion is {m.get('schemaVersion')!r}, expected 2")
    config_mt = descriptor_str(m.get("config") or {}, "mediaType")
    if config_mt != want_config:
        report.add(ERROR, "manifest", f"config media type {config_mt!r}, expected {want_config!r} for a {family} manifest")
    versions = {(layer.get("annotations") or {}).get(ANN_VERSION, "") for layer in (m.get("layers") or [])[base:]}
    if versions == {NATIVE_VERSION}:
        fmt = "overlaybd"
    elif versions == {TURBO_VERSION}:
        fmt = "turbo"
    else:
        report.add(ERROR, "manifest", f"layer {ANN_VERSION} annotations are {sorted(versions)!r}; expected all "
                   f"{NATIVE_VERSION!r} (overlaybd) or all {TURBO_VERSION!r} (turbo)")
        fmt = "turbo" if TURBO_VERSION in versions else "overlaybd"
    return family, fmt


def check_layer_annotations(i: int, desc: dict[str, Any], family: str, fmt: str, source: SourceLayer | None,
                            report: PlatformReport) -> None:
    where = f"layer {i}"
    ann = desc.get("annotations") or {}
    digest, size, mt = descriptor_str(desc, "digest"), desc.get("size"), descriptor_str(desc, "mediaType")
    want_mt = {("oci", "overlaybd"): OCI_LAYER, ("docker", "overlaybd"): DOCKER_LAYER,
               ("oci", "turbo"): OCI_LAYER_GZIP, ("docker", "turbo"): DOCKER_LAYER_GZIP}[(family, fmt)]
    if mt != want_mt:
        report.add(ERROR, where, f"media type {mt!r}, expected {want_mt!r}")
    if ann.get(ANN_BLOB_DIGEST) != digest:
        report.add(ERROR, where, f"annotation {ANN_BLOB_DIGEST} is {ann.get(ANN_BLOB_DIGEST)!r}, "
                   f"descriptor digest is {digest!r}")
    if ann.get(ANN_BLOB_SIZE) != str(size):
        report.add(ERROR, where, f"annotation {ANN_BLOB_SIZE} is {ann.get(ANN_BLOB_SIZE)!r}, "
                   f"descriptor size is {size!r}")
    if fmt != "turbo":
        for key in (ANN_TARGET_DIGEST, ANN_TARGET_MEDIA_TYPE):
            if key in ann:
                report.add(ERROR, where, f"annotation {key} on a non-turbo layer")
        return
    target = ann.get(ANN_TARGET_DIGEST)
    if not target:
        report.add(ERROR, where, f"annotation {ANN_TARGET_DIGEST} is missing")
    elif source is not None and target != source.digest:
        report.add(ERROR, where, f"annotation {ANN_TARGET_DIGEST} is {target}, but source layer {i} is {source.digest}")
    if source is not None and source.path is not None:
        want = expected_target_media_type(source.media_type, source.compression)
        if ann.get(ANN_TARGET_MEDIA_TYPE) != want:
            report.add(ERROR, where, f"annotation {ANN_TARGET_MEDIA_TYPE} is {ann.get(ANN_TARGET_MEDIA_TYPE)!r}, "
                       f"expected {want!r} for source blob {short(source.digest)} ({source.compression})")


def open_native_layer(i: int, path: Path, report: PlatformReport) -> LSMTFile | None:
    """tar wrapper -> ZFile (every block CRC checked) -> LSMT; None (with an error finding) if invalid."""
    where = f"layer {i}"
    try:
        payload = open_payload(FileSource(path))
        if payload.tar is None:
            report.add(INFO, where, "no tar wrapper (the runtime also accepts a bare ZFile/LSMT)")
        if payload.zfile is not None:
            payload.zfile.verify()
        else:
            report.add(WARNING, where, "payload is not ZFile-compressed (the reference always compresses)")
        return LSMTFile.open(payload.source, None, payload.size)
    except ObdconvError as e:
        report.add(ERROR, where, f"blob structure: {e}")
    return None


def open_turbo_layer(i: int, path: Path, source: SourceLayer | None, spool: Spool, report: PlatformReport,
                     diff_id: str | None) -> LSMTFile | None:
    """Check a `turboOCIv1.tar.gz` and open its fs meta as a warp LSMT over the source layer blob."""
    where = f"layer {i}"
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        report.add(ERROR, where, f"turbo layer blob is not gzip: {e}")
        return None
    tar_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    if diff_id is not None and diff_id != tar_digest:
        report.add(ERROR, "config", f"rootfs.diff_ids[{i}] is {diff_id}, but the uncompressed turbo tar of "
                   f"layer {i} is {tar_digest}")
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            members = {m.name.removeprefix("./"): (m, tar.extractfile(m).read() if m.isreg() else b"")  # type: ignore[union-attr]
                       for m in tar.getmembers()}
    except tarfile.TarError as e:
        report.add(ERROR, where, f"turbo layer is not a tar: {e}")
        return None
    if TURBO_FS_META not in members:
        other = [n for n in members if n.endswith(".fs.meta")]
        if other:
            report.add(ERROR, where, f"{other[0]}: only ext4 turbo layers can be verified ({UnsupportedError.__name__})")
        else:
            report.add(ERROR, where, f"turbo archive has no {TURBO_FS_META} (members: {sorted(members)})")
        return None
    if TURBO_MARKER not in members:
        report.add(WARNING, where, f"turbo archive has no {TURBO_MARKER} marker (the reference always writes it)")
    elif members[TURBO_MARKER][1]:
        report.add(WARNING, where, f"{TURBO_MARKER} is not empty")
    if source is None or source.path is None:
        report.add(ERROR, where, "no source layer blob to read file data from")
        return None
    gz_meta = members.get(TURBO_GZIP_INDEX)
    if source.compression == "gzip" and gz_meta is None:
        report.add(ERROR, where, f"source layer is gzip but the turbo archive has no {TURBO_GZIP_INDEX}")
        return None
    if source.compression == "none" and gz_meta is not None:
        report.add(WARNING, where, f"{TURBO_GZIP_INDEX} present for an uncompressed source layer (unused)")
    if source.compression not in ("gzip", "none"):
        report.add(ERROR, where, f"source layer compression {source.compression} cannot back a turbo layer")
        return None
    meta_path = spool.root / f"turbo-{i}-{TURBO_FS_META}"
    meta_path.write_bytes(members[TURBO_FS_META][1])
    try:
        target: Any
        if source.compression == "gzip":
            index = GzipIndex.parse(gz_meta[1])  # type: ignore[index]
            blob_size = source.path.stat().st_size
            if index.header.gzip_file_size != blob_size:  # the runtime rejects the pair (spec §5)
                report.add(ERROR, where, f"{TURBO_GZIP_INDEX} is for a {index.header.gzip_file_size}-byte gzip, "
                           f"the target blob is {blob_size} bytes")
                return None
            tar_path = spool.root / f"turbo-{i}-target.tar"
            if not check_gzip_index(GzipRandomReader(FileSource(source.path), index, readahead=0),
                                    source.path, tar_path, report, where):
                return None
            # Every access point of the index was just checked against the sequentially inflated
            # tar, so reading file data from that tar gives exactly what reads through the index
            # give, without re-inflating up to a span (1 MiB) per small file, which makes big
            # images take hours.
            target = FileSource(tar_path)
        else:
            target = FileSource(source.path)
        payload = open_payload(FileSource(meta_path))
        if payload.zfile is not None:
            payload.zfile.verify()
        return LSMTFile.open(payload.source, target, payload.size)
    except ObdconvError as e:
        report.add(ERROR, where, f"{TURBO_FS_META}: {e}")
    return None


def inflate_to(blob: Path, out_path: Path) -> int:
    """Sequentially decompress a gzip blob (all members) to `out_path`; returns the size."""
    d = Decompressor("gzip")
    n = 0
    with open(blob, "rb") as f, open(out_path, "wb") as out:
        while chunk := f.read(COPY_CHUNK):
            for piece in d.feed_iter(chunk):
                out.write(piece)
                n += len(piece)
        tail = d.finish()
        out.write(tail)
        n += len(tail)
    return n


def check_gzip_index(reader: Any, blob: Path, tar_path: Path, report: PlatformReport, where: str) -> bool:
    """`gzip.meta` against the blob: the indexed size is the whole tar, and reading through every
    access point (window, bit offset, input position) yields the tar's bytes at that offset."""
    try:
        size = inflate_to(blob, tar_path)
    except ObdconvError as e:
        report.add(ERROR, where, f"target blob does not inflate: {e}")
        return False
    indexed = reader.index.header.uncompress_file_size
    if indexed != size:
        report.add(ERROR, where, f"{TURBO_GZIP_INDEX} indexes {indexed} uncompressed bytes, the target "
                   f"blob inflates to {size} (more than one gzip member?)")
        return False
    with open(tar_path, "rb") as tar:
        for n, entry in enumerate(reader.index.entries):
            length = min(4096, size - entry.de_pos)
            if length <= 0:
                continue
            tar.seek(entry.de_pos)
            try:
                got = reader.pread(entry.de_pos, length)
            except ObdconvError as e:
                got = f"error: {e}".encode()
            if got != tar.read(length):
                report.add(ERROR, where, f"{TURBO_GZIP_INDEX} access point {n} (uncompressed offset "
                           f"{entry.de_pos}) does not read back the target's bytes")
                return False
    return True


def check_uuid_chain(layers: list[LSMTFile], report: PlatformReport) -> None:
    """parent_uuid[k] == uuid[k-1]; reported, never failed: the runtime does not check it (§1.8)."""
    broken: list[str] = []
    for k, layer in enumerate(layers):
        want_parent = layers[k - 1].uuid if k else NULL_UUID
        if str(layer.parent_uuid).upper() != str(want_parent).upper():
            broken.append(f"layer {k} parent_uuid {layer.parent_uuid} != "
                          f"{f'layer {k - 1} uuid' if k else 'null'} {want_parent}")
    if broken:
        report.add(WARNING, "uuid chain", "LSMT uuid/parent uuid chain is not consistent (informational: the "
                   "overlaybd runtime does not check it): " + "; ".join(broken))
