"""Helpers that tamper with a COPY of an OCI image layout, for the negative verify tests.

They work on the layout's files directly (blobs/sha256/*, index.json), independent of obdconv's
registry code, so a test controls exactly which digests stay consistent.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any


def copy_layout(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):  # fixtures may be read-only; the copy must be writable
        p.chmod(0o755 if p.is_dir() else 0o644)
    dst.chmod(0o755)
    return dst


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def put_blob(layout: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_path(layout, digest).write_bytes(data)
    return digest


def tagged_descriptor(layout: Path, tag: str) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag:
            return m
    raise KeyError(tag)


def read_manifest(layout: Path, tag: str) -> dict[str, Any]:
    return json.loads(blob_path(layout, tagged_descriptor(layout, tag)["digest"]).read_bytes())


def read_json_blob(layout: Path, digest: str) -> dict[str, Any]:
    return json.loads(blob_path(layout, digest).read_bytes())


def write_manifest(layout: Path, tag: str, manifest: dict[str, Any]) -> str:
    """Store `manifest` and point `tag` at it (index.json entry digest and size updated)."""
    data = json.dumps(manifest, separators=(",", ":")).encode()
    digest = put_blob(layout, data)
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag:
            m["digest"], m["size"] = digest, len(data)
    (layout / "index.json").write_text(json.dumps(index, indent=2))
    return digest


def write_config(layout: Path, manifest: dict[str, Any], config: dict[str, Any]) -> None:
    data = json.dumps(config, separators=(",", ":")).encode()
    manifest["config"]["digest"] = put_blob(layout, data)
    manifest["config"]["size"] = len(data)


def replace_native_layer(layout: Path, tag: str, index: int, blob: bytes) -> None:
    """Put `blob` in as layer `index` of `tag`, keeping every digest consistent: descriptor,
    blob-digest/blob-size annotations, config diff_id (native: the blob digest) and manifest."""
    manifest = read_manifest(layout, tag)
    digest = put_blob(layout, blob)
    layer = manifest["layers"][index]
    layer["digest"], layer["size"] = digest, len(blob)
    layer["annotations"]["containerd.io/snapshot/overlaybd/blob-digest"] = digest
    layer["annotations"]["containerd.io/snapshot/overlaybd/blob-size"] = str(len(blob))
    config = read_json_blob(layout, manifest["config"]["digest"])
    config["rootfs"]["diff_ids"][index] = digest
    write_config(layout, manifest, config)
    write_manifest(layout, tag, manifest)


def ustar_wrap(payload: bytes) -> bytes:
    """A tar wrapper made with Python's tarfile (ustar header, payload at 512), which the
    runtime's `is_tar_file` accepts like the reference's PAX one (spec overlaybd-format §2.6)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("overlaybd.commit")
        info.size = len(payload)
        info.mode = 0o444
        tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def file_from_gzip_layer(path: Path, name: str) -> bytes:
    with tarfile.open(path, "r:*") as tar:
        for m in tar.getmembers():
            if m.name.removeprefix("./") == name and m.isreg():
                f = tar.extractfile(m)
                assert f is not None
                return f.read()
    raise KeyError(name)


def turbo_members(blob: bytes) -> dict[str, bytes]:
    import gzip

    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isreg()}  # type: ignore[union-attr]


def replace_turbo_layer(layout: Path, tag: str, index: int, members: dict[str, bytes]) -> None:
    """Repack a turbo layer archive from `members` and keep every digest consistent (descriptor,
    annotations, config diff_id = sha256 of the uncompressed tar, manifest)."""
    import gzip

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    blob = gzip.compress(raw.getvalue(), mtime=0)
    manifest = read_manifest(layout, tag)
    digest = put_blob(layout, blob)
    layer = manifest["layers"][index]
    layer["digest"], layer["size"] = digest, len(blob)
    layer["annotations"]["containerd.io/snapshot/overlaybd/blob-digest"] = digest
    layer["annotations"]["containerd.io/snapshot/overlaybd/blob-size"] = str(len(blob))
    config = read_json_blob(layout, manifest["config"]["digest"])
    config["rootfs"]["diff_ids"][index] = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    write_config(layout, manifest, config)
    write_manifest(layout, tag, manifest)
