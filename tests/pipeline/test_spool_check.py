"""A prepared-layer spool is checked before it is reused: one flipped byte in any of its files is
found (sizes and hashes in prepared.json, which seals itself; every block's CRC32C), the spool is
discarded with a warning and prepared again -- never published."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import pytest

from obdconv.pipeline import spoolcheck
from obdconv.pipeline.prepare import check_prepared, load_prepared, prepare_layer
from obdconv.pipeline.runner import RunnerOptions, convert
from obdconv.registry import open_repository
from obdconv.request import ConversionRequest
from tests.pipeline.edge import edge_layers
from tests.pipeline.images import Layout
from tests.pipeline.readback import manifest

SPOOL_FILES = ("prepared.json", "entries.json.zst", "blocks.bin", "lengths.u32", "gzip.meta")


def _files(spool: Path) -> dict[str, bytes]:
    return {name: (spool / name).read_bytes() for name in SPOOL_FILES}


def _flip(path: Path) -> None:
    """Change one byte in the middle; in prepared.json one hex digit of the diff_id, so it stays
    valid JSON and only its seal can tell."""
    data = bytearray(path.read_bytes())
    if path.name == "prepared.json":
        text = data.decode()
        m = re.search(r'"diff_id": "sha256:([0-9a-f])', text)
        assert m is not None
        pos = m.start(1)
        data[pos] = ord("0" if text[pos] != "0" else "1")
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lay = Layout(tmp_path_factory.mktemp("spool-check") / "src")
    lay.image(edge_layers(("gzip", "gzip", "none", "gzip"), docker=False), tag="t")
    return lay.root


@pytest.mark.parametrize("name", SPOOL_FILES)
def test_a_flipped_byte_in_any_spool_file_is_found_and_prepared_again(
        source: Path, tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    repo = open_repository(f"oci:{source}")
    layer = json.loads(repo.get_manifest("t").data)["layers"][0]
    spool_dir = tmp_path / "spool"
    first = prepare_layer(repo, layer, spool_dir, native=True, turbo=True)
    assert check_prepared(first) is None
    clean = _files(first.path)
    _flip(first.path / name)
    with caplog.at_level(logging.WARNING, logger="obdconv.pipeline.prepare"):
        again = prepare_layer(repo, layer, spool_dir, native=True, turbo=True)
    assert _files(again.path) == clean  # prepared again, byte for byte what the first run wrote
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "preparing the layer again" in warning
    if name != "prepared.json":
        assert name in warning  # names the bad file
    assert [p.name for p in spool_dir.iterdir()] == [first.path.name]  # the corrupt copy is gone


def test_checks_name_what_is_wrong(source: Path, tmp_path: Path) -> None:
    repo = open_repository(f"oci:{source}")
    layer = json.loads(repo.get_manifest("t").data)["layers"][0]
    prepared = prepare_layer(repo, layer, tmp_path / "spool", native=True, turbo=False)
    blocks = prepared.blocks_path.read_bytes()
    lengths = prepared.block_lengths()
    third = sum(lengths[:2])
    prepared.blocks_path.write_bytes(blocks[:third + 7] + bytes([blocks[third + 7] ^ 0x80]) + blocks[third + 8:])
    assert check_prepared(prepared) == "blocks.bin block 2 fails its CRC32C"
    prepared.blocks_path.write_bytes(blocks[:-1])
    assert "blocks.bin is" in (check_prepared(prepared) or "")
    prepared.blocks_path.write_bytes(blocks)
    (prepared.path / "entries.json.zst").write_bytes(b"")
    assert check_prepared(prepared) == f"entries.json.zst is 0 bytes, prepare wrote {prepared.files['entries.json.zst'][0]}"
    # prepared.json seals itself: an edit shows even when the JSON stays valid.
    d = json.loads((prepared.path / "prepared.json").read_text())
    assert spoolcheck.unseal(d) is None
    d["tar_size"] += 1
    assert spoolcheck.unseal(d) is not None
    (prepared.path / "prepared.json").write_text(json.dumps(d))
    assert load_prepared(prepared.path.parent, layer["digest"], "lz4", 4096) is None


def test_a_corrupt_kept_spool_is_never_published(source: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The reported case: a second conversion reusing a kept spool with one flipped byte in a
    prepared block publishes exactly the blobs of a clean conversion."""
    spool_dir = tmp_path / "spool"
    options = RunnerOptions(workers=1, spool_dir=str(spool_dir), keep_spool=True)

    def run(tag: str) -> list[str]:
        result = convert(ConversionRequest(repository=f"oci:{source}", input_tag="t", overlaybd_tag=tag, oci=True,
                                           workdir=str(tmp_path / f"w-{tag}")), options=options)
        return [d["digest"] for d in manifest(source, result.output("native").root_digest)["layers"]]

    clean = run("first")
    blocks = sorted(spool_dir.glob("*/blocks.bin"), key=lambda p: p.stat().st_size)[-1]
    before = hashlib.sha256(blocks.read_bytes()).hexdigest()
    _flip(blocks)
    with caplog.at_level(logging.WARNING, logger="obdconv.pipeline.prepare"):
        assert run("second") == clean
    assert any("blocks.bin block" in r.getMessage() for r in caplog.records)
    assert hashlib.sha256(blocks.read_bytes()).hexdigest() == before  # prepared again in place
