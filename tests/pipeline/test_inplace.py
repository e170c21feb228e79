"""A native blob finished inside its spool file and stored by a hard link (inplace.py): the same
bytes as the copied blob; a published blob never changes again, whatever later conversions of the
same spool do; whenever the file cannot be taken (busy, already published, another head size,
another filesystem) the blob is copied as before."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from obdconv.leftovers import hold, release
from obdconv.pipeline.inplace import finish_in_place
from obdconv.pipeline.prepare import load_prepared
from obdconv.pipeline.runner import RunnerOptions, convert
from obdconv.pipeline.writeback import WritebackFile
from obdconv.registry.layout import OCILayoutRepository
from obdconv.request import ConversionRequest
from tests.pipeline.edge import edge_layers
from tests.pipeline.images import Layout, copy_layout
from tests.pipeline.readback import blob_path, manifest


def _native_layers(root: Path, tag: str) -> list[dict[str, object]]:
    return manifest(root, Layout(root).resolve(tag)["digest"])["layers"]  # type: ignore[no-any-return]


def _convert(root: Path, tag: str, work: Path, spool: Path | None = None, *, flatten: bool = False) -> str:
    out = f"{tag}-{'flat' if flatten else 'obd'}"
    request = ConversionRequest(repository=f"oci:{root}", input_tag=tag, overlaybd_tag=out, workdir=str(work),
                                flatten=flatten)
    options = RunnerOptions(workers=2, spool_dir=str(spool) if spool else "", keep_spool=spool is not None)
    convert(request, options=options)
    return Layout(root).resolve(out)["digest"]  # type: ignore[no-any-return]


def _intact(root: Path, layers: list[dict[str, object]]) -> None:
    for d in layers:
        data = blob_path(root, str(d["digest"])).read_bytes()
        assert len(data) == d["size"] and "sha256:" + hashlib.sha256(data).hexdigest() == d["digest"]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    lay = Layout(tmp_path / "src")
    layers = edge_layers(("gzip", "none", "gzip", "gzip"), docker=False)
    lay.image(layers, tag="a")
    lay.image(layers[2:], tag="b")  # the same layers at other places: other chains, other heads
    return lay.root


def test_finished_in_place_is_byte_for_byte_the_copied_blob(source: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    copied_root = copy_layout(source, tmp_path / "copied")
    spool = tmp_path / "spool"
    in_place = _convert(source, "a", tmp_path / "w1", spool)
    with monkeypatch.context() as m:
        m.setattr(OCILayoutRepository, "adopts_files", False)
        copied = _convert(copied_root, "a", tmp_path / "w2")
    assert in_place == copied
    layers = _native_layers(source, "a-obd")
    _intact(source, layers)
    # The blobs are the spool files themselves: one inode, two names.
    spool_inodes = {os.stat(p).st_ino for p in spool.glob("*/blocks.bin")}
    taken = [d for d in layers if os.stat(blob_path(source, str(d["digest"]))).st_ino in spool_inodes]
    assert len(taken) == len(layers)
    assert not list((source / "blobs" / "sha256").glob(".upload-*"))


def test_a_published_blob_never_changes_when_its_spool_is_used_again(source: Path, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    _convert(source, "a", tmp_path / "w1", spool)
    published = _native_layers(source, "a-obd")
    before = {str(d["digest"]): blob_path(source, str(d["digest"])).read_bytes() for d in published}
    # "b" reuses the spools of "a"'s last two layers, now published: it must copy them.
    fresh_root = copy_layout(source, tmp_path / "fresh")
    b_shared = _convert(source, "b", tmp_path / "w2", spool)
    b_fresh = _convert(fresh_root, "b", tmp_path / "w3")
    assert b_shared == b_fresh
    assert {d: blob_path(source, d).read_bytes() for d in before} == before
    _intact(source, published)
    _intact(source, _native_layers(source, "b-obd"))


def _body_file(tmp_path: Path, body: bytes, room: int) -> Path:
    body_path = tmp_path / "blocks.bin"
    with open(body_path, "wb") as f:
        f.truncate(room)
        f.seek(room)
        f.write(body)
    return body_path


def test_finish_commit_and_cancel(tmp_path: Path) -> None:
    head, body, tail = b"H" * 100, os.urandom(50_000), b"T" * 300
    body_path = _body_file(tmp_path, body, len(head))
    repo = OCILayoutRepository(tmp_path / "layout")
    size = len(head + body + tail)
    pending = finish_in_place(str(body_path), head, len(head), len(body), tail, repo)
    assert pending is not None and pending.size == size and pending.digest == "sha256:" + hashlib.sha256(head + body + tail).hexdigest()
    assert os.stat(body_path).st_nlink == 2
    with pytest.raises(BlockingIOError):  # held until committed or cancelled
        release(hold(body_path))
    pending.cancel()
    assert os.stat(body_path).st_nlink == 1 and not list((tmp_path / "layout" / "blobs" / "sha256").iterdir())
    release(hold(body_path))
    pending = finish_in_place(str(body_path), head, len(head), len(body), tail, repo)
    assert pending is not None
    pending.commit()
    blob = blob_path(tmp_path / "layout", pending.digest)
    assert blob.read_bytes() == head + body + tail and os.path.samefile(blob, body_path)
    release(hold(body_path))  # released at commit


def test_the_file_is_copied_instead_when_it_cannot_be_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    head, body, tail = b"H" * 100, os.urandom(50_000), b"T" * 300
    body_path = _body_file(tmp_path, body, len(head))
    original = body_path.read_bytes()
    repo = OCILayoutRepository(tmp_path / "layout")

    def attempt(room: int = len(head)) -> object:
        return finish_in_place(str(body_path), head, room, len(body), tail, repo)

    assert attempt(room=len(head) + 1) is None  # room for another head
    lock = hold(body_path)
    assert attempt() is None  # another conversion is finishing it
    release(lock)
    os.link(body_path, tmp_path / "published")
    assert attempt() is None  # already a blob somewhere
    os.unlink(tmp_path / "published")
    assert body_path.read_bytes() == original  # none of these wrote anything

    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr("obdconv.registry.layout.os.link", no_link)
    assert attempt() is None  # another filesystem: the blob is copied
    release(hold(body_path))  # and the lock was given back
    assert body_path.read_bytes()[len(head):len(head) + len(body)] == body


def test_writeback_file_writes_every_byte(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    with open(tmp_path / "f", "wb") as f:
        f.truncate(1000)
        f.seek(1000)
        out = WritebackFile(f, step=4096)
        for i in range(0, len(data), 7000):
            assert out.write(data[i:i + 7000]) == len(data[i:i + 7000])
        assert out.start > 1000  # writeback was asked for along the way
    assert (tmp_path / "f").read_bytes() == bytes(1000) + data


def test_prepared_blocks_start_after_the_room(source: Path, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    _convert(source, "a", tmp_path / "w", spool)
    offsets = set()
    for d in _native_layers(source, "a"):
        prepared = load_prepared(spool, str(d["digest"]), "lz4", 4096)
        assert prepared is not None
        offsets.add(prepared.blocks_offset)
    assert min(offsets) > 1536 + 512  # the tar prefix, the ZFile header and the LSMT header's block


def test_flatten_reads_blocks_after_the_room(source: Path, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    _convert(source, "a", tmp_path / "w1", spool)  # spools with room, kept
    fresh_root = copy_layout(source, tmp_path / "fresh")
    assert _convert(source, "a", tmp_path / "w2", spool, flatten=True) == \
        _convert(fresh_root, "a", tmp_path / "w3", flatten=True)
