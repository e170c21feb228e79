"""Assemble in two steps (`build_layer`, then `upload_built`), as the runner schedules it: the same
layer blobs as the one-call `assemble_layer`, nothing written to the target before the upload, the
built files gone after a run, and a bad prepared spool caught before any byte is sent."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from obdconv.errors import BadInputError
from obdconv.oci.digests import chain_ids
from obdconv.pipeline.assemble import assemble_layer, build_layer, upload_built
from obdconv.pipeline.metadata import MetadataPass
from obdconv.pipeline.prepare import PreparedLayer, prepare_layer
from obdconv.pipeline.runner import RunnerOptions, convert
from obdconv.registry import open_repository
from obdconv.request import ConversionProfile, ConversionRequest
from tests.pipeline.edge import edge_layers
from tests.pipeline.images import Layout
from tests.pipeline.readback import blob_path, manifest


def _blob_files(layout: Path) -> set[str]:
    return {p.name for p in (layout / "blobs" / "sha256").iterdir()}


@pytest.fixture
def prepared_image(tmp_path: Path) -> tuple[Path, list[PreparedLayer], list[object], list[str]]:
    lay = Layout(tmp_path / "src")
    lay.image(edge_layers(("gzip", "none", "gzip", "gzip"), docker=False), tag="t")
    repo = open_repository(f"oci:{lay.root}")
    m = json.loads(repo.get_manifest("t").data)
    config = json.loads(repo.read_blob(m["config"]["digest"]))
    chains = chain_ids(config["rootfs"]["diff_ids"])
    prepared = [prepare_layer(repo, layer, tmp_path / "spool", native=True, turbo=True) for layer in m["layers"]]
    with MetadataPass(64, chains, tmp_path / "meta") as metadata_pass:
        metadata = [metadata_pass.apply(p) for p in prepared]
    return lay.root, prepared, metadata, chains


@pytest.mark.parametrize("fmt", ["native", "turbo"])
def test_build_then_upload_equals_assemble(prepared_image: tuple[Path, list[PreparedLayer], list[object], list[str]],
                                           tmp_path: Path, fmt: str) -> None:
    _, prepared, metadata, chains = prepared_image
    profile = ConversionProfile(format=fmt)
    one_step = open_repository(f"oci:{tmp_path / 'one'}")
    two_step = open_repository(f"oci:{tmp_path / 'two'}")
    for i, (p, md) in enumerate(zip(prepared, metadata, strict=True)):
        parent = chains[i - 1] if i else ""
        expected = assemble_layer(p, md, profile, chains[i], parent, one_step, upload=True)
        before = _blob_files(tmp_path / "two") if i else None
        built = build_layer(p, md, profile, chains[i], parent, tmp_path / "built")
        # Building wrote nothing to the target.
        assert (_blob_files(tmp_path / "two") if i else (tmp_path / "two").exists() or None) == before
        hashed_only = upload_built(built, two_step, upload=False)
        uploaded = upload_built(built, two_step, upload=True)
        assert hashed_only == uploaded == expected
        data = (tmp_path / "two" / "blobs" / "sha256" / uploaded.digest.partition(":")[2]).read_bytes()
        assert len(data) == built.size == uploaded.size
        assert "sha256:" + hashlib.sha256(data).hexdigest() == uploaded.digest
        assert data == (tmp_path / "one" / "blobs" / "sha256" / expected.digest.partition(":")[2]).read_bytes()


def test_native_build_rejects_a_truncated_spool_before_uploading(
        prepared_image: tuple[Path, list[PreparedLayer], list[object], list[str]], tmp_path: Path) -> None:
    _, prepared, metadata, chains = prepared_image
    p = prepared[0]
    blocks = Path(p.blocks_path)
    blocks.write_bytes(blocks.read_bytes()[:-1])
    target = tmp_path / "target"
    with pytest.raises(BadInputError, match="prepared blocks are"):
        build_layer(p, metadata[0], ConversionProfile(), chains[0], "", tmp_path / "built")
    with pytest.raises(BadInputError, match="prepared blocks are"):
        assemble_layer(p, metadata[0], ConversionProfile(), chains[0], "", open_repository(f"oci:{target}"))
    assert not (target / "blobs" / "sha256").exists() or not list((target / "blobs" / "sha256").iterdir())


def test_pooled_run_leaves_no_built_files_and_the_same_blobs(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "src")
    lay.image(edge_layers(("gzip", "gzip", "none", "gzip"), docker=False), tag="v1")
    work = tmp_path / "work"
    request = ConversionRequest(repository=f"oci:{lay.root}", input_tag="v1", overlaybd_tag="obd", turbo_tag="turbo",
                                workdir=str(work))
    result = convert(request, options=RunnerOptions(workers=2))
    assert not list(work.rglob("*.head")) and not list(work.rglob("*.tail"))
    blobs = _blob_files(lay.root)
    for fmt in ("native", "turbo"):
        layers = manifest(lay.root, result.output(fmt).root_digest)["layers"]
        assert len(layers) == 4
        for d in layers:
            assert d["digest"].partition(":")[2] in blobs
            data = blob_path(lay.root, d["digest"]).read_bytes()
            assert len(data) == d["size"] and "sha256:" + hashlib.sha256(data).hexdigest() == d["digest"]


def test_layers_sent_before_a_late_corrupt_layer_are_cancelled(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Uploads start before every source digest is verified (their bytes go to upload sessions, here
    # temp files of the layout) and commit only afterwards. A big last layer, corrupt at its end,
    # fails its prepare long after the first layers were built and sent: every sent layer must be
    # cancelled, nothing committed, the layout left exactly as it was.
    from obdconv.registry.layout import OCILayoutRepository
    from tests.pipeline.images import file, layer
    from tests.pipeline.test_e2e_layout import tree_hash

    lay = Layout(tmp_path / "src")
    big = hashlib.shake_256(b"incompressible").digest(48 << 20)
    layers = [*edge_layers(("gzip", "gzip", "none", "gzip"), docker=False)[:3], layer([file("big.bin", big)])]
    lay.image(layers, tag="v1")
    last = manifest(lay.root, lay.resolve("v1")["digest"])["layers"][3]["digest"]
    victim = blob_path(lay.root, last)
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0x5A  # inside the deflate stream's last bytes: found only at the very end
    victim.write_bytes(bytes(data))
    before = tree_hash(lay.root)
    events: list[tuple[str, str]] = []
    ways: set[str] = set()

    def recording(method: str) -> object:
        original = getattr(OCILayoutRepository, method)

        def begin(self: OCILayoutRepository, *args: object) -> object:
            pending = original(self, *args)
            if pending is not None:  # adopt_file: None when the file cannot be taken
                record_pending(method, pending)
            return pending

        return begin

    def record_pending(method: str, pending: object) -> None:
        events.append(("sent", pending.digest))  # type: ignore[attr-defined]
        ways.add(method)
        commit, cancel = pending._commit, pending._cancel

        def record(what: str, fn: object) -> object:
            def call() -> None:
                events.append((what, pending.digest))
                fn()  # type: ignore[operator]
            return call

        pending._commit, pending._cancel = record("commit", commit), record("cancel", cancel)  # type: ignore[attr-defined]

    # Both ways a layout takes a blob: copied ranges, and (native blobs finished in their spool
    # file, inplace.py) the file itself.
    monkeypatch.setattr(OCILayoutRepository, "begin_upload_ranges", recording("begin_upload_ranges"))
    monkeypatch.setattr(OCILayoutRepository, "adopt_file", recording("adopt_file"))
    request = ConversionRequest(repository=f"oci:{lay.root}", input_tag="v1", overlaybd_tag="obd",
                                workdir=str(tmp_path / "work"))
    with pytest.raises(BadInputError):
        convert(request, options=RunnerOptions(workers=2))
    sent = [d for what, d in events if what == "sent"]
    assert sent, "no layer was sent before the corrupt one failed (the test's timing assumption broke)"
    assert sorted(d for what, d in events if what == "cancel") == sorted(sent)
    assert not [e for e in events if e[0] == "commit"]
    assert "adopt_file" in ways, "no native blob was finished in place"
    assert tree_hash(lay.root) == before
