"""A plain-HTTP docker-registry: manifests of all four types, streamed blobs, mounts, integrity, failures."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from obdconv.errors import BadInputError, IntegrityError, NetworkError, NotFoundError
from obdconv.registry import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryOptions,
    open_repository,
)
from obdconv.registry.copy import copy_image
from obdconv.registry.repository import Repository
from tests.services.base import free_port
from tests.services.registry import RegistryService, start_registry

TAGS = ["amd64", "amd64-converted", "arm64", "docker-list"]
PLAIN = RegistryOptions(plain=True)


def _repo(registry: RegistryService, name: str, **options: object) -> Repository:
    return open_repository(f"{registry.host}/{name}", RegistryOptions(plain=True, **options))  # type: ignore[arg-type]


def _fixture_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()


def _access_log(registry: RegistryService) -> str:
    return registry.process.log_path.read_text(errors="replace")


def test_round_trip_of_whole_hello_world(registry: RegistryService, hello_world_layout: Path, tmp_path: Path) -> None:
    source = open_repository(f"oci:{hello_world_layout}")
    remote = _repo(registry, "regtest/hello-world")
    for tag in TAGS:
        copy_image(source, remote, tag)
    assert set(TAGS) <= set(remote.list_tags())

    back = open_repository(f"oci:{tmp_path / 'back'}")
    for tag in TAGS:
        copy_image(remote, back, tag)

    docker_list = json.loads(_fixture_blob(hello_world_layout, source.get_manifest("docker-list").digest))
    assert len(docker_list["manifests"]) == 9
    checked_blobs = 0
    for tag in TAGS:
        expected = source.get_manifest(tag)
        for repo in (remote, back):
            got = repo.get_manifest(tag)
            assert (got.data, got.digest, got.media_type) == (expected.data, expected.digest, expected.media_type)
    for child in docker_list["manifests"]:
        child_bytes = _fixture_blob(hello_world_layout, child["digest"])
        for repo in (remote, back):
            got = repo.get_manifest(child["digest"])
            assert got.data == child_bytes and got.media_type == child["mediaType"] == DOCKER_MANIFEST
            doc = json.loads(child_bytes)
            for blob in [doc["config"], *doc["layers"]]:
                assert repo.read_blob(blob["digest"]) == _fixture_blob(hello_world_layout, blob["digest"])
                assert repo.head_blob(blob["digest"]) == blob["size"]
                checked_blobs += 1
    assert checked_blobs == 2 * 9 * 2
    converted = json.loads(source.get_manifest("amd64-converted").data)
    for blob in [converted["config"], *converted["layers"]]:
        assert remote.read_blob(blob["digest"]) == _fixture_blob(hello_world_layout, blob["digest"])


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")
def test_pushed_manifests_read_by_skopeo(registry: RegistryService, hello_world_layout: Path) -> None:
    source = open_repository(f"oci:{hello_world_layout}")
    remote = _repo(registry, "regtest/skopeo")
    copy_image(source, remote, "docker-list")
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{registry.host}/regtest/skopeo:docker-list"],
                         capture_output=True, check=True, timeout=60).stdout
    assert raw == source.get_manifest("docker-list").data


def test_all_four_manifest_media_types(registry: RegistryService, hello_world_layout: Path) -> None:
    source = open_repository(f"oci:{hello_world_layout}")
    remote = _repo(registry, "regtest/types")
    copy_image(source, remote, "amd64")
    converted = copy_image(source, remote, "amd64-converted")
    copy_image(source, remote, "docker-list")
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": converted.digest, "size": converted.size,
         "platform": {"architecture": "amd64", "os": "linux"}}]}, indent=3).encode()
    index_digest = remote.put_manifest(index, OCI_INDEX, "oci-index")
    assert index_digest == "sha256:" + hashlib.sha256(index).hexdigest()
    expected = {"amd64": DOCKER_MANIFEST, "amd64-converted": OCI_MANIFEST, "docker-list": DOCKER_MANIFEST_LIST,
                "oci-index": OCI_INDEX}
    for tag, media_type in expected.items():
        manifest = remote.get_manifest(tag)
        assert manifest.media_type == media_type
        assert manifest.digest == "sha256:" + hashlib.sha256(manifest.data).hexdigest()
        assert remote.head_manifest(tag) == manifest.digest
    assert remote.get_manifest("oci-index").data == index  # exact bytes, not re-serialised


def test_not_found_names_the_reference(registry: RegistryService) -> None:
    repo = _repo(registry, "regtest/missing")
    with pytest.raises(NotFoundError, match="regtest/missing:nope"):
        repo.get_manifest("nope")
    digest = "sha256:" + "1" * 64
    with pytest.raises(NotFoundError, match=digest):
        repo.open_blob(digest)
    assert repo.head_blob(digest) is None
    assert repo.head_manifest("nope") is None


@pytest.mark.parametrize(("mode", "expected_patches"), [("chunks", 5), ("stream", 1)])
def test_upload_is_streamed_in_bounded_chunks(registry: RegistryService, mode: str, expected_patches: int) -> None:
    name = f"regtest/chunks-{mode}"
    repo = _repo(registry, name, upload_chunk_size=64 * 1024, upload_mode=mode)
    rng = random.Random(7)
    parts = [rng.randbytes(n) for n in (1, 70_000, 5, 200_000, 3)]  # 270,009 bytes = 5 pieces of <= 64 KiB
    payload = b"".join(parts)
    marker = f'"PATCH /v2/{name}/'
    patches_before = _access_log(registry).count(marker)
    digest, size = repo.upload_blob(iter(parts))
    assert (digest, size) == ("sha256:" + hashlib.sha256(payload).hexdigest(), len(payload))
    assert _access_log(registry).count(marker) - patches_before == expected_patches
    assert repo.read_blob(digest) == payload


def test_push_blob_checks_digest_and_skips_existing(registry: RegistryService) -> None:
    repo = _repo(registry, "regtest/push")
    data = os.urandom(10_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    wrong = "sha256:" + hashlib.sha256(b"not it").hexdigest()
    with pytest.raises(IntegrityError, match=wrong):
        repo.push_blob(io.BytesIO(data), wrong, len(data))
    assert repo.head_blob(wrong) is None
    repo.push_blob(io.BytesIO(data), digest, len(data))
    assert repo.head_blob(digest) == len(data)
    posts_before = _access_log(registry).count('"POST /v2/regtest/push/')
    repo.push_blob(io.BytesIO(b"ignored: it exists"), digest, len(data))
    assert _access_log(registry).count('"POST /v2/regtest/push/') == posts_before


@pytest.mark.parametrize("kind", ["registry", "layout"])
def test_blob_ranges(registry: RegistryService, tmp_path: Path, kind: str) -> None:
    repo = _repo(registry, "regtest/ranges") if kind == "registry" else open_repository(f"oci:{tmp_path / 'lay'}")
    data = os.urandom(300_000)
    digest, size = repo.upload_blob([data])
    for offset, length in [(0, 1), (0, size), (12_345, 70_000), (size - 10, 10), (size - 10, 100), (size, 5),
                           (size + 1000, 5), (5, 0)]:
        assert repo.read_blob_range(digest, offset, length) == data[offset:offset + length], (offset, length)
    missing = "sha256:" + hashlib.sha256(b"never uploaded").hexdigest()
    with pytest.raises(NotFoundError):
        repo.read_blob_range(missing, 0, 10)
    if kind == "registry":  # really ranged: a request per read, not the whole blob
        log = _access_log(registry)
        assert log.count(f"GET /v2/regtest/ranges/blobs/{digest}") >= 6


def _upload_sessions(registry: RegistryService, name: str) -> list[Path]:
    uploads = registry.storage_dir / "docker/registry/v2/repositories" / name / "_uploads"
    return list(uploads.iterdir()) if uploads.is_dir() else []


def test_cross_repository_mount(registry: RegistryService) -> None:
    source = _repo(registry, "regtest/mount-source")
    target = _repo(registry, "regtest/mount-target")
    data = os.urandom(50_000)
    digest, _ = source.upload_blob([data])
    assert target.head_blob(digest) is None
    assert target.mount_blob(digest, "regtest/mount-source") is True  # 201
    assert target.read_blob(digest) == data
    absent = "sha256:" + hashlib.sha256(b"never uploaded").hexdigest()
    other = _repo(registry, "regtest/mount-target2")
    assert other.mount_blob(absent, f"{registry.host}/regtest/mount-source") is False  # 202, session cancelled
    # The upload session the 202 opened was cancelled (distribution keeps only an empty directory).
    assert [line for line in _access_log(registry).splitlines()
            if '"DELETE /v2/regtest/mount-target2/blobs/uploads/' in line and '" 204 ' in line]
    assert not [p for p in _upload_sessions(registry, "regtest/mount-target2") if (p / "data").exists()]
    assert other.mount_blob(digest, "other.registry.io/regtest/mount-source") is False  # another registry


def test_corrupted_blob_in_storage_is_detected(registry: RegistryService) -> None:
    repo = _repo(registry, "regtest/corrupt")
    data = os.urandom(300_000)
    digest, _ = repo.upload_blob([data])
    path = registry.blob_data_path(digest)
    corrupted = bytearray(path.read_bytes())
    corrupted[123_456] ^= 0x01
    path.write_bytes(bytes(corrupted))
    with repo.open_blob(digest) as f, pytest.raises(IntegrityError, match=digest):
        while f.read(65536):
            pass
    with pytest.raises(IntegrityError):
        repo.read_blob(digest)


def test_corrupted_manifest_in_storage_is_detected(registry: RegistryService, hello_world_layout: Path) -> None:
    source = open_repository(f"oci:{hello_world_layout}")
    repo = _repo(registry, "regtest/corrupt-manifest")
    manifest = copy_image(source, repo, "amd64")
    path = registry.blob_data_path(manifest.digest)
    path.write_bytes(manifest.data.replace(b'"size"', b'"Size"', 1))
    with pytest.raises(IntegrityError, match=manifest.digest):
        repo.get_manifest(manifest.digest)
    with pytest.raises(IntegrityError):
        repo.get_manifest("amd64")


def test_delete(registry: RegistryService, hello_world_layout: Path) -> None:
    source = open_repository(f"oci:{hello_world_layout}")
    repo = _repo(registry, "regtest/delete")
    manifest = copy_image(source, repo, "arm64")
    repo.delete_manifest("arm64")
    assert repo.head_manifest(manifest.digest) is None
    layer = json.loads(manifest.data)["layers"][0]["digest"]
    repo.delete_blob(layer)
    assert repo.head_blob(layer) is None
    with pytest.raises(NotFoundError):
        repo.delete_blob(layer)


def test_stopped_registry_fails_fast(tmp_path: Path) -> None:
    service = start_registry(tmp_path / "dead", name="registry-dead")
    service.stop()
    repo = open_repository(f"{service.host}/regtest/gone", PLAIN)
    started = time.monotonic()
    with pytest.raises(NetworkError) as info:
        repo.get_manifest("latest")
    elapsed = time.monotonic() - started
    assert elapsed < 5.0
    assert service.host in str(info.value) and info.value.retryable


def test_registry_that_comes_up_within_the_budget_is_retried(tmp_path: Path) -> None:
    port = free_port()
    repo = open_repository(f"127.0.0.1:{port}/regtest/late", RegistryOptions(plain=True, retry_budget=20.0))
    services: list[RegistryService] = []
    starter = threading.Timer(1.0, lambda: services.append(
        start_registry(tmp_path / "late", name="registry-late", port=port)))
    started = time.monotonic()
    starter.start()
    try:
        digest, size = repo.upload_blob([b"late but fine"])  # first attempts: connection refused
        assert time.monotonic() - started >= 1.0
        assert repo.read_blob(digest) == b"late but fine" and size == 13
    finally:
        starter.join()
        for service in services:
            service.stop()


def test_server_errors_are_retried_then_reported(tmp_path: Path) -> None:
    """A registry whose storage root is broken answers 500: retried with backoff, then NetworkError."""
    service = start_registry(tmp_path / "broken", name="registry-broken")
    try:
        shutil.rmtree(service.storage_dir)
        service.storage_dir.write_text("not a directory")
        repo = open_repository(f"{service.host}/regtest/broken", RegistryOptions(plain=True, retry_budget=1.0))
        started = time.monotonic()
        with pytest.raises(NetworkError, match="500") as info:
            repo.upload_blob([b"abc"])
        assert 1.0 <= time.monotonic() - started < 4.0
        assert service.host in str(info.value) and info.value.retryable
        assert service.process.log_path.read_text().count('"POST /v2/regtest/broken/blobs/uploads/') >= 3
    finally:
        service.stop()


def _manifest_with(config: bytes, layer: bytes) -> bytes:
    def desc(media_type: str, blob: bytes) -> dict[str, object]:
        return {"mediaType": media_type, "digest": "sha256:" + hashlib.sha256(blob).hexdigest(), "size": len(blob)}

    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": desc("application/vnd.oci.image.config.v1+json", config),
                       "layers": [desc("application/vnd.oci.image.layer.v1.tar", layer)]}).encode()


def test_manifest_push_waits_briefly_for_a_blob_that_reads_as_unknown(registry: RegistryService) -> None:
    """A blob that appears a moment after the manifest push started (what a concurrent upload of the
    same digest looks like to distribution) is waited for; one that never appears fails by name."""
    repo = _repo(registry, "regtest/late-blob")
    config, layer = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}', os.urandom(4096)
    repo.upload_blob([config])
    late = threading.Timer(0.4, lambda: repo.upload_blob([layer]))
    late.start()
    try:
        data = _manifest_with(config, layer)
        assert repo.put_manifest(data, OCI_MANIFEST, "late") == "sha256:" + hashlib.sha256(data).hexdigest()
    finally:
        late.join()
    assert repo.get_manifest("late").data == data

    never = os.urandom(4096)
    started = time.monotonic()
    with pytest.raises(BadInputError, match="BLOB_UNKNOWN") as failure:
        repo.put_manifest(_manifest_with(config, never), OCI_MANIFEST, "never")
    assert hashlib.sha256(never).hexdigest() in str(failure.value)
    assert time.monotonic() - started >= 3  # it did wait before giving up
