"""Stage-level checks: spool reuse, block-size alignment with other codecs, metadata encoding."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import zstandard

from obdconv.errors import FormatError
from obdconv.ext4 import Extent
from obdconv.formats.blob import open_payload
from obdconv.pipeline.metadata import AppliedLayer, FilePlacement, decode_metadata, encode_metadata
from obdconv.pipeline.prepare import prepare_layer
from obdconv.pipeline.runner import ProgressEvent, RunnerOptions, convert
from obdconv.registry import open_repository
from obdconv.request import ConversionRequest
from tests.pipeline.edge import edge_layers
from tests.pipeline.images import Layout
from tests.pipeline.readback import blob_path, check_tree, e2fsck, flatten, manifest, source_layer_paths


def test_metadata_encoding_round_trip() -> None:
    m = AppliedLayer([(7, b"\x01" * 4096), (9, bytes(4096))],
                     [(FilePlacement("a/b", 9000, 4096, 1536), [Extent(0, 100, 2), Extent(2, 500, 1)]),
                      (FilePlacement("caf\u00e9/\udcff", 0, -1, 10240), []),
                      (FilePlacement("big", 1 << 40, 1 << 39, (1 << 41) + 512), [Extent(0, (1 << 40) + 3, 32768)])])
    again = decode_metadata(encode_metadata(m))
    assert again == m
    assert decode_metadata(encode_metadata(AppliedLayer())) == AppliedLayer()


def test_metadata_encoding_rejects_a_truncated_or_foreign_payload() -> None:
    m = AppliedLayer([(7, bytes(4096))], [(FilePlacement("a", 10, 0, 512), [Extent(0, 9, 1)])])
    raw = zstandard.ZstdDecompressor().decompress(encode_metadata(m))
    with pytest.raises(FormatError, match="inconsistent"):
        decode_metadata(zstandard.ZstdCompressor().compress(raw[:-3]))
    with pytest.raises(FormatError, match="not an encoded AppliedLayer"):
        decode_metadata(zstandard.ZstdCompressor().compress(b"OBDMETA1" + raw[8:]))


def test_spool_is_reused_and_upgraded(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "src")
    lay.image(edge_layers(("gzip", "gzip", "gzip", "gzip"), docker=False), tag="t")
    repo = open_repository(f"oci:{lay.root}")
    desc = repo.get_manifest("t")
    layer = json.loads(desc.data)["layers"][0]
    spool = tmp_path / "spool"
    first = prepare_layer(repo, layer, spool, native=True, turbo=False)
    assert first.native and not first.turbo and first.gzip_meta_path is None
    mtime = (Path(first.spool) / "prepared.json").stat().st_mtime_ns
    again = prepare_layer(repo, layer, spool, native=True, turbo=False)
    assert (Path(again.spool) / "prepared.json").stat().st_mtime_ns == mtime  # reused, not redone
    upgraded = prepare_layer(repo, layer, spool, native=False, turbo=True)
    assert upgraded.native and upgraded.turbo and upgraded.gzip_meta_path is not None
    assert upgraded.gzip_meta_path.exists()
    assert upgraded.block_lengths() == first.block_lengths()  # deterministic data area
    assert [p.name for p in spool.iterdir()] == [Path(first.spool).name]  # no temp dirs left
    assert upgraded.diff_id == json.loads(repo.read_blob(
        json.loads(desc.data)["config"]["digest"]))["rootfs"]["diff_ids"][0]


@pytest.mark.parametrize(("algorithm", "block_size"), [("zstd", 16384), ("lz4", 32768)])
def test_other_block_sizes_reuse_prepared_blocks(tmp_path: Path, algorithm: str, block_size: int) -> None:
    lay = Layout(tmp_path / "src")
    src = lay.image(edge_layers(("gzip", "none", "gzip", "gzip"), docker=False), tag="t")["digest"]
    request = ConversionRequest(repository=f"oci:{lay.root}", input_tag="t", overlaybd_tag="o", algorithm=algorithm,
                                block_size=block_size, workdir=str(tmp_path / "w"))
    result = convert(request, options=RunnerOptions(workers=1))
    out = result.output("native").root_digest
    for d in manifest(lay.root, out)["layers"]:
        payload = open_payload(str(blob_path(lay.root, d["digest"])))
        assert payload.zfile is not None
        assert payload.zfile.header.block_size == block_size
        payload.zfile.verify()  # every block CRC, incl. the reused prepared ones
    image = tmp_path / "img"
    flatten(lay.root, out, image)
    assert e2fsck(image) == ""
    assert check_tree(image, source_layer_paths(lay.root, src)) == []


def test_progress_printer_tty_and_plain() -> None:
    from obdconv.cli.convert import ProgressPrinter

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, plain = Tty(), io.StringIO()
    for stream in (tty, plain):
        printer = ProgressPrinter(stream)
        printer(ProgressEvent("plan"))
        printer(ProgressEvent("prepare", 0, "sha256:" + "a" * 64, 0, 2048))
        printer(ProgressEvent("prepare", 0, "sha256:" + "a" * 64, 2048, 2048, finished=True))
    assert "layer   0 aaaaaaaaaaaa [########################]" in tty.getvalue()
    assert "\x1b[" in tty.getvalue()  # redrawn in place
    assert "prepare layer 0 sha256:aaaaaaaaaaaa: done" in plain.getvalue()
    assert "\x1b[" not in plain.getvalue()
