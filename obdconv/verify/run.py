"""The driver: verify each platform of a converted image against its source."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from obdconv.errors import BadInputError, ObdconvError
from obdconv.formats.lsmt import LSMTFile
from obdconv.registry import open_repository
from obdconv.registry.options import RegistryOptions
from obdconv.registry.reference import parse_reference
from obdconv.registry.repository import Repository
from obdconv.verify.filesystem import compare_filesystem
from obdconv.verify.images import (
    ImagePair,
    Spool,
    descriptor_str,
    fetch_json,
    pair_platforms,
    short,
    sniff_compression,
)
from obdconv.verify.layers import (
    SourceLayer,
    base_layer_count,
    check_layer_annotations,
    check_manifest_types,
    check_uuid_chain,
    flattened,
    flattened_config,
    open_native_layer,
    open_turbo_layer,
)
from obdconv.verify.names import ANN_TARGET_DIGEST
from obdconv.verify.report import ERROR, INFO, PlatformReport, VerifyReport


def verify_platform(converted: Repository, source: Repository, pair: ImagePair, workdir: Path, mount: bool) -> PlatformReport:
    report = PlatformReport(pair.platform, pair.manifest_digest, pair.source_digest)
    spool = Spool(workdir)
    # read first: a flattened image's config says so, which tells a base layer below its one layer
    config = fetch_json(converted, spool, pair.manifest.get("config") or {}, report, "config")
    flat_marked = flattened_config(config)
    base = base_layer_count(pair, flat_marked)
    family, fmt = check_manifest_types(pair, report, base)
    report.format = fmt
    layers_desc: list[dict[str, Any]] = list(pair.manifest.get("layers") or [])
    src_desc: list[dict[str, Any]] = list(pair.source_manifest.get("layers") or [])
    report.layers = len(layers_desc)
    if base:
        report.add(INFO, "layer 0", "base layer (converted with --mkfs=false): stacked below the others, "
                   "matched with no source layer")
    flat = flat_marked or flattened(fmt, len(layers_desc) - base, len(src_desc))
    if flat:
        report.add(INFO, f"layer {base}", f"flattened (--flatten): one layer holds the filesystem of the "
                   f"{len(src_desc)} source layers, compared with all of them applied in order")
    if len(layers_desc) != (1 if flat else len(src_desc)) + base:
        report.add(ERROR, "manifest", f"{len(layers_desc)} converted layers for {len(src_desc)} source layers")

    diff_ids: list[str] | None = None
    if config is not None:
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        if len(diff_ids) != len(layers_desc):
            report.add(ERROR, "config", f"rootfs.diff_ids has {len(diff_ids)} entries for {len(layers_desc)} layers")
            diff_ids = None

    sources: list[SourceLayer] = []
    for j, d in enumerate(src_desc):
        s = SourceLayer(descriptor_str(d, "mediaType"), descriptor_str(d, "digest"), None)
        try:
            s.path = spool.fetch(source, s.digest, d.get("size"))
            s.compression = sniff_compression(s.path)
        except ObdconvError as e:
            report.add(ERROR, f"source layer {j}", f"blob {short(s.digest)}: {e}")
        sources.append(s)

    opened: list[LSMTFile | None] = []
    for i, desc in enumerate(layers_desc):
        is_base = i < base
        layer_fmt = "overlaybd" if is_base else fmt
        src = None if is_base or flat or i - base >= len(sources) else sources[i - base]
        check_layer_annotations(i, desc, family, layer_fmt, src, report)
        digest = descriptor_str(desc, "digest")
        try:
            path = spool.fetch(converted, digest, desc.get("size"))
        except ObdconvError as e:
            report.add(ERROR, f"layer {i}", f"blob {short(digest)}: {e}")
            opened.append(None)
            continue
        if layer_fmt == "turbo":
            target_digest = (desc.get("annotations") or {}).get(ANN_TARGET_DIGEST, "")
            if src is not None and target_digest and target_digest != src.digest:
                # Read the data where the runtime would: the blob the annotation names.
                try:
                    tpath = spool.fetch(converted, target_digest, None)
                    src = SourceLayer(src.media_type, target_digest, tpath, sniff_compression(tpath))
                except ObdconvError as e:
                    report.add(ERROR, f"layer {i}", f"target blob {short(target_digest)}: {e}")
                    src = None
            elif src is not None and target_digest and converted is not source:
                if _has_blob(converted, target_digest) is False:
                    report.add(ERROR, f"layer {i}", f"target blob {short(target_digest)} is not in the converted "
                               "image's repository (the runtime fetches it from there)")
            opened.append(open_turbo_layer(i, path, src, spool, report, diff_ids[i] if diff_ids else None))
        else:
            if diff_ids is not None and diff_ids[i] != digest:
                report.add(ERROR, "config", f"rootfs.diff_ids[{i}] is {diff_ids[i]}, expected the layer blob "
                           f"digest {digest} (an overlaybd blob is uncompressed)")
            opened.append(open_native_layer(i, path, report))

    layers = [x for x in opened if x is not None]
    if fmt == "overlaybd" and layers and len(layers) == len(opened):
        check_uuid_chain(layers, report)
    # The filesystem is compared only when every layer opened: a partial stack would only add noise.
    if layers and len(layers) == len(opened) == (1 if flat else len(sources)) + base \
            and all(s.path is not None for s in sources):
        compare_filesystem(layers, sources, report, workdir, mount)
    for s in sources:
        if s.path is not None:
            s.path.unlink(missing_ok=True)
    return report


def _has_blob(repo: Repository, digest: str) -> bool | None:
    try:
        return repo.head_blob(digest) is not None
    except ObdconvError:
        return None


def verify_image(converted: Repository, ref: str, source: Repository, source_ref: str, *, platform: str | None = None,
                 mount: bool = False, workdir: str | Path | None = None) -> VerifyReport:
    """Verify converted image `converted`@`ref` against `source`@`source_ref` (both `Repository`s).

    `platform` ("os/arch[/variant]") limits an index to one platform; `mount` reads the filesystem
    through the kernel (root + loop device) instead of libext2fs; `workdir` holds the spooled blobs and
    the flattened sparse image (a temporary directory when None; removed at the end either way).
    """
    report = VerifyReport(ref, source_ref, "mount" if mount else "userspace")
    with ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="obdconv-verify-", dir=workdir)))
        pairs = pair_platforms(converted, ref, source, source_ref, platform, report.findings)
        for n, pair in enumerate(pairs):
            pdir = base / f"p{n}"
            pdir.mkdir()
            try:
                report.platforms.append(verify_platform(converted, source, pair, pdir, mount))
            finally:
                shutil.rmtree(pdir, ignore_errors=True)
    return report


def verify_reference(ref: str, source_ref: str, options: RegistryOptions | None = None, **kwargs: Any) -> VerifyReport:
    """Parse both references (`host/repo:tag`, `oci:PATH:tag`, `...@sha256:...`), open their
    repositories with `options` (a RegistryOptions) and call `verify_image`."""
    options = options or RegistryOptions()
    conv_ref, src_ref = parse_reference(ref), parse_reference(source_ref)
    if not conv_ref.ref:
        raise BadInputError(f"reference {ref!r} names no tag or digest")
    if not src_ref.ref:
        raise BadInputError(f"source reference {source_ref!r} names no tag or digest")
    converted = open_repository(conv_ref.name, options)
    source = converted if src_ref.name == conv_ref.name else open_repository(src_ref.name, options)
    report = verify_image(converted, conv_ref.ref, source, src_ref.ref, **kwargs)
    report.ref, report.source_ref = ref, source_ref  # name the images as the caller did
    return report
