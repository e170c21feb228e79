"""OCI image layout (`oci:PATH`) read and write through the Repository interface."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from obdconv.errors import IntegrityError, NotFoundError
from obdconv.registry import DOCKER_MANIFEST_LIST, OCI_MANIFEST, open_repository
from obdconv.registry.copy import copy_image
from obdconv.registry.layout import OCILayoutRepository

TAGS = ["amd64", "amd64-converted", "arm64", "docker-list"]


def _index(layout: Path) -> dict:
    return json.loads((layout / "index.json").read_text())


def _tagged(layout: Path) -> dict[str, dict]:
    return {d["annotations"]["org.opencontainers.image.ref.name"]: d
            for d in _index(layout)["manifests"] if "org.opencontainers.image.ref.name" in d.get("annotations", {})}


def _sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_reads_fixture_tags_and_manifests(hello_world_layout: Path) -> None:
    repo = open_repository(f"oci:{hello_world_layout}")
    assert isinstance(repo, OCILayoutRepository)
    assert repo.list_tags() == TAGS
    for tag, descriptor in _tagged(hello_world_layout).items():
        manifest = repo.get_manifest(tag)
        blob = hello_world_layout / "blobs" / "sha256" / descriptor["digest"].split(":")[1]
        assert manifest.data == blob.read_bytes()
        assert manifest.digest == descriptor["digest"] == _sha256_file(blob)
        assert manifest.media_type == descriptor["mediaType"]
        assert repo.get_manifest(manifest.digest) == manifest
        assert repo.head_manifest(tag) == manifest.digest
    docker_list = repo.get_manifest("docker-list")
    assert docker_list.media_type == DOCKER_MANIFEST_LIST
    assert len(json.loads(docker_list.data)["manifests"]) == 9
    assert repo.get_manifest("amd64-converted").media_type == OCI_MANIFEST


def test_blob_stream_is_verified(hello_world_layout: Path) -> None:
    repo = open_repository(f"oci:{hello_world_layout}")
    layer = json.loads(repo.get_manifest("amd64").data)["layers"][0]
    with repo.open_blob(layer["digest"]) as f:
        data = f.read()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
    assert len(data) == layer["size"] == repo.head_blob(layer["digest"])


def test_missing_things_are_not_found(hello_world_layout: Path, tmp_path: Path) -> None:
    repo = open_repository(f"oci:{hello_world_layout}")
    with pytest.raises(NotFoundError, match="no-such-tag"):
        repo.get_manifest("no-such-tag")
    missing = "sha256:" + "0" * 64
    assert repo.head_blob(missing) is None
    assert repo.head_manifest("no-such-tag") is None
    with pytest.raises(NotFoundError, match=missing):
        repo.open_blob(missing)
    with pytest.raises(NotFoundError, match="does not exist"):
        open_repository(f"oci:{tmp_path / 'absent'}").get_manifest("x")


@pytest.fixture()
def copied_layout(hello_world_layout: Path, tmp_path: Path) -> Path:
    source = open_repository(f"oci:{hello_world_layout}")
    target_path = tmp_path / "copy"
    target = open_repository(f"oci:{target_path}")
    for tag in TAGS:
        copy_image(source, target, tag)
    return target_path


def test_copy_keeps_every_byte_and_tag(hello_world_layout: Path, copied_layout: Path) -> None:
    source_blobs = {p.name: p.read_bytes() for p in (hello_world_layout / "blobs" / "sha256").iterdir()}
    copied_blobs = {p.name: p.read_bytes() for p in (copied_layout / "blobs" / "sha256").iterdir()}
    # Every blob the tags reach is copied unchanged (the fixture holds nothing else but untagged entries).
    assert copied_blobs and set(copied_blobs) <= set(source_blobs)
    for name, data in copied_blobs.items():
        assert data == source_blobs[name]
        assert hashlib.sha256(data).hexdigest() == name
    assert {t: d["digest"] for t, d in _tagged(copied_layout).items()} == \
        {t: d["digest"] for t, d in _tagged(hello_world_layout).items()}
    assert json.loads((copied_layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    # No temp files are left behind by the atomic writes.
    assert not [p for p in copied_layout.rglob(".*") if not p.name.startswith(".obdconv-index.lock")]


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")
def test_written_layout_is_readable_by_skopeo(copied_layout: Path, hello_world_layout: Path) -> None:
    # skopeo's oci: transport only resolves tags of OCI media types, so the OCI manifest is the one to ask for.
    for tag in ("amd64-converted",):
        raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{copied_layout}:{tag}"],
                             capture_output=True, check=True).stdout
        assert raw == open_repository(f"oci:{hello_world_layout}").get_manifest(tag).data


def test_corrupted_blob_and_manifest_are_detected(copied_layout: Path) -> None:
    repo = open_repository(f"oci:{copied_layout}")
    amd64 = repo.get_manifest("amd64")
    layer = json.loads(amd64.data)["layers"][0]
    path = copied_layout / "blobs" / "sha256" / layer["digest"].split(":")[1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with repo.open_blob(layer["digest"]) as f, pytest.raises(IntegrityError, match=layer["digest"]):
        while f.read(1000):
            pass
    manifest_path = copied_layout / "blobs" / "sha256" / amd64.digest.split(":")[1]
    manifest_path.write_bytes(amd64.data.replace(b'"schemaVersion"', b'"schemaversion"'))
    with pytest.raises(IntegrityError, match=amd64.digest):
        repo.get_manifest("amd64")


def test_write_api(tmp_path: Path) -> None:
    repo = open_repository(f"oci:{tmp_path / 'new'}")
    payload = b"config bytes" * 1000
    digest, size = repo.upload_blob([payload[:5], payload[5:]])
    assert (digest, size) == ("sha256:" + hashlib.sha256(payload).hexdigest(), len(payload))
    assert repo.read_blob(digest) == payload
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    with pytest.raises(IntegrityError):
        repo.push_blob(io.BytesIO(payload), wrong, len(payload))
    assert repo.head_blob(wrong) is None
    first = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "n": 1}).encode()
    second = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "n": 2}).encode()
    d1 = repo.put_manifest(first, OCI_MANIFEST, "v1")
    d2 = repo.put_manifest(second, OCI_MANIFEST, "v1")  # the tag moves
    assert repo.list_tags() == ["v1"]
    assert repo.get_manifest("v1").digest == d2 != d1
    assert repo.get_manifest(d1).data == first  # still stored by digest
    repo.put_manifest(first, OCI_MANIFEST, d1)
    assert sum(1 for d in _index(tmp_path / "new")["manifests"] if d["digest"] == d1) == 1
    repo.delete_manifest("v1")
    assert repo.list_tags() == []
    with pytest.raises(NotFoundError):
        repo.get_manifest(d2)
    repo.delete_blob(digest)
    assert repo.head_blob(digest) is None


def test_concurrent_tag_writes_are_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "concurrent"

    def writer(prefix: str) -> None:
        repo = open_repository(f"oci:{path}")  # separate objects, like separate processes
        for i in range(15):
            body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "id": f"{prefix}{i}"}).encode()
            repo.put_manifest(body, OCI_MANIFEST, f"{prefix}{i}")

    threads = [threading.Thread(target=writer, args=(p,)) for p in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(open_repository(f"oci:{path}").list_tags()) == 45
