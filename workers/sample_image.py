"""A small multi-layer sample image written on the fly into an OCI image layout (`oci:PATH`),
for `obdconv fleet`, the fleet tests and the fleet benchmark. Deterministic: same arguments, same
bytes (fixed mtimes, gzip mtime 0, sorted JSON)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MTIME = 1_700_000_000


@dataclass(slots=True)
class Blob:
    digest: str
    size: int
    media_type: str

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def _json(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _write_blob(layout: Path, data: bytes, media_type: str) -> Blob:
    hexdigest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / hexdigest
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return Blob("sha256:" + hexdigest, len(data), media_type)


def _tar(members: list[tuple[str, str, bytes | str]]) -> bytes:
    """members: (kind, path, payload) with kind "dir" | "file" | "symlink" | "hardlink"."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, path, payload in members:
            info = tarfile.TarInfo(path)
            info.mtime = MTIME
            info.uid = info.gid = 0
            data = b""
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, str(payload), 0o777
            elif kind == "hardlink":
                info.type, info.linkname, info.mode = tarfile.LNKTYPE, str(payload), 0o644
            else:
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def _layer_members(index: int, file_bytes: int, rng: random.Random) -> list[tuple[str, str, bytes | str]]:
    """Files of layer `index`; `rng` decides the random content (and so the layer's digest)."""
    d = f"layer{index}"
    members: list[tuple[str, str, bytes | str]] = [
        ("dir", d, b""),
        ("file", f"{d}/hello.txt", f"hello from layer {index}\n"),
        ("file", f"{d}/data.bin", rng.randbytes(file_bytes)),
        ("file", f"{d}/text.txt", f"line {index}\n" * (file_bytes // 8 + 1)),
        ("symlink", f"{d}/link", "hello.txt"),
        ("hardlink", f"{d}/hard", f"{d}/hello.txt"),
        ("dir", "etc", b""),
        ("file", "etc/release", f"sample release {index}\n"),  # rewritten by every layer
    ]
    if index > 0:
        members.append(("file", f"layer{index - 1}/.wh.data.bin", b""))  # whiteout in the layer below
    return members


def _image(layout: Path, layers: int, file_bytes: int, seed: int, arch: str, shared_layers: int) -> Blob:
    layer_blobs, diff_ids = [], []
    for i in range(layers):
        # The lowest `shared_layers` layers are the same for every seed (a common base image).
        rng = random.Random(f"base-{arch}-{i}" if i < shared_layers else f"{seed}-{arch}-{i}")
        raw = _tar(_layer_members(i, file_bytes, rng))
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        layer_blobs.append(_write_blob(layout, gzip.compress(raw, compresslevel=6, mtime=0), MT_LAYER_GZIP))
    config = {"architecture": arch, "os": "linux", "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    config_blob = _write_blob(layout, _json(config), MT_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config_blob.descriptor(),
                "layers": [b.descriptor() for b in layer_blobs]}
    return _write_blob(layout, _json(manifest), MT_MANIFEST)


def _tag(layout: Path, tag: str, blob: Blob, extra: dict[str, object] | None = None) -> None:
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {
        "schemaVersion": 2, "mediaType": MT_INDEX, "manifests": []}
    entries = [m for m in index["manifests"]
               if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") != tag]
    entry = {**blob.descriptor(), **(extra or {}), "annotations": {"org.opencontainers.image.ref.name": tag}}
    index["manifests"] = [*entries, entry]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))


def build_sample_image(layout: str | Path, tag: str = "sample", *, layers: int = 3, file_bytes: int = 64 << 10,
                       seed: int = 1, platforms: tuple[str, ...] = (), shared_layers: int = 0) -> str:
    """Write the image into the layout (created if needed) under `tag`; returns its manifest (or,
    with `platforms` like ("amd64", "arm64"), index) digest. Distinct `seed`s give distinct
    layers, except the lowest `shared_layers`, which all seeds share."""
    layout = Path(layout)
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps(OCI_LAYOUT))
    if not platforms:
        blob = _image(layout, layers, file_bytes, seed, "amd64", shared_layers)
        _tag(layout, tag, blob)
        return blob.digest
    entries = []
    for arch in platforms:
        m = _image(layout, layers, file_bytes, seed, arch, shared_layers)
        entries.append({**m.descriptor(), "platform": {"architecture": arch, "os": "linux"}})
    index_blob = _write_blob(layout, _json({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}),
                             MT_INDEX)
    _tag(layout, tag, index_blob)
    return index_blob.digest
