"""Dedup lookups the pipeline calls: is this layer / manifest already converted, and where?

Order (reference-convertor.md §5.3/§5.4, with the fixes of §10.20-22):
* layer: the target repository's row, confirmed with a real HEAD (a row whose blob is gone is deleted
  and ignored) -> another repository on the same registry host, through a cross-repository mount
  (only a 201 counts; then a row for the target repository is recorded) -> None (convert it).
* manifest: the target repository's row, confirmed by fetching the manifest (gone -> row deleted), then
  re-tagged with the exact stored bytes -> another repository on the same host: mount its config and
  every layer (and, for turboOCI, every original layer the turbo layers point at), then push the exact
  manifest bytes and record a row -> None.

An OCI image layout (`oci:PATH`, `host == ""`) is never deduplicated: there is no registry host to
key rows on, and nothing to mount from.

Contract for `record_layer`/`record_manifest`: call them ONLY after the blob/manifest is in the target
repository (pushed, or mounted with a 201). A row is a promise to every other worker that the thing
exists. Re-recording the same row is harmless (idempotent), so a retried task may call them again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from obdconv.dedup.claims import DEFAULT_TTL, WaitOutcome, layer_claim_key, manifest_claim_key
from obdconv.dedup.store import DedupStore, manifest_profile_key
from obdconv.errors import NetworkError, NotFoundError
from obdconv.request import ConversionProfile

log = logging.getLogger(__name__)

TURBO_TARGET_DIGEST = "containerd.io/snapshot/overlaybd/turbo-oci/target-digest"


class ManifestLike(Protocol):
    media_type: str
    data: bytes
    digest: str


class RepositoryLike(Protocol):
    """The part of `obdconv.registry.Repository` the lookups use."""

    host: str
    name: str

    def head_blob(self, digest: str) -> int | None: ...
    def mount_blob(self, digest: str, from_repo: str) -> bool: ...
    def get_manifest(self, ref: str) -> Any: ...
    def put_manifest(self, data: bytes, media_type: str, ref: str | None = None) -> str: ...


def find_converted_layer(store: DedupStore, target: RepositoryLike, chain_id: str,
                         profile: ConversionProfile) -> tuple[str, int] | None:
    """(digest, size) of a conversion of `chain_id` with `profile` now present in `target`, or None."""
    if not store.enabled or not target.host:
        return None
    host, repo = target.host, target.name
    row = store.get_layer(host, repo, chain_id, profile)
    if row is not None:
        try:
            size = target.head_blob(row.data_digest)
        except NetworkError as e:  # the reference falls through on "other errors" too
            log.warning("checking %s in %s/%s failed (%s); trying other repositories", row.data_digest, host, repo, e)
        else:
            if size is not None and size == row.data_size:
                log.info("layer %s found in %s/%s as %s", chain_id, host, repo, row.data_digest)
                return row.data_digest, size
            log.info("dedup row for layer %s in %s/%s is stale (blob %s %s); deleting it", chain_id, host, repo,
                     row.data_digest, "missing" if size is None else f"has size {size}, row says {row.data_size}")
            store.delete_layer(host, repo, chain_id, profile, row.data_digest)
    for other in store.layers_on_host(host, chain_id, profile):
        if other.repo == repo:
            continue
        if target.mount_blob(other.data_digest, other.repo):
            log.info("layer %s mounted from %s/%s as %s", chain_id, host, other.repo, other.data_digest)
            store.record_layer(host, repo, chain_id, profile, other.data_digest, other.data_size)
            return other.data_digest, other.data_size
    return None


def record_layer(store: DedupStore, target: RepositoryLike, chain_id: str, profile: ConversionProfile,
                 data_digest: str, data_size: int) -> None:
    """Record a converted layer blob that IS in `target` (see the module contract)."""
    if store.enabled and target.host:
        store.record_layer(target.host, target.name, chain_id, profile, data_digest, data_size)


def find_converted_manifest(store: DedupStore, target: RepositoryLike, src_digest: str, media_type: str,
                            profile: ConversionProfile, tag: str | None = None, *, referrer: bool = False,
                            open_sibling: Callable[[str], RepositoryLike] | None = None) -> tuple[str, int] | None:
    """(digest, size) of a conversion of manifest `src_digest` now present in `target` (and tagged
    `tag` if given), or None. `open_sibling(repo_name)` opens another repository on the same registry
    (needed to read a manifest converted there); without it the cross-repository step is skipped."""
    if not store.enabled or not target.host:
        return None
    host, repo = target.host, target.name
    row = store.get_manifest(host, repo, src_digest, media_type, profile, referrer)
    if row is not None:
        manifest = _fetch_manifest(target, row.out_digest)
        # A manifest whose blobs were garbage-collected is as stale as a missing one: re-tagging it
        # would publish an image that cannot be pulled.
        if (manifest is None or manifest.media_type != media_type
                or any(target.head_blob(d) is None for d in _referenced_blobs(manifest.data))):
            log.info("dedup row for manifest %s in %s/%s is stale; deleting it", src_digest, host, repo)
            store.delete_manifest(host, repo, src_digest, media_type, profile, row.out_digest, referrer)
        else:
            if tag:
                target.put_manifest(manifest.data, media_type, tag)
            log.info("manifest %s found in %s/%s as %s", src_digest, host, repo, row.out_digest)
            return manifest.digest, len(manifest.data)
    if open_sibling is None:
        return None
    for other in store.manifests_on_host(host, src_digest, media_type, profile, referrer):
        if other.repo == repo:
            continue
        sibling = open_sibling(other.repo)
        manifest = _fetch_manifest(sibling, other.out_digest)
        if manifest is None:
            store.delete_manifest(host, other.repo, src_digest, media_type, profile, other.out_digest, referrer)
            continue
        if manifest.media_type != media_type or not _mount_all(target, _referenced_blobs(manifest.data), other.repo):
            continue
        digest = target.put_manifest(manifest.data, media_type, tag or manifest.digest)
        store.record_manifest(host, repo, src_digest, media_type, profile, digest, len(manifest.data), referrer)
        log.info("manifest %s mounted from %s/%s as %s", src_digest, host, other.repo, digest)
        return digest, len(manifest.data)
    return None


def record_manifest(store: DedupStore, target: RepositoryLike, src_digest: str, media_type: str,
                    profile: ConversionProfile, out_digest: str, data_size: int, referrer: bool = False) -> None:
    """Record a converted manifest that IS in `target` (see the module contract)."""
    if store.enabled and target.host:
        store.record_manifest(target.host, target.name, src_digest, media_type, profile, out_digest, data_size,
                              referrer)


def _fetch_manifest(repository: RepositoryLike, digest: str) -> ManifestLike | None:
    try:
        return repository.get_manifest(digest)  # type: ignore[no-any-return]
    except NotFoundError:
        return None


def _referenced_blobs(manifest_data: bytes) -> list[str]:
    """Config, layers, and the original layers turboOCI layers read their data from."""
    doc = json.loads(manifest_data)
    digests = [doc["config"]["digest"]] if isinstance(doc.get("config"), dict) else []
    for layer in doc.get("layers") or []:
        digests.append(layer["digest"])
        target = (layer.get("annotations") or {}).get(TURBO_TARGET_DIGEST)
        if target:
            digests.append(target)
    return list(dict.fromkeys(digests))


def _mount_all(target: RepositoryLike, digests: list[str], from_repo: str) -> bool:
    """Every blob mounted (201) or already present; False at the first that is neither, so a manifest
    is never pushed over missing blobs."""
    for digest in digests:
        if target.mount_blob(digest, from_repo):
            continue
        if target.head_blob(digest) is None:
            log.info("cannot mount %s from %s into %s/%s", digest, from_repo, target.host, target.name)
            return False
    return True


def owner_id() -> str:
    """A claim owner name unique to this process and thread (host/pid/thread/random), readable in the table."""
    return f"{socket.gethostname()}/{os.getpid()}/{threading.get_ident()}/{uuid.uuid4().hex[:8]}"


def converted_layer_or_claim(store: DedupStore, target: RepositoryLike, chain_id: str, profile: ConversionProfile,
                             owner: str, timeout: float, ttl: float = DEFAULT_TTL,
                             poll_interval: float = 0.5) -> WaitOutcome[tuple[str, int]]:
    """`find_converted_layer`, or — while another worker converts the same (host, chain id, profile) —
    wait for its result; `.lease` set means: convert it yourself inside `with outcome.lease:` and call
    `record_layer` before leaving the block. A disabled/unavailable store returns a no-op lease at once."""
    key = layer_claim_key(target.host or "oci", chain_id, profile)
    return store.wait_for(key, owner, lambda: find_converted_layer(store, target, chain_id, profile),
                          timeout, ttl, poll_interval)


def converted_manifest_or_claim(store: DedupStore, target: RepositoryLike, src_digest: str, media_type: str,
                                profile: ConversionProfile, tag: str | None, owner: str, timeout: float, *,
                                referrer: bool = False, open_sibling: Callable[[str], RepositoryLike] | None = None,
                                ttl: float = DEFAULT_TTL, poll_interval: float = 0.5) -> WaitOutcome[tuple[str, int]]:
    """The manifest counterpart of `converted_layer_or_claim` (key: host, repository, source digest,
    media type, profile incl. referrer mode)."""
    key = manifest_claim_key(target.host or "oci", target.name, src_digest, media_type,
                             manifest_profile_key(profile, referrer))
    return store.wait_for(key, owner, lambda: find_converted_manifest(
        store, target, src_digest, media_type, profile, tag, referrer=referrer, open_sibling=open_sibling),
        timeout, ttl, poll_interval)
