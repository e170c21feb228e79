"""Reading the two images: blobs fetched to local files (checked), JSON documents, and the pairing
of the converted image's platforms with the source's."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from obdconv.errors import BadInputError, IntegrityError, ObdconvError
from obdconv.registry.repository import Repository
from obdconv.verify.names import (
    COPY_CHUNK,
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    INDEX_TYPES,
    OCI_LAYER,
    OCI_LAYER_GZIP,
)
from obdconv.verify.report import ERROR, INFO, Finding, PlatformReport


def short(digest: str) -> str:
    return digest[:19]


def descriptor_str(desc: dict[str, Any], key: str) -> str:
    v = desc.get(key)
    return v if isinstance(v, str) else ""


def platform_key(p: dict[str, Any] | None) -> str:
    """"os/arch[/variant]", with arm64's default variant v8 dropped so both spellings match."""
    if not p:
        return "unknown"
    os_, arch, variant = p.get("os", ""), p.get("architecture", ""), p.get("variant", "")
    if arch == "arm64" and variant == "v8":
        variant = ""
    return f"{os_}/{arch}" + (f"/{variant}" if variant else "")


def normalise_platform_arg(p: str) -> str:
    parts = p.split("/")
    return platform_key({"os": parts[0], "architecture": parts[1] if len(parts) > 1 else "",
                         "variant": parts[2] if len(parts) > 2 else ""})


def is_attestation(entry: dict[str, Any]) -> bool:
    ann = entry.get("annotations") or {}
    return ann.get("vnd.docker.reference.type") == "attestation-manifest" or \
        platform_key(entry.get("platform")) == "unknown/unknown"


class Spool:
    """Blobs fetched to local files (LSMT and gzip readers need random access), each once, by digest."""
    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[str, Path] = {}

    def fetch(self, repo: Repository, digest: str, size: int | None) -> Path:
        """Download `digest` from `repo`, checking sha256 and size. Raises ObdconvError on mismatch."""
        if digest in self.paths:
            return self.paths[digest]
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest or ""):
            raise BadInputError(f"invalid blob digest {digest!r}")
        path = self.root / digest.split(":", 1)[1]
        h = hashlib.sha256()
        n = 0
        with repo.open_blob(digest) as src, open(path, "wb") as out:
            while chunk := src.read(COPY_CHUNK):
                h.update(chunk)
                n += len(chunk)
                out.write(chunk)
        actual = "sha256:" + h.hexdigest()
        if actual != digest:
            raise IntegrityError(f"content has sha256 {actual}, not {digest}")
        if size is not None and n != size:
            raise IntegrityError(f"blob is {n} bytes, descriptor says {size}")
        self.paths[digest] = path
        return path


def fetch_json(repo: Repository, spool: Spool, desc: dict[str, Any], report: PlatformReport, where: str) -> dict | None:
    digest = descriptor_str(desc, "digest")
    try:
        path = spool.fetch(repo, digest, desc.get("size"))
        return json.loads(path.read_bytes())
    except ObdconvError as e:
        report.add(ERROR, where, f"blob {short(digest)}: {e}")
    except (ValueError, RecursionError) as e:
        report.add(ERROR, where, f"blob {short(digest)} is not JSON: {e}")
    return None


def sniff_compression(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


def expected_target_media_type(source_media_type: str, compression: str) -> str:
    """Spec §3.7: Docker family iff the source layer type is a Docker one; gzip iff sniffed gzip."""
    docker = source_media_type.startswith("application/vnd.docker.")
    if compression == "gzip":
        return DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
    return DOCKER_LAYER if docker else OCI_LAYER


# ---------------------------------------------------------------------------------------------- manifests


@dataclass(slots=True)
class ImagePair:
    """One platform to verify: converted manifest (+digest) and source manifest (+digest)."""
    platform: str
    manifest: dict[str, Any]
    manifest_media_type: str
    manifest_digest: str
    source_manifest: dict[str, Any]
    source_digest: str


def _load(repo: Repository, ref: str) -> tuple[dict[str, Any], str, str]:
    m = repo.get_manifest(ref)
    try:
        obj = json.loads(m.data)
    except (ValueError, RecursionError) as e:
        raise BadInputError(f"manifest {ref} is not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise BadInputError(f"manifest {ref} is not a JSON object")
    media_type = obj.get("mediaType") or m.media_type
    return obj, media_type, m.digest


def _children(repo: Repository, index: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str, str]]:
    out: dict[str, tuple[dict[str, Any], str, str]] = {}
    for entry in index.get("manifests") or []:
        if is_attestation(entry):
            continue
        key = platform_key(entry.get("platform"))
        obj, mt, digest = _load(repo, descriptor_str(entry, "digest"))
        if mt in INDEX_TYPES:
            continue  # nested indexes carry no platform of their own (spec §4.5); not verified
        out.setdefault(key, (obj, mt, digest))
    return out


def _config_platform(repo: Repository, manifest: dict[str, Any]) -> str:
    desc = manifest.get("config") or {}
    try:
        with repo.open_blob(descriptor_str(desc, "digest")) as f:
            cfg = json.loads(f.read())
        return platform_key({"os": cfg.get("os", ""), "architecture": cfg.get("architecture", ""),
                             "variant": cfg.get("variant", "")})
    except (ObdconvError, ValueError, RecursionError):
        return "unknown"


def pair_platforms(converted: Repository, ref: str, source: Repository, source_ref: str, platform: str | None,
                   findings: list[Finding]) -> list[ImagePair]:
    """Match the converted image's platforms with the source's (a manifest or an index on each side)."""
    conv, conv_mt, conv_digest = _load(converted, ref)
    src, src_mt, src_digest = _load(source, source_ref)
    if conv_mt in INDEX_TYPES:
        conv_by = _children(converted, conv)
    else:
        conv_by = {_config_platform(converted, conv): (conv, conv_mt, conv_digest)}
    if src_mt in INDEX_TYPES:
        src_by = _children(source, src)
    else:
        src_by = {_config_platform(source, src): (src, src_mt, src_digest)}
    if conv_mt not in INDEX_TYPES and src_mt not in INDEX_TYPES:
        # Two single manifests: compare them whatever their configs say.
        only_key = next(iter(conv_by))
        src_by = {only_key: next(iter(src_by.values()))}
    wanted = normalise_platform_arg(platform) if platform else None
    pairs: list[ImagePair] = []
    for key in sorted(conv_by):
        if wanted and key != wanted:
            continue
        if key not in src_by:
            findings.append(Finding(ERROR, "index", f"platform {key} is in the converted image but not in the source"))
            continue
        c, cmt, cd = conv_by[key]
        s, _smt, sd = src_by[key]
        pairs.append(ImagePair(key, c, cmt, cd, s, sd))
    for key in sorted(set(src_by) - set(conv_by)):
        if not wanted or key == wanted:
            findings.append(Finding(INFO, "index", f"source platform {key} has no converted manifest (not verified)"))
    if wanted and not pairs:
        findings.append(Finding(ERROR, "index", f"platform {platform} is not present in both images"))
    return pairs
