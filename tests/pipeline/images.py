"""Build test images with Python's tarfile and write them as OCI image layouts (plain files, written
here independently of obdconv.registry so a bug there cannot hide one in the pipeline)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_TYPES = {
    (False, "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    (False, "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    (False, "none"): "application/vnd.oci.image.layer.v1.tar",
    (True, "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    (True, "zstd"): "application/vnd.docker.image.rootfs.diff.tar.zstd",
    (True, "none"): "application/vnd.docker.image.rootfs.diff.tar",
}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# tar layers

Member = Callable[[tarfile.TarFile], None]


def _info(name: str, kind: bytes, **kw: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = kw.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.mtime = kw.pop("mtime", 1_700_000_000)
    info.uid = kw.pop("uid", 0)
    info.gid = kw.pop("gid", 0)
    xattrs = kw.pop("xattrs", None)
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def file(name: str, data: bytes, **kw: Any) -> Member:
    def add(t: tarfile.TarFile) -> None:
        info = _info(name, tarfile.REGTYPE, **kw)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    return add


def directory(name: str, **kw: Any) -> Member:
    return lambda t: t.addfile(_info(name, tarfile.DIRTYPE, **kw))


def symlink(name: str, target: str, **kw: Any) -> Member:
    return lambda t: t.addfile(_info(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **kw))


def hardlink(name: str, target: str, **kw: Any) -> Member:
    return lambda t: t.addfile(_info(name, tarfile.LNKTYPE, linkname=target, **kw))


def device(name: str, kind: bytes, major: int, minor: int, **kw: Any) -> Member:
    return lambda t: t.addfile(_info(name, kind, devmajor=major, devminor=minor, **kw))


def fifo(name: str, **kw: Any) -> Member:
    return lambda t: t.addfile(_info(name, tarfile.FIFOTYPE, **kw))


def whiteout(path: str) -> Member:
    parent, _, base = path.rpartition("/")
    return file(f"{parent + '/' if parent else ''}.wh.{base}", b"")


def opaque(dir_path: str) -> Member:
    return file(f"{dir_path}/.wh..wh..opq", b"")


def make_tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for add in members:
            add(t)
    return buf.getvalue()


def compress(tar: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(tar, compresslevel=6, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(tar)
    return tar


# ---------------------------------------------------------------------------------------------
# OCI layout


@dataclass
class Layer:
    blob: bytes
    diff_id: str
    media_type: str

    @property
    def digest(self) -> str:
        return sha(self.blob)


def layer(members: list[Member], kind: str = "gzip", docker: bool = False) -> Layer:
    tar = make_tar(members)
    return Layer(compress(tar, kind), sha(tar), LAYER_TYPES[(docker, kind)])


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.entries: list[dict[str, Any]] = []
        if (root / "index.json").exists():
            self.entries = json.loads((root / "index.json").read_text()).get("manifests", [])
        self._save()

    def blob(self, data: bytes) -> str:
        d = sha(data)
        (self.root / "blobs" / "sha256" / d[7:]).write_bytes(data)
        return d

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.partition(":")[2]

    def _save(self) -> None:
        (self.root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": self.entries}))

    def tag(self, media_type: str, data: bytes, tag: str) -> dict[str, Any]:
        desc = {"mediaType": media_type, "digest": self.blob(data), "size": len(data),
                "annotations": {"org.opencontainers.image.ref.name": tag}}
        self.entries = [e for e in self.entries if e.get("annotations", {}).get(
            "org.opencontainers.image.ref.name") != tag] + [desc]
        self._save()
        return desc

    def image(self, layers: list[Layer], *, docker: bool = False, tag: str = "",
              config_extra: dict[str, Any] | None = None, arch: str = "amd64") -> dict[str, Any]:
        """Write config + manifest (+ blobs); tag it if `tag`. Returns the manifest descriptor."""
        config = {"architecture": arch, "os": "linux",
                  "config": {"Env": ["PATH=/usr/bin"], "Cmd": ["/bin/sh"]},
                  "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in layers]},
                  **(config_extra or {})}
        config_bytes = json.dumps(config).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG, "digest": self.blob(config_bytes),
                       "size": len(config_bytes)},
            "layers": [{"mediaType": x.media_type, "digest": self.blob(x.blob), "size": len(x.blob)}
                       for x in layers],
        }
        data = json.dumps(manifest).encode()
        media_type = manifest["mediaType"]
        if tag:
            return self.tag(media_type, data, tag)
        return {"mediaType": media_type, "digest": self.blob(data), "size": len(data)}

    def index(self, entries: list[dict[str, Any]], *, docker: bool = False, tag: str = "") -> dict[str, Any]:
        doc = {"schemaVersion": 2, "mediaType": DOCKER_LIST if docker else OCI_INDEX, "manifests": entries}
        data = json.dumps(doc).encode()
        if tag:
            return self.tag(doc["mediaType"], data, tag)
        return {"mediaType": doc["mediaType"], "digest": self.blob(data), "size": len(data)}

    def manifest_bytes(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def resolve(self, tag: str) -> dict[str, Any]:
        for e in json.loads((self.root / "index.json").read_text())["manifests"]:
            if e.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                return e
        raise KeyError(tag)


def copy_layout(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    dst.chmod(0o755)
    return dst
