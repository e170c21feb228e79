"""Copy an image (index -> manifests -> config and layers) between repositories, byte for byte.

Used to seed registries from OCI layout fixtures and to mirror images; manifests keep their exact bytes,
so every digest is unchanged. Children are pushed before their parents (a registry refuses a manifest
whose blobs it lacks).
"""

from __future__ import annotations

import json
from typing import Any

from obdconv.errors import FormatError
from obdconv.registry.repository import DOCKER_MANIFEST_LIST, OCI_INDEX, Manifest, Repository


def _descriptors(manifest: Manifest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(child manifests, blobs) a manifest or index refers to."""
    try:
        doc = json.loads(manifest.data)
    except ValueError as e:
        raise FormatError(f"manifest {manifest.digest} is not JSON: {e}") from None
    if manifest.media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST):
        return list(doc.get("manifests") or []), []
    blobs = [doc["config"]] if isinstance(doc.get("config"), dict) else []
    blobs.extend(doc.get("layers") or [])
    return [], blobs


def copy_image(source: Repository, target: Repository, ref: str, target_tag: str | None = None,
               mount: bool = True) -> Manifest:
    """Copy `ref` (tag or digest) from `source` to `target`, tagging it `target_tag` (default: `ref` if it
    is a tag). Blobs already in `target` are skipped; same-registry sources are mounted when possible."""
    manifest = source.get_manifest(ref)
    _copy_manifest(source, target, manifest, mount)
    tag = target_tag if target_tag is not None else ("" if ref.startswith("sha256:") else ref)
    target.put_manifest(manifest.data, manifest.media_type, tag or manifest.digest)
    return manifest


def _copy_manifest(source: Repository, target: Repository, manifest: Manifest, mount: bool) -> None:
    children, blobs = _descriptors(manifest)
    same_registry = mount and source.host and source.host == target.host
    for blob in blobs:
        digest, size = blob["digest"], int(blob["size"])
        if target.head_blob(digest) is not None:
            continue
        if same_registry and target.mount_blob(digest, source.name):
            continue
        with source.open_blob(digest) as f:
            target.push_blob(f, digest, size)
    for child in children:
        child_manifest = source.get_manifest(child["digest"])
        _copy_manifest(source, target, child_manifest, mount)
        target.put_manifest(child_manifest.data, child_manifest.media_type, child_manifest.digest)
