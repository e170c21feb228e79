"""The pipeline's lookups against a real registry and a real database: HEAD-checked hits, stale rows
deleted, cross-repository mounts recorded, manifests re-tagged or mounted with all their blobs."""

from __future__ import annotations

import json
import uuid
from typing import Any

from obdconv.dedup import lookup
from obdconv.dedup.store import REFERENCE_PROFILE, DedupStore, open_store
from obdconv.registry import OCI_MANIFEST, RegistryOptions, open_repository
from obdconv.request import ConversionProfile
from tests.dedup import reference_sql as ref
from tests.dedup.conftest import Backend

TURBO = ConversionProfile("turbo", "ext4")
CHAIN = "sha256:" + "c" * 64
SRC = "sha256:" + "5" * 64


def repo(registry: Any, name: str) -> Any:
    return open_repository(f"{registry.host}/{name}", RegistryOptions(plain=True))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def push_blob(r: Any, data: bytes) -> tuple[str, int]:
    return r.upload_blob([data])  # type: ignore[no-any-return]


def push_image(r: Any, tag: str, turbo_target: str | None = None) -> tuple[bytes, str, list[str]]:
    """A small OCI manifest with its config and one layer in `r`; returns (bytes, digest, blob digests)."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                         "nonce": uuid.uuid4().hex}).encode()
    cfg_digest, cfg_size = push_blob(r, config)
    layer_digest, layer_size = push_blob(r, b"converted layer " + uuid.uuid4().bytes)
    layer: dict[str, Any] = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                             "size": layer_size}
    blobs = [cfg_digest, layer_digest]
    if turbo_target is not None:
        layer["annotations"] = {lookup.TURBO_TARGET_DIGEST: turbo_target}
        blobs.append(turbo_target)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": cfg_digest, "size": cfg_size},
                           "layers": [layer]}).encode()
    digest = r.put_manifest(manifest, OCI_MANIFEST, tag)
    return manifest, digest, blobs


def test_disabled_store_finds_nothing(registry: Any) -> None:
    store = open_store("", "")
    assert not store.enabled and not store.available
    assert lookup.find_converted_layer(store, repo(registry, "lib/x"), CHAIN, REFERENCE_PROFILE) is None
    lookup.record_layer(store, repo(registry, "lib/x"), CHAIN, REFERENCE_PROFILE, "sha256:" + "1" * 64, 1)


def test_same_repo_hit_is_confirmed_by_head(store: DedupStore, registry: Any) -> None:
    target = repo(registry, unique("lib/a"))
    digest, size = push_blob(target, b"layer bytes")
    lookup.record_layer(store, target, CHAIN, REFERENCE_PROFILE, digest, size)
    assert lookup.find_converted_layer(store, target, CHAIN, REFERENCE_PROFILE) == (digest, size)
    assert lookup.find_converted_layer(store, target, CHAIN, TURBO) is None  # another profile: convert


def test_stale_row_is_deleted_and_not_reported(store: DedupStore, backend: Backend, registry: Any) -> None:
    target = repo(registry, unique("lib/a"))
    digest, size = push_blob(target, b"soon gone " + uuid.uuid4().bytes)
    # Written the reference's way AND ours: both must go when the blob is gone.
    backend.sql(ref.CREATE_LAYER, (target.host, target.name, CHAIN, digest, size))
    lookup.record_layer(store, target, CHAIN, REFERENCE_PROFILE, digest, size)
    target.delete_blob(digest)
    assert lookup.find_converted_layer(store, target, CHAIN, REFERENCE_PROFILE) is None
    assert store.get_layer(target.host, target.name, CHAIN, REFERENCE_PROFILE) is None
    assert backend.sql(ref.GET_LAYER_FOR_REPO, (target.host, target.name, CHAIN)) == []


def test_reference_written_row_is_used_after_head(store: DedupStore, backend: Backend, registry: Any) -> None:
    target = repo(registry, unique("lib/a"))
    digest, size = push_blob(target, b"made by the reference " + uuid.uuid4().bytes)
    backend.sql(ref.CREATE_LAYER, (target.host, target.name, CHAIN, digest, size))
    assert lookup.find_converted_layer(store, target, CHAIN, REFERENCE_PROFILE) == (digest, size)
    assert lookup.find_converted_layer(store, target, CHAIN, TURBO) is None


def test_cross_repo_mount_records_a_row_for_the_target(store: DedupStore, backend: Backend, registry: Any) -> None:
    source, target = repo(registry, unique("lib/a")), repo(registry, unique("lib/b"))
    digest, size = push_blob(source, b"shared layer " + uuid.uuid4().bytes)
    lookup.record_layer(store, source, CHAIN, TURBO, digest, size)  # turbo results are deduplicated too
    assert target.head_blob(digest) is None
    assert lookup.find_converted_layer(store, target, CHAIN, TURBO) == (digest, size)
    assert target.head_blob(digest) == size  # really mounted
    row = store.get_layer(target.host, target.name, CHAIN, TURBO)
    assert row is not None and (row.data_digest, row.data_size) == (digest, size)
    # A turbo row never reaches the reference table.
    assert backend.sql(ref.GET_CROSS_REPO_LAYERS, (target.host, CHAIN)) == []


def test_refused_mount_is_not_a_hit(store: DedupStore, registry: Any) -> None:
    source, target = repo(registry, unique("lib/a")), repo(registry, unique("lib/b"))
    digest, size = push_blob(source, b"deleted in source " + uuid.uuid4().bytes)
    lookup.record_layer(store, source, CHAIN, REFERENCE_PROFILE, digest, size)
    source.delete_blob(digest)  # the row in lib/a is stale: the mount answers 202, not 201
    assert lookup.find_converted_layer(store, target, CHAIN, REFERENCE_PROFILE) is None
    assert store.get_layer(target.host, target.name, CHAIN, REFERENCE_PROFILE) is None
    assert target.head_blob(digest) is None


def test_manifest_same_repo_hit_retags_the_exact_bytes(store: DedupStore, registry: Any) -> None:
    target = repo(registry, unique("lib/a"))
    data, digest, _ = push_image(target, "obd")
    lookup.record_manifest(store, target, SRC, OCI_MANIFEST, REFERENCE_PROFILE, digest, len(data))
    assert lookup.find_converted_manifest(store, target, SRC, OCI_MANIFEST, REFERENCE_PROFILE, "obd-again") == (
        digest, len(data))
    again = target.get_manifest("obd-again")
    assert again.data == data and again.digest == digest
    # Other media type, referrer mode or profile: not a hit.
    assert lookup.find_converted_manifest(store, target, SRC, "application/vnd.docker.distribution.manifest.v2+json",
                                          REFERENCE_PROFILE) is None
    assert lookup.find_converted_manifest(store, target, SRC, OCI_MANIFEST, REFERENCE_PROFILE, referrer=True) is None
    assert lookup.find_converted_manifest(store, target, SRC, OCI_MANIFEST, TURBO) is None


def test_stale_manifest_row_is_deleted(store: DedupStore, registry: Any) -> None:
    target = repo(registry, unique("lib/a"))
    gone = "sha256:" + "e" * 64
    lookup.record_manifest(store, target, SRC, OCI_MANIFEST, REFERENCE_PROFILE, gone, 100)
    assert lookup.find_converted_manifest(store, target, SRC, OCI_MANIFEST, REFERENCE_PROFILE, "t") is None
    assert store.get_manifest(target.host, target.name, SRC, OCI_MANIFEST, REFERENCE_PROFILE) is None


def test_manifest_cross_repo_mounts_every_blob_then_pushes(store: DedupStore, registry: Any) -> None:
    source, target = repo(registry, unique("lib/a")), repo(registry, unique("lib/b"))
    original_digest, _ = push_blob(source, b"original gzip layer " + uuid.uuid4().bytes)
    data, digest, blobs = push_image(source, "turbo", turbo_target=original_digest)
    lookup.record_manifest(store, source, SRC, OCI_MANIFEST, TURBO, digest, len(data))

    def open_sibling(name: str) -> Any:
        return repo(registry, name)

    hit = lookup.find_converted_manifest(store, target, SRC, OCI_MANIFEST, TURBO, "turbo", open_sibling=open_sibling)
    assert hit == (digest, len(data))
    assert all(target.head_blob(b) is not None for b in blobs)  # config, layer, and the turbo data layer
    assert target.get_manifest("turbo").data == data
    row = store.get_manifest(target.host, target.name, SRC, OCI_MANIFEST, TURBO)
    assert row is not None and row.out_digest == digest
    # Without a way to read the other repository, the cross-repository step is skipped.
    third = repo(registry, unique("lib/c"))
    assert lookup.find_converted_manifest(store, third, SRC, OCI_MANIFEST, TURBO, "turbo") is None


def test_manifest_cross_repo_with_a_missing_blob_pushes_nothing(store: DedupStore, registry: Any) -> None:
    source, target = repo(registry, unique("lib/a")), repo(registry, unique("lib/b"))
    data, digest, blobs = push_image(source, "obd")
    lookup.record_manifest(store, source, SRC, OCI_MANIFEST, REFERENCE_PROFILE, digest, len(data))
    source.delete_blob(blobs[1])  # the layer can no longer be mounted
    hit = lookup.find_converted_manifest(store, target, SRC, OCI_MANIFEST, REFERENCE_PROFILE, "obd",
                                         open_sibling=lambda name: repo(registry, name))
    assert hit is None
    assert target.head_manifest("obd") is None
    assert store.get_manifest(target.host, target.name, SRC, OCI_MANIFEST, REFERENCE_PROFILE) is None


def test_oci_layout_targets_are_never_deduplicated(store: DedupStore, backend: Backend, tmp_path: Any) -> None:
    layout = open_repository(f"oci:{tmp_path / 'layout'}")
    assert layout.host == ""
    lookup.record_layer(store, layout, CHAIN, REFERENCE_PROFILE, "sha256:" + "1" * 64, 1)
    lookup.record_manifest(store, layout, SRC, OCI_MANIFEST, REFERENCE_PROFILE, "sha256:" + "2" * 64, 2)
    assert backend.sql("select count(*) from obdconv_layers") == [(0,)]
    assert backend.sql("select count(*) from obdconv_manifests") == [(0,)]
    assert lookup.find_converted_layer(store, layout, CHAIN, REFERENCE_PROFILE) is None
    assert lookup.find_converted_manifest(store, layout, SRC, OCI_MANIFEST, REFERENCE_PROFILE, "t") is None


def test_second_worker_waits_for_the_first_workers_layer(store: DedupStore, registry: Any) -> None:
    import threading
    import time

    first_repo, second_repo = repo(registry, unique("lib/a")), repo(registry, unique("lib/b"))
    chain = "sha256:" + uuid.uuid4().hex * 2
    first = lookup.converted_layer_or_claim(store, first_repo, chain, REFERENCE_PROFILE, lookup.owner_id(), timeout=5)
    assert first.result is None and first.lease is not None  # nobody converted it: ours to do
    pushed: dict[str, tuple[str, int]] = {}

    def convert_and_record() -> None:
        with first.lease:  # type: ignore[union-attr]
            time.sleep(0.6)
            pushed["layer"] = push_blob(first_repo, b"the converted layer " + uuid.uuid4().bytes)
            lookup.record_layer(store, first_repo, chain, REFERENCE_PROFILE, *pushed["layer"])

    t = threading.Thread(target=convert_and_record)
    t.start()
    # Another repository on the same host: same claim key (host, chain, profile), so it waits, then
    # gets the first worker's blob by cross-repository mount instead of converting it again.
    second = lookup.converted_layer_or_claim(store, second_repo, chain, REFERENCE_PROFILE, lookup.owner_id(),
                                             timeout=20, poll_interval=0.05)
    t.join()
    assert second.lease is None and second.result == pushed["layer"]
    assert second_repo.head_blob(pushed["layer"][0]) == pushed["layer"][1]
