"""Dedup hooks of the fleet (obdconv.dedup does the work): manifest hits short-cut a whole
request before any layer is touched; converted layers and manifests are recorded after they are
in the target repository (idempotent upserts: a redelivered task records the same row again).

Registries only: an `oci:` layout has no host, so it is never deduplicated.
"""

from __future__ import annotations

import logging
from typing import Any

from obdconv.dedup.lookup import find_converted_manifest, record_layer, record_manifest
from obdconv.pipeline.annotations import manifest_media_type
from obdconv.pipeline.request import ConversionProfile, ConversionRequest
from tasks.context import dedup_store, open_repository

log = logging.getLogger(__name__)


def _usable(target: Any) -> Any:
    store = dedup_store()
    return store if store is not None and store.enabled and getattr(target, "host", "") else None


def find_manifest_hits(request: ConversionRequest, target: Any, source_digest: str,
                       tags: dict[str, str]) -> dict[str, dict[str, Any]] | None:
    """{format: output} when EVERY requested format of this root manifest is already converted
    (re-tagged by the lookup), else None (convert)."""
    store = _usable(target)
    if store is None:
        return None
    media_type = manifest_media_type(request.oci or request.referrer)

    def open_sibling(name: str) -> Any:
        return open_repository(f"{target.host}/{name}", request.access)

    outputs = {}
    for profile in request.profiles():
        hit = find_converted_manifest(store, target, source_digest, media_type, profile, tags[profile.format] or None,
                                      referrer=request.referrer, open_sibling=open_sibling)
        if hit is None:
            return None
        outputs[profile.format] = {"tag": tags[profile.format], "digest": hit[0], "mediaType": media_type,
                                   "size": hit[1], "dedup": True}
    log.info("manifest %s already converted for every format: %s", source_digest, outputs)
    return outputs


def remember_layer(target: Any, chain_id: str, profile: ConversionProfile, digest: str, size: int) -> None:
    store = _usable(target)
    if store is not None:
        record_layer(store, target, chain_id, profile, digest, size)


def remember_manifest(request: ConversionRequest, target: Any, source_digest: str, profile: ConversionProfile,
                      media_type: str, digest: str, size: int) -> None:
    store = _usable(target)
    if store is not None:
        record_manifest(store, target, source_digest, media_type, profile, digest, size, request.referrer)
