"""What a docker-registry's filesystem storage says about a repository, read from disk (not through
the API, so the checks do not depend on the code under test): tags and every digest a tag ever
pointed to, manifests whose blobs are missing, open upload sessions, linked blobs."""

from __future__ import annotations

import json
from pathlib import Path

from tests.services.registry import RegistryService


def _repo_dir(registry: RegistryService, repo: str) -> Path:
    return registry.storage_dir / "docker" / "registry" / "v2" / "repositories" / repo


def _digests_under(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(f"sha256:{p.name}" for p in directory.iterdir() if (p / "link").is_file())


def tag_target(registry: RegistryService, repo: str, tag: str) -> str | None:
    link = _repo_dir(registry, repo) / "_manifests" / "tags" / tag / "current" / "link"
    return link.read_text().strip() if link.is_file() else None


def tag_history(registry: RegistryService, repo: str, tag: str) -> list[str]:
    """Every manifest digest `tag` has ever pointed to (distribution keeps an index of them)."""
    return _digests_under(_repo_dir(registry, repo) / "_manifests" / "tags" / tag / "index" / "sha256")


def linked_blobs(registry: RegistryService, repo: str) -> set[str]:
    """Blobs (layers and configs) linked into the repository."""
    return set(_digests_under(_repo_dir(registry, repo) / "_layers" / "sha256"))


def manifests(registry: RegistryService, repo: str) -> list[str]:
    return _digests_under(_repo_dir(registry, repo) / "_manifests" / "revisions" / "sha256")


def blob_bytes(registry: RegistryService, digest: str) -> bytes | None:
    path = registry.blob_data_path(digest)
    return path.read_bytes() if path.is_file() else None


def dangling_references(registry: RegistryService, repo: str) -> list[str]:
    """"manifest -> digest" for every blob or child manifest a stored manifest names that the
    repository cannot serve (not linked, or its data missing)."""
    linked = linked_blobs(registry, repo)
    revisions = set(manifests(registry, repo))
    problems = []
    for digest in revisions:
        data = blob_bytes(registry, digest)
        if data is None:
            problems.append(f"{digest} -> (its own data)")
            continue
        doc = json.loads(data)
        children = [m["digest"] for m in doc.get("manifests", [])]
        blobs = [d["digest"] for d in [doc.get("config") or {}, *doc.get("layers", [])] if d]
        problems += [f"{digest} -> {c}" for c in children if c not in revisions]
        problems += [f"{digest} -> {b}" for b in blobs if b not in linked or blob_bytes(registry, b) is None]
    return problems


def open_uploads(registry: RegistryService, repo: str) -> list[str]:
    """Upload sessions still holding bytes. (A cancelled session leaves only its `hashstates`
    behind in this docker-registry version: its data and `startedat` are gone.)"""
    uploads = _repo_dir(registry, repo) / "_uploads"
    if not uploads.is_dir():
        return []
    return sorted(p.name for p in uploads.iterdir() if (p / "data").exists() or (p / "startedat").exists())


def manifest_blobs(registry: RegistryService, digest: str) -> list[str]:
    """The config and layer digests of a stored image manifest."""
    data = blob_bytes(registry, digest)
    assert data is not None, f"manifest {digest} not stored"
    doc = json.loads(data)
    return [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]
