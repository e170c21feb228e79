"""`obdconv inspect`: facts about the reference files, all output modes, and malformed input."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from obdconv.cli.main import main
from obdconv.formats.gzindex import GzipIndexBuilder


def _inspect_json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_reference_layer(ref_layer_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = _inspect_json(ref_layer_dir / "overlaybd.commit.zfile.tar", capsys)
    assert info["tar_wrapper"]["payload_offset"] == 1536
    assert info["zfile"]["algorithm"] == "lz4" and info["zfile"]["block_size"] == 4096
    assert info["zfile"]["original_size"] == 71_659_520  # fixture README
    lsmt = info["lsmt"]
    assert lsmt["uuid"] == "1B1E3F50-C815-FD19-CED3-D36687784B7A"
    assert lsmt["virtual_size"] == 64 << 30 and lsmt["version"] == "1.1"
    assert (lsmt["index"]["entries"], lsmt["index"]["padding"]) == (515, 253)
    assert (lsmt["header_flags"], lsmt["trailer_flags"]) == ("0x7", "0x6")


def test_commit_fixture_text(obd_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(obd_dir / "commit.lsmt")]) == 0
    out = capsys.readouterr().out
    assert "user_tag: hello" in out and "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE" in out
    assert "mapped_bytes: 4096" in out and "padding: 255" in out


def test_turbo_fs_meta_tags(ref_layer_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = _inspect_json(ref_layer_dir / "turbo-ext4.fs.meta", capsys)
    tags = info["lsmt"]["index"]["tags"]
    assert set(tags) == {"0", "1"} and info["lsmt"]["index"]["padding"] == 0


def test_turbo_targz_and_gzip_meta(ref_layer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layer = (ref_layer_dir / "layer.tar").read_bytes()
    gz = gzip.compress(layer)
    b = GzipIndexBuilder()
    b.feed(gz)
    meta = b.finish(len(gz))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in [("ext4.fs.meta", (ref_layer_dir / "turbo-ext4.fs.meta").read_bytes()),
                           (".turbo.ociv1", b""), ("gzip.meta", meta)]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    path = tmp_path / "turboOCIv1.tar.gz"
    path.write_bytes(buf.getvalue())
    info = _inspect_json(path, capsys)
    members = {m["name"]: m for m in info["members"]}
    assert set(members) == {"ext4.fs.meta", ".turbo.ociv1", "gzip.meta"}
    assert members["ext4.fs.meta"]["content"]["lsmt"]["index"]["entries"] == 525
    assert members["gzip.meta"]["content"]["gzip_meta"]["uncompressed_size"] == len(layer)
    (tmp_path / "gzip.meta").write_bytes(meta)
    assert _inspect_json(tmp_path / "gzip.meta", capsys)["gzip_meta"]["gzip_file_size"] == len(gz)


def test_malformed_exits_nonzero(obd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.zfile"
    data = bytearray((obd_dir / "commit.lsmt.zfile").read_bytes())
    data[0] = 0
    bad.write_bytes(bytes(data[:700]))
    assert main(["inspect", str(bad)]) == 65
    assert "magic" in capsys.readouterr().err
    assert main(["inspect", str(obd_dir / "rw_index.bin")]) == 65
    assert main(["inspect", str(tmp_path / "missing")]) == 66
    assert "no such file" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 66
    assert f"not a regular file: {tmp_path}" in capsys.readouterr().err
