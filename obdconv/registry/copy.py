"""Copy an image (index -> manifests -> config and layers) between repositories, byte for byte.

Used to seed registries from OCI layout fixtures and to mirror images; manifests keep their exact bytes,
so every digest is unchanged. Children are pushed before their parents (a registry refuses a manifest
whose blobs it lacks).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from obdconv.errors import FormatError
from obdconv.registry.repository import DOCKER_MANIFEST_LIST, OCI_INDEX, Manifest, Repository


def _descriptors(manifest: Manifest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(child manifests, blobs) a manifest or index refers to."""
    try:
        doc = json.loads(manifest.data)
    except (ValueError, RecursionError) as e:
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
    """Copy what `manifest` refers to, children before parents. Iterative (nested indexes come from
    the source registry; their depth is its choice), a stack of (index, children not yet copied)."""
    same_registry = mount and source.host and source.host == target.host
    stack: list[tuple[Manifest, Iterator[dict[str, Any]]]] = []
    current: Manifest | None = manifest
    while True:
        if current is not None:
            children, blobs = _descriptors(current)
            for blob in blobs:
                _copy_blob(source, target, blob, bool(same_registry))
            stack.append((current, iter(children)))
            current = None
        parent, pending = stack[-1]
        child = next(pending, None)
        if child is not None:
            current = source.get_manifest(child["digest"])
            continue
        stack.pop()
        if not stack:
            return  # the top manifest: the caller puts it with its tag
        target.put_manifest(parent.data, parent.media_type, parent.digest)


def _copy_blob(source: Repository, target: Repository, blob: dict[str, Any], same_registry: bool) -> None:
    digest, size = blob["digest"], int(blob["size"])
    if target.head_blob(digest) is not None:
        return
    if same_registry and target.mount_blob(digest, source.name):
        return
    with source.open_blob(digest) as f:
        target.push_blob(f, digest, size)
