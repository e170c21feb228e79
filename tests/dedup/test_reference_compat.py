"""Rows written with the reference's SQL are honoured (for the reference profile only), and rows we
write are readable by the reference's queries — never rows of another profile."""

from __future__ import annotations

from dataclasses import replace

import pytest

from obdconv.dedup.store import REFERENCE_PROFILE, DedupStore, uses_reference_tables
from obdconv.request import ConversionProfile
from tests.dedup import reference_sql as ref
from tests.dedup.conftest import Backend

HOST = "registry.test:5000"
CHAIN = "sha256:" + "c" * 64
SRC = "sha256:" + "5" * 64
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
TURBO = ConversionProfile("turbo", "ext4")
ZSTD = replace(REFERENCE_PROFILE, algorithm="zstd")
OTHER_PROFILES = [TURBO, ZSTD, replace(REFERENCE_PROFILE, vsize_gb=128), replace(REFERENCE_PROFILE, mkfs=False),
                  replace(REFERENCE_PROFILE, block_size=8192), ConversionProfile("turbo", "erofs")]


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def test_which_profiles_use_the_reference_tables() -> None:
    assert uses_reference_tables(REFERENCE_PROFILE)
    assert uses_reference_tables(ConversionProfile())  # the defaults are the reference's
    assert uses_reference_tables(replace(REFERENCE_PROFILE, engine_version="obdconv-2"))
    for p in OTHER_PROFILES:
        assert not uses_reference_tables(p), p


def test_reference_layer_rows_are_honoured_for_the_reference_profile_only(store: DedupStore, backend: Backend) -> None:
    backend.sql(ref.CREATE_LAYER, (HOST, "lib/a", CHAIN, digest(1), 1001))
    backend.sql(ref.CREATE_LAYER, (HOST, "lib/b", CHAIN, digest(1), 1001))
    got = store.get_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE)
    assert got is not None and (got.data_digest, got.data_size, got.from_reference) == (digest(1), 1001, True)
    assert sorted(r.repo for r in store.layers_on_host(HOST, CHAIN, REFERENCE_PROFILE)) == ["lib/a", "lib/b"]
    for p in OTHER_PROFILES:
        assert store.get_layer(HOST, "lib/a", CHAIN, p) is None
        assert store.layers_on_host(HOST, CHAIN, p) == []


def test_our_reference_profile_rows_are_readable_by_reference_queries(store: DedupStore, backend: Backend) -> None:
    store.record_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE, digest(2), 2002)
    assert backend.sql(ref.GET_LAYER_FOR_REPO, (HOST, "lib/a", CHAIN)) == [(HOST, "lib/a", CHAIN, digest(2), 2002)]
    assert backend.sql(ref.GET_CROSS_REPO_LAYERS, (HOST, CHAIN)) == [(HOST, "lib/a", CHAIN, digest(2), 2002)]
    store.record_manifest(HOST, "lib/a", SRC, OCI_MANIFEST, REFERENCE_PROFILE, digest(3), 733)
    assert backend.sql(ref.GET_MANIFEST_FOR_REPO, (HOST, "lib/a", SRC, OCI_MANIFEST)) == [
        (HOST, "lib/a", SRC, digest(3), 733, OCI_MANIFEST)]
    assert backend.sql(ref.GET_CROSS_REPO_MANIFESTS, (HOST, SRC, OCI_MANIFEST)) == [
        (HOST, "lib/a", SRC, digest(3), 733, OCI_MANIFEST)]


def test_other_profiles_never_reach_reference_queries(store: DedupStore, backend: Backend) -> None:
    for i, p in enumerate(OTHER_PROFILES):
        store.record_layer(HOST, "lib/a", CHAIN, p, digest(10 + i), 10 + i)
        store.record_manifest(HOST, "lib/a", SRC, OCI_MANIFEST, p, digest(30 + i), 30 + i)
    store.record_manifest(HOST, "lib/a", SRC, OCI_MANIFEST, REFERENCE_PROFILE, digest(50), 50, referrer=True)
    assert backend.sql(ref.GET_LAYER_FOR_REPO, (HOST, "lib/a", CHAIN)) == []
    assert backend.sql(ref.GET_CROSS_REPO_LAYERS, (HOST, CHAIN)) == []
    assert backend.sql(ref.GET_MANIFEST_FOR_REPO, (HOST, "lib/a", SRC, OCI_MANIFEST)) == []
    # ... while each profile finds exactly its own row.
    for i, p in enumerate(OTHER_PROFILES):
        got = store.get_layer(HOST, "lib/a", CHAIN, p)
        assert got is not None and got.data_digest == digest(10 + i)
        m = store.get_manifest(HOST, "lib/a", SRC, OCI_MANIFEST, p)
        assert m is not None and m.out_digest == digest(30 + i)
    assert store.get_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE) is None
    assert store.get_manifest(HOST, "lib/a", SRC, OCI_MANIFEST, REFERENCE_PROFILE) is None
    m = store.get_manifest(HOST, "lib/a", SRC, OCI_MANIFEST, REFERENCE_PROFILE, referrer=True)
    assert m is not None and m.out_digest == digest(50)


def test_reference_manifest_rows_honoured_per_media_type_and_not_for_referrer(store: DedupStore,
                                                                             backend: Backend) -> None:
    backend.sql(ref.CREATE_MANIFEST, (HOST, "lib/a", SRC, digest(4), 512, DOCKER_MANIFEST))
    got = store.get_manifest(HOST, "lib/a", SRC, DOCKER_MANIFEST, REFERENCE_PROFILE)
    assert got is not None and (got.out_digest, got.data_size, got.from_reference) == (digest(4), 512, True)
    assert store.get_manifest(HOST, "lib/a", SRC, OCI_MANIFEST, REFERENCE_PROFILE) is None
    # A reference manifest may lack `subject`: never reused for --referrer.
    assert store.get_manifest(HOST, "lib/a", SRC, DOCKER_MANIFEST, REFERENCE_PROFILE, referrer=True) is None
    assert store.get_manifest(HOST, "lib/a", SRC, DOCKER_MANIFEST, TURBO) is None
    assert [r.repo for r in store.manifests_on_host(HOST, SRC, DOCKER_MANIFEST, REFERENCE_PROFILE)] == ["lib/a"]


def test_record_is_idempotent_and_respects_existing_reference_rows(store: DedupStore, backend: Backend) -> None:
    backend.sql(ref.CREATE_LAYER, (HOST, "lib/a", CHAIN, digest(6), 600))
    for _ in range(3):
        store.record_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE, digest(7), 700)
    # The reference row is never updated (reference semantics); ours holds what we pushed.
    assert backend.sql(ref.GET_LAYER_FOR_REPO, (HOST, "lib/a", CHAIN)) == [(HOST, "lib/a", CHAIN, digest(6), 600)]
    got = store.get_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE)
    assert got is not None and (got.data_digest, got.from_reference) == (digest(7), False)
    assert backend.sql("select count(*) from obdconv_layers") == [(1,)]
    # A later push of the same key with another digest replaces our row, never duplicates it.
    store.record_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE, digest(8), 800)
    assert backend.sql("select data_digest, data_size from obdconv_layers") == [(digest(8), 800)]


def test_rows_we_mirrored_under_another_engine_version_are_not_reused(store: DedupStore) -> None:
    old_engine = replace(REFERENCE_PROFILE, engine_version="obdconv-0")
    store.record_layer(HOST, "lib/a", CHAIN, old_engine, digest(9), 900)
    assert store.get_layer(HOST, "lib/a", CHAIN, old_engine) is not None
    assert store.get_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE) is None
    assert store.layers_on_host(HOST, CHAIN, REFERENCE_PROFILE) == []
    store.record_manifest(HOST, "lib/a", SRC, OCI_MANIFEST, old_engine, digest(11), 11)
    assert store.get_manifest(HOST, "lib/a", SRC, OCI_MANIFEST, REFERENCE_PROFILE) is None


def test_delete_removes_only_the_stale_digest(store: DedupStore, backend: Backend) -> None:
    store.record_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE, digest(12), 12)
    store.delete_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE, digest(99))  # someone else's view: not ours
    assert store.get_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE) is not None
    store.delete_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE, digest(12))
    assert store.get_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE) is None
    assert backend.sql(ref.GET_LAYER_FOR_REPO, (HOST, "lib/a", CHAIN)) == []


@pytest.mark.parametrize("bad", ["", "h" * 256, "höst"])
def test_invalid_keys_are_rejected(store: DedupStore, bad: str) -> None:
    with pytest.raises(ValueError):
        store.record_layer(bad, "lib/a", CHAIN, REFERENCE_PROFILE, digest(1), 1)
    with pytest.raises(ValueError):
        store.record_layer(HOST, "lib/a", "not-a-digest", REFERENCE_PROFILE, digest(1), 1)
