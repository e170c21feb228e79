"""Uploads of a size known in advance (`upload_blob(chunks, size=N)`): sent with Content-Length
instead of a chunk-framed body, checked against the bytes actually produced, on a real registry and
on an OCI layout."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from obdconv.errors import IntegrityError
from obdconv.registry import RegistryOptions, open_repository
from obdconv.registry.bodies import SizedBody
from obdconv.registry.repository import Repository
from tests.services.registry import RegistryService


def _repo(registry: RegistryService, name: str, **options: object) -> Repository:
    return open_repository(f"{registry.host}/{name}", RegistryOptions(plain=True, **options))  # type: ignore[arg-type]


def _pieces(sizes: list[int], seed: int) -> list[bytes]:
    data = hashlib.shake_256(str(seed).encode()).digest(sum(sizes))
    out, at = [], 0
    for n in sizes:
        out.append(data[at:at + n])
        at += n
    return out


def _upload_data_files(registry: RegistryService, name: str) -> list[Path]:
    """Upload sessions of `name` that still hold data (a cancelled one keeps at most an empty directory)."""
    uploads = registry.storage_dir / "docker/registry/v2/repositories" / name / "_uploads"
    return [p for p in uploads.iterdir() if (p / "data").exists()] if uploads.is_dir() else []


def test_sized_body_is_sent_with_content_length_not_chunked() -> None:
    pieces = [b"abc", b"defgh"]
    prepared = requests.Request("PATCH", "http://127.0.0.1:9/v2/x/blobs/uploads/1",
                                data=SizedBody(iter(pieces), 8)).prepare()
    assert prepared.headers.get("Content-Length") == "8"
    assert "Transfer-Encoding" not in prepared.headers
    assert b"".join(prepared.body) == b"abcdefgh"  # type: ignore[arg-type]


@pytest.mark.parametrize("sizes", [[1, 300_000, 5, 2_000_000, 17], [0, 4096]])
def test_sized_upload_round_trips(registry: RegistryService, sizes: list[int]) -> None:
    repo = _repo(registry, "regtest/sized")
    pieces = _pieces(sizes, len(sizes))
    payload = b"".join(pieces)
    digest, size = repo.upload_blob(iter(pieces), size=len(payload))
    assert (digest, size) == ("sha256:" + hashlib.sha256(payload).hexdigest(), len(payload))
    assert repo.read_blob(digest) == payload


def test_sized_upload_of_an_empty_blob(registry: RegistryService) -> None:
    repo = _repo(registry, "regtest/sized-empty")
    digest, size = repo.upload_blob(iter([b""]), size=0)
    assert (digest, size) == ("sha256:" + hashlib.sha256(b"").hexdigest(), 0)
    assert repo.read_blob(digest) == b""


@pytest.mark.parametrize(("announced", "what"), [(5000, "more than the expected"), (7000, "expected 7000")])
def test_sized_upload_with_wrong_size_stores_nothing(registry: RegistryService, announced: int, what: str) -> None:
    name = f"regtest/sized-wrong-{announced}"
    repo = _repo(registry, name)
    payload = os.urandom(6000)
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()

    def pieces() -> Iterator[bytes]:
        yield payload[:3000]
        yield payload[3000:]

    with pytest.raises(IntegrityError, match=what):
        repo.upload_blob(pieces(), size=announced)
    assert repo.head_blob(digest) is None
    assert _upload_data_files(registry, name) == []
    # The repository (and its connection pool) still works afterwards.
    assert repo.upload_blob(pieces(), size=len(payload)) == (digest, len(payload))


def test_push_blob_of_known_size_in_chunks_mode(registry: RegistryService) -> None:
    # "chunks" mode ignores the size for framing (one PATCH per piece) but still checks it.
    repo = _repo(registry, "regtest/sized-chunks", upload_mode="chunks", upload_chunk_size=64 * 1024)
    payload = os.urandom(200_000)
    assert repo.upload_blob(iter([payload]), size=len(payload))[1] == len(payload)
    with pytest.raises(IntegrityError, match="expected 1"):
        repo.upload_blob(iter([payload]), size=1)


def test_layout_checks_the_size(tmp_path: Path) -> None:
    repo = open_repository(f"oci:{tmp_path / 'layout'}")
    payload = b"layout bytes"
    assert repo.upload_blob([payload[:4], payload[4:]], size=len(payload)) == (
        "sha256:" + hashlib.sha256(payload).hexdigest(), len(payload))
    with pytest.raises(IntegrityError, match="expected 3"):
        repo.upload_blob([payload], size=3)
    assert not list((tmp_path / "layout" / "blobs" / "sha256").glob(".upload-*"))


def test_begin_upload_shows_nothing_until_commit(registry: RegistryService, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    name = "regtest/pending"
    for repo in (_repo(registry, name), open_repository(f"oci:{tmp_path / 'layout'}")):
        kept = repo.begin_upload(iter([payload[:1000], payload[1000:]]), size=len(payload))
        dropped = repo.begin_upload(iter([payload[:7], b"other bytes"]), size=18)
        assert (kept.digest, kept.size) == (digest, len(payload))
        assert repo.head_blob(digest) is None and repo.head_blob(dropped.digest) is None
        dropped.cancel()
        kept.commit()
        assert repo.read_blob(digest) == payload
        assert repo.head_blob(dropped.digest) is None
        with pytest.raises(RuntimeError, match="already"):
            kept.commit()
    assert [p.name for p in _upload_data_files(registry, name)] == []
    assert not list((tmp_path / "layout" / "blobs" / "sha256").glob(".upload-*"))


def test_layout_upload_of_ranges_copies_and_hashes_them(tmp_path: Path) -> None:
    """begin_upload_ranges: the ranges' bytes one after the other, digest checked, nothing visible
    before commit; a size that does not match leaves nothing behind."""
    from obdconv.registry.layout import OCILayoutRepository

    parts = [tmp_path / "a", tmp_path / "b", tmp_path / "empty", tmp_path / "c"]
    payload = [b"head" * 100, bytes(range(256)) * 5000, b"", b"tail"]
    for path, data in zip(parts, payload, strict=True):
        path.write_bytes(data)
    ranges = [[p, 0, len(d)] for p, d in zip(parts, payload, strict=True)] + [[parts[1], 1000, 300]]
    whole = b"".join(payload) + payload[1][1000:1300]
    repo = OCILayoutRepository(tmp_path / "layout")
    pending = repo.begin_upload_ranges(ranges, len(whole))
    assert pending.digest == "sha256:" + hashlib.sha256(whole).hexdigest()
    assert repo.head_blob(pending.digest) is None
    pending.commit()
    assert repo.read_blob(pending.digest) == whole
    with pytest.raises(IntegrityError):
        repo.begin_upload_ranges(ranges, len(whole) + 1)
    assert [p.name for p in (tmp_path / "layout" / "blobs" / "sha256").iterdir()] == [pending.digest[7:]]


def test_layout_upload_of_ranges_without_copy_file_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel cannot copy between the files (EXDEV, ENOSYS) the bytes go through Python."""
    import errno

    from obdconv.registry.layout import OCILayoutRepository

    calls = 0

    def refuse(*_: object) -> int:
        nonlocal calls
        calls += 1
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    part = tmp_path / "a"
    part.write_bytes(os.urandom(3 << 20))
    repo = OCILayoutRepository(tmp_path / "layout")
    pending = repo.begin_upload_ranges([[part, 0, 3 << 20], [part, 5, 100]], (3 << 20) + 100)
    pending.commit()
    assert calls == 2
    assert repo.read_blob(pending.digest) == part.read_bytes() + part.read_bytes()[5:105]
