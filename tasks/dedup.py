"""Dedup hooks of the fleet (obdconv.dedup does the work, through the local runner's
obdconv/pipeline/reuse.py): lookups and claims per manifest before any layer is touched (see
tasks/canvas.py); converted layers and manifests are recorded after they are in the target
repository (idempotent upserts: a redelivered task records the same row again).

Registries only: an `oci:` layout has no host, so it is never deduplicated.
"""

from __future__ import annotations

import logging
from typing import Any

from obdconv.dedup.lookup import record_layer, record_manifest
from obdconv.pipeline.reuse import Reuse
from obdconv.request import ConversionProfile, ConversionRequest
from tasks.context import open_repository, settings
from workers import metrics
from workers.database import dedup_store

log = logging.getLogger(__name__)


def _usable(target: Any) -> Any:
    store = dedup_store()
    return store if store is not None and store.enabled and getattr(target, "host", "") else None


def fleet_reuse(request: ConversionRequest, target: Any, owner: str) -> Reuse | None:
    """The local runner's lookups and claims (obdconv/pipeline/reuse.py) in the fleet's mode: never
    waiting inside a task (`ClaimHeld` instead), leases heartbeated by the request's tasks under
    `owner`. None when there is nothing to deduplicate against (no database, `oci:` target,
    `no_upload`: a hit would re-tag or mount, i.e. write to the registry)."""
    store = _usable(target)
    if store is None or request.no_upload:
        return None

    def open_sibling(name: str) -> Any:
        return open_repository(f"{target.host}/{name}", request.access)

    s = settings()
    return Reuse(store, MountCounting(target), open_sibling, oci=request.oci or request.referrer, referrer=request.referrer,
                 enabled=True, claim_timeout=float(s.claim_timeout), wait=False, ttl=float(s.claim_ttl), owner=owner)


class MountCounting:
    """The target repository as the dedup lookups see it, counting each blob mounted from another
    repository (a 201) in the metrics (`cross_repo_mount`); everything else passes through."""

    def __init__(self, repository: Any) -> None:
        self._repository = repository

    def __getattr__(self, name: str) -> Any:
        return getattr(self._repository, name)

    def mount_blob(self, digest: str, from_repo: str) -> bool:
        mounted = bool(self._repository.mount_blob(digest, from_repo))
        if mounted:
            metrics.count_dedup("cross_repo_mount")
        return mounted


def remember_layer(target: Any, chain_id: str, profile: ConversionProfile, digest: str, size: int) -> None:
    store = _usable(target)
    if store is not None:
        record_layer(store, target, chain_id, profile, digest, size)


def remember_manifest(request: ConversionRequest, target: Any, source_digest: str, profile: ConversionProfile,
                      media_type: str, digest: str, size: int) -> None:
    store = _usable(target)
    if store is not None:
        record_manifest(store, target, source_digest, media_type, profile, digest, size, request.referrer)
