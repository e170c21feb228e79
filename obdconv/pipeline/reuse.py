"""Dedup in the local runner: what of a manifest is already converted, and recording what was made.

Order (per manifest, per output format): a converted manifest (re-tagged when it is the root) ->
else the LEADING run of converted layers 0..k-1 (a hit above a miss is ignored: a layer's blob
depends on the exact ext4 state below it, and ours may differ from whoever made that hit) -> the
rest is converted on top of those layers read back (`parents.read_back_parents`).

Calls the dedup area's `find_converted_*` / `record_*` (which confirm rows with real HEADs, mount
across repositories and delete stale rows). With `--no-upload` no lookup is made (a hit would
re-tag or mount, i.e. write to the registry) and nothing is recorded.

Claims: a manifest not found converted is claimed per (host, repository, source digest, output
media type, profile) before any work (`store.wait_for`): if another runner or worker holds the claim
we wait for its result (up to `claim_timeout`, then ClaimTimeoutError) instead of converting the
same thing twice. The lease heartbeats while we convert and is released after the manifest is
pushed and recorded. Layers are claimed the same way per (host, chain id, profile), in chain order:
a layer another converter is making is waited for and then reused (its parents read back), so two
images sharing base layers converted at once make each shared layer once. Lookups and claims run in
the manifest's own thread, in chain order, so no two converters can wait on each other.

Two ways to meet a claim someone else holds (`Reuse(wait=...)`):
* `wait=True` (the local runner): block in `store.wait_for` until the holder's result appears or its
  lease expires; leases we take heartbeat from a thread of this process until `release()`.
* `wait=False` (the Celery fleet): never block a worker slot; `lookup` raises `ClaimHeld` after
  releasing whatever it took, and the caller retries the lookup later. Leases taken are returned
  un-entered (no heartbeat thread): a conversion spans several tasks on several workers, so each
  task of the owning request heartbeats the claims while it runs (tasks/claims.py), and the owner
  name is stable for the request so a redelivered task re-takes its own claims.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from obdconv.dedup.claims import DEFAULT_TTL, Lease, WaitOutcome, layer_claim_key, manifest_claim_key
from obdconv.dedup.lookup import find_converted_layer, find_converted_manifest, record_layer, record_manifest
from obdconv.dedup.store import DedupStore, manifest_profile_key
from obdconv.oci import mediatypes as mt
from obdconv.pipeline.annotations import layer_annotations, layer_media_type, manifest_media_type
from obdconv.pipeline.assemble import ConvertedLayer
from obdconv.pipeline.parents import turbo_hit_facts
from obdconv.pipeline.plan import ManifestPlan
from obdconv.pipeline.push import PushedManifest
from obdconv.request import ConversionProfile

log = logging.getLogger(__name__)


class ClaimHeld(Exception):  # control flow ("come back later"), not an ObdconvError
    """`Reuse(wait=False).lookup`: another converter holds the claim on `key`; nothing is held now."""

    def __init__(self, key: str) -> None:
        super().__init__(f"claim {key} is held by another converter")
        self.key = key


@dataclass(slots=True)
class ManifestReuse:
    manifests: dict[str, PushedManifest] = field(default_factory=dict)  # format -> converted manifest found
    layers: dict[str, list[ConvertedLayer]] = field(default_factory=dict)  # format -> leading layer hits
    leases: list[Lease] = field(default_factory=list)  # claims we hold while converting

    def release(self) -> None:
        for lease in self.leases:
            lease.release()
        self.leases.clear()

    def todo(self, profiles: list[ConversionProfile]) -> list[ConversionProfile]:
        return [p for p in profiles if p.format not in self.manifests]

    def start(self, profiles: list[ConversionProfile]) -> int:
        """First layer index some remaining format has to convert (0 when nothing was found)."""
        todo = self.todo(profiles)
        return min((len(self.layers.get(p.format, [])) for p in todo), default=0)


class Reuse:
    def __init__(self, store: DedupStore, target_repo: Any, open_sibling: Callable[[str], Any], *, oci: bool,
                 referrer: bool, enabled: bool, claim_timeout: float = 3600.0, wait: bool = True,
                 ttl: float = DEFAULT_TTL, owner: str = "") -> None:
        self.store = store
        self.target = target_repo
        self.open_sibling = open_sibling
        self.oci = oci
        self.referrer = referrer
        self.enabled = enabled and store.enabled
        self.claim_timeout = claim_timeout
        self.wait = wait
        self.ttl = ttl
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def _claim_or_result(self, key: str, find: Callable[[], tuple[str, int] | None]) -> WaitOutcome[tuple[str, int]]:
        if self.wait:
            return self.store.wait_for(key, self.owner, find, self.claim_timeout, self.ttl)
        # One round of `wait_for`, without the waiting.
        found = find()
        if found is not None:
            return WaitOutcome(result=found)
        if self.store.claim(key, self.owner, self.ttl):
            found = find()
            if found is not None:  # recorded and released between our two steps
                self.store.release(key, self.owner)
                return WaitOutcome(result=found)
            return WaitOutcome(lease=Lease(self.store, key, self.owner, self.ttl))
        raise ClaimHeld(key)

    def _hold(self, lease: Lease) -> Lease:
        return lease.__enter__() if self.wait else lease  # heartbeat thread only in the waiting mode

    def lookup(self, m: ManifestPlan, profiles: list[ConversionProfile], tags: dict[str, str]) -> ManifestReuse:
        out = ManifestReuse()
        if not self.enabled:
            return out
        try:
            self._lookup(out, m, profiles, tags)
        except BaseException:
            out.release()  # never keep claims we will not use (a retry takes them again)
            raise
        return out

    def _lookup(self, out: ManifestReuse, m: ManifestPlan, profiles: list[ConversionProfile],
                tags: dict[str, str]) -> None:
        media_type = manifest_media_type(self.oci)
        for p in profiles:
            tag = tags.get(p.format) or None

            def find(p: ConversionProfile = p, tag: str | None = tag) -> tuple[str, int] | None:
                return find_converted_manifest(self.store, self.target, m.digest, media_type, p, tag,
                                               referrer=self.referrer, open_sibling=self.open_sibling)

            key = manifest_claim_key(self.target.host, self.target.name, m.digest, media_type,
                                     manifest_profile_key(p, self.referrer))
            outcome = self._claim_or_result(key, find)
            hit = outcome.result
            if outcome.lease is not None:
                out.leases.append(self._hold(outcome.lease))  # heartbeat until released
            if hit is not None:
                log.info("manifest %s already converted (%s): %s", m.digest, p.format, hit[0])
                out.manifests[p.format] = PushedManifest(media_type, hit[0], hit[1], "", [])
                continue
            if p.flatten:  # one layer made of the whole chain: deduplicated per manifest only
                out.layers[p.format] = []
                continue
            layers: list[ConvertedLayer] = []
            for i, chain_id in enumerate(m.chain_ids):

                def find_layer(chain_id: str = chain_id, p: ConversionProfile = p) -> tuple[str, int] | None:
                    return find_converted_layer(self.store, self.target, chain_id, p)

                key = layer_claim_key(self.target.host, chain_id, p)
                layer_outcome = self._claim_or_result(key, find_layer)
                if layer_outcome.result is not None:
                    layers.append(self._layer(p.format, *layer_outcome.result, m.layers[i]))
                    continue
                assert layer_outcome.lease is not None
                out.leases.append(self._hold(layer_outcome.lease))
                # Layers above are ours to convert too; claim them without waiting (anyone else
                # converting the same chain would have had to get past our claim on this layer).
                for chain_above in m.chain_ids[i + 1:]:
                    lease = self.store.acquire(layer_claim_key(self.target.host, chain_above, p), self.owner,
                                               self.ttl)
                    if lease is not None:
                        out.leases.append(self._hold(lease))
                break
            if layers:
                log.info("manifest %s (%s): layers 0..%d already converted", m.digest, p.format, len(layers) - 1)
            out.layers[p.format] = layers

    def _layer(self, fmt: str, digest: str, size: int, source: dict[str, Any]) -> ConvertedLayer:
        if fmt == "native":
            return ConvertedLayer(digest, size, layer_media_type(fmt, self.oci), digest,
                                  layer_annotations(fmt, digest, size))
        diff_id, is_gzip = turbo_hit_facts(self.target, digest)
        target_type = mt.turbo_target_media_type(source.get("mediaType", ""), is_gzip)
        return ConvertedLayer(digest, size, layer_media_type(fmt, self.oci), diff_id,
                              layer_annotations(fmt, digest, size, target_digest=source["digest"],
                                                target_media_type=target_type))

    def record_layer(self, profile: ConversionProfile, chain_id: str, layer: ConvertedLayer) -> None:
        if self.enabled:
            record_layer(self.store, self.target, chain_id, profile, layer.digest, layer.size)

    def record_manifest(self, profile: ConversionProfile, m: ManifestPlan, pushed: PushedManifest) -> None:
        if self.enabled:
            record_manifest(self.store, self.target, m.digest, pushed.media_type, profile, pushed.digest,
                            pushed.size, self.referrer)
