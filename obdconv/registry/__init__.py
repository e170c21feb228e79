"""Registry access: pull and push manifests and blobs through oras-py (extended where it falls short),
or read and write an OCI image layout directory (`oci:PATH`) through the same `Repository` interface.

    from obdconv.registry import RegistryOptions, open_repository, parse_reference
    repo = open_repository("127.0.0.1:5000/library/hello", RegistryOptions(plain=True))
    manifest = repo.get_manifest("latest")          # Manifest(media_type, data, digest)
"""

from __future__ import annotations

from obdconv.registry.copy import copy_image
from obdconv.registry.options import RegistryOptions, split_user_password
from obdconv.registry.reference import Reference, parse_reference
from obdconv.registry.repository import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    ChunkSource,
    Manifest,
    PendingBlob,
    Repository,
)


def open_repository(name: str, options: RegistryOptions | None = None) -> Repository:
    """`name` is "host[:port]/path" (a tag or digest on it is ignored) or "oci:PATH"."""
    reference = parse_reference(name)
    if reference.layout:
        from obdconv.registry.layout import OCILayoutRepository

        return OCILayoutRepository(reference.repository)
    from obdconv.registry.client import RegistryRepository

    return RegistryRepository(reference.host, reference.repository, options or RegistryOptions())


__all__ = [
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "MANIFEST_MEDIA_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "ChunkSource",
    "Manifest",
    "PendingBlob",
    "Reference",
    "RegistryOptions",
    "Repository",
    "copy_image",
    "open_repository",
    "parse_reference",
    "split_user_password",
]
