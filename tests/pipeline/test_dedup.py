"""Dedup in the local runner (SQLite store, real registry): manifest hits, leading layer hits with
the rest converted on top of the converted parents read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from obdconv.pipeline import parents
from obdconv.pipeline.runner import ConversionResult, ProgressEvent, RunnerOptions, convert
from obdconv.request import ConversionRequest, RegistryAccess
from tests.pipeline.edge import base, top, upper
from tests.pipeline.images import Layout, file, layer
from tests.pipeline.readback import check_tree, e2fsck, flatten, source_layer_paths
from tests.pipeline.test_e2e_registry import mirror, push_layout_image
from tests.services.registry import RegistryService

pytestmark = pytest.mark.services


def run(name: str, tag: str, tmp: Path, db: Path | None, *, native: str, turbo: str,
        no_upload: bool = False) -> tuple[ConversionResult, list[str]]:
    prepared: list[str] = []

    def progress(e: ProgressEvent) -> None:
        if e.stage == "prepare" and e.finished:
            prepared.append(e.layer_digest)

    request = ConversionRequest(repository=name, input_tag=tag, overlaybd_tag=native, turbo_tag=turbo,
                                workdir=str(tmp), no_upload=no_upload, access=RegistryAccess(plain=True),
                                db_type="sqlite" if db else "", db_str_ref="test" if db else "")
    result = convert(request, options=RunnerOptions(workers=1, db_str=str(db) if db else ""), progress=progress)
    return result, prepared


def test_manifest_and_layer_dedup(pipeline_registry: RegistryService, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    lay = Layout(tmp_path / "src")
    shared = [layer(base(), "gzip", True), layer(upper(), "gzip", True)]
    lay.image([*shared, layer(top(), "gzip", True)], docker=True, tag="a")
    lay.image([*shared, layer([file("only-in-b", b"b" * 5000)], "none", True)], docker=True, tag="b")
    name = f"{pipeline_registry.host}/dedup"
    push_layout_image(lay.root, "a", name)
    src_b = push_layout_image(lay.root, "b", name)
    db = tmp_path / "dedup.sqlite"

    first, prepared = run(name, "a", tmp_path / "w1", db, native="a-obd", turbo="a-turbo")
    assert len(prepared) == 3

    # same image again: both formats found by manifest, nothing downloaded, new tags point at them
    again, prepared = run(name, "a", tmp_path / "w2", db, native="a-obd2", turbo="a-turbo2")
    assert prepared == []
    for fmt in ("native", "turbo"):
        assert again.output(fmt).root_digest == first.output(fmt).root_digest

    # image b shares layers 0 and 1: only its top layer is prepared; the rest is read back
    downloaded: list[str] = []
    real_download = parents._download

    def spy(repo: object, digest: str, path: Path) -> Path:
        downloaded.append(digest)
        return real_download(repo, digest, path)

    monkeypatch.setattr(parents, "_download", spy)
    second, prepared = run(name, "b", tmp_path / "w3", db, native="b-obd", turbo="b-turbo")
    assert len(prepared) == 1
    # only converted blobs were fetched: the metadata pass needs no file bytes, so the turbo
    # parents' original layers (whole gzip layers) are never downloaded
    converted = {first.output(fmt).layers[c]["digest"] for fmt in ("native", "turbo")
                 for c in list(first.output(fmt).layers)[:2]}
    assert downloaded and set(downloaded) <= converted
    fresh, _ = run(name, "b", tmp_path / "w4", None, native="x", turbo="y", no_upload=True)
    for fmt in ("native", "turbo"):
        out = second.output(fmt)
        shared_ids = list(first.output(fmt).layers)[:2]
        assert [out.layers[c]["digest"] for c in shared_ids] == [first.output(fmt).layers[c]["digest"]
                                                                 for c in shared_ids]
        # converting on top of read-back parents gives the same bytes as converting from scratch
        assert out.root_digest == fresh.output(fmt).root_digest
        mirror(name, out.root_digest, tmp_path / f"out-{fmt}")
        image = tmp_path / f"{fmt}.img"
        flatten(tmp_path / f"out-{fmt}", out.root_digest, image, lay.root)
        assert e2fsck(image) == ""
        assert check_tree(image, source_layer_paths(lay.root, src_b)) == []


def test_manifest_claimed_elsewhere_is_waited_for(pipeline_registry: RegistryService, tmp_path: Path) -> None:
    from obdconv.dedup.claims import ClaimTimeoutError, manifest_claim_key
    from obdconv.dedup.store import manifest_profile_key, opened_store
    from obdconv.request import ConversionProfile

    lay = Layout(tmp_path / "src")
    lay.image([layer([file("x", b"x")], "gzip", True)], docker=True, tag="c")
    name = f"{pipeline_registry.host}/claimed"
    src = push_layout_image(lay.root, "c", name)
    db = tmp_path / "dedup.sqlite"
    profile = ConversionProfile("native")
    key = manifest_claim_key(pipeline_registry.host, "claimed", src,
                             "application/vnd.docker.distribution.manifest.v2+json",
                             manifest_profile_key(profile, False))
    with opened_store("sqlite", str(db)) as store:
        assert store.claim(key, "someone-else", 60)
        request = ConversionRequest(repository=name, input_tag="c", overlaybd_tag="c-obd", workdir=str(tmp_path / "w"),
                                    access=RegistryAccess(plain=True), db_type="sqlite", db_str_ref="test")
        options = RunnerOptions(workers=1, db_str=str(db), claim_timeout=1.0)
        with pytest.raises(ClaimTimeoutError):
            convert(request, options=options)
        assert "c-obd" not in open_repository_tags(name)
        store.release(key, "someone-else")
        result = convert(request, options=options)
        assert result.output("native").root_digest
        assert store.holder(key) is None  # our lease was released after the push


def open_repository_tags(name: str) -> list[str]:
    from obdconv.registry import RegistryOptions, open_repository

    return open_repository(name, RegistryOptions(plain=True)).list_tags()
