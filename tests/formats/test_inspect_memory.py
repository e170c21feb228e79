"""`obdconv inspect` reads headers, trailers and indexes, never a whole blob or archive member: its
peak memory stays small for a 1 GiB layer blob (sparse on disk) and for a ~2 MiB turboOCIv1.tar.gz
whose fs.meta member inflates to 512 MiB (issue #13, defect 8)."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from obdconv.cli.main import main
from obdconv.formats import lsmt, tarwrap
from obdconv.formats.gzindex import GzipIndexBuilder

GIB = 1 << 30
TURBO_META = 512 << 20  # inflating it costs CPU: each backward seek in a tar.gz decodes from the start
MAX_PEAK_RSS_MB = 150  # the interpreter and obdconv's imports are ~60 MB of it
UUID = "0B0B0B0B-1111-2222-3333-444455556666"

# A wrapper process whose only child is the CLI: RUSAGE_CHILDREN is then that child's peak RSS
# (in this process it would be the largest of every child the test session ever waited for).
MEASURE = """
import json, resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": p.returncode, "out": p.stdout, "err": p.stderr,
                  "peak_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def inspect_measured(path: Path) -> tuple[dict, float]:  # type: ignore[type-arg]
    """`obdconv inspect PATH --json` in a subprocess: (its JSON output, its peak RSS in MB)."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "obdconv", "inspect", str(path),
                           "--json"], capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(proc.stdout)
    assert result["rc"] == 0, result["err"]
    return json.loads(result["out"]), result["peak_rss_kb"] / 1024


def write_sparse_lsmt(f: io.BufferedWriter, data_bytes: int) -> list[lsmt.SegmentMapping]:
    """A committed LSMT file mapping `data_bytes` of data (a hole: nothing is written there) at
    offset 0; returns its index entries."""
    mappings = lsmt.split_long(0, data_bytes // lsmt.SECTOR, lsmt.HT_SPACE // lsmt.SECTOR, False)
    start = f.tell()
    f.write(lsmt.commit_header(4 * GIB, UUID, None, b"big"))
    f.seek(start + lsmt.HT_SPACE + data_bytes)
    f.write(lsmt.commit_tail(mappings, lsmt.HT_SPACE + data_bytes, 4 * GIB, UUID, None, b"big"))
    return mappings


def check_lsmt(info: dict, mappings: list[lsmt.SegmentMapping], data_bytes: int) -> None:  # type: ignore[type-arg]
    index = info["lsmt"]["index"]
    assert info["lsmt"]["uuid"] == UUID and info["lsmt"]["user_tag"] == "big"
    assert info["lsmt"]["size"] == 2 * lsmt.HT_SPACE + data_bytes + index_bytes(len(mappings))
    assert index["entries"] == len(mappings) and index["mapped_bytes"] == data_bytes


def index_bytes(entries: int) -> int:
    return -(-entries // lsmt.INDEX_PAD_ENTRIES) * lsmt.INDEX_PAD_ENTRIES * lsmt.SegmentMapping.SIZE


def test_large_layer_blob_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "overlaybd.commit.tar"
    with path.open("wb") as f:
        f.seek(tarwrap.BLOCK * 3)
        mappings = write_sparse_lsmt(f, GIB)
        size = f.tell() - tarwrap.BLOCK * 3
        f.write(tarwrap.wrap_suffix(size))
        f.seek(0)
        f.write(tarwrap.wrap_prefix(size))
    assert path.stat().st_size > GIB and path.stat().st_blocks * 512 < 16 << 20  # sparse on disk
    info, peak_mb = inspect_measured(path)
    assert info["tar_wrapper"] == {"payload_offset": tarwrap.BLOCK * 3, "payload_size": size}
    check_lsmt(info, mappings, GIB)
    assert peak_mb < MAX_PEAK_RSS_MB, f"inspect of a {path.stat().st_size >> 20} MB blob peaked at {peak_mb:.0f} MB"


def test_turbo_archive_members_are_not_read_whole(tmp_path: Path) -> None:
    meta_path = tmp_path / "ext4.fs.meta"
    with meta_path.open("wb") as f:
        mappings = write_sparse_lsmt(f, TURBO_META)
    layer = gzip.compress(b"layer tar bytes " * 4096, mtime=0)
    builder = GzipIndexBuilder()
    builder.feed(layer)
    gzip_meta = builder.finish(len(layer))
    path = tmp_path / "turboOCIv1.tar.gz"
    with gzip.GzipFile(path, "wb", compresslevel=1, mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tf:
        tf.add(meta_path, "ext4.fs.meta")
        for name, data in ((".turbo.ociv1", b""), ("gzip.meta", gzip_meta)):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tf.addfile(member, io.BytesIO(data))
    assert path.stat().st_size < 4 << 20  # the member inflates ~200-fold
    info, peak_mb = inspect_measured(path)
    members = {m["name"]: m for m in info["members"]}
    assert list(members) == ["ext4.fs.meta", ".turbo.ociv1", "gzip.meta"]
    assert members["ext4.fs.meta"]["size"] == meta_path.stat().st_size
    check_lsmt(members["ext4.fs.meta"]["content"], mappings, TURBO_META)
    assert members["gzip.meta"]["content"]["gzip_meta"]["gzip_file_size"] == len(layer)
    assert peak_mb < MAX_PEAK_RSS_MB, f"inspect of a turbo archive with a 512 MiB member peaked at {peak_mb:.0f} MB"


def test_payload_smaller_than_header_and_trailer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Found by fuzzing the file-backed reader: the trailer offset was negative, and seek/pread raised.
    payload = lsmt.commit_header(GIB, UUID, None)[:1000]  # the magic, and less than a header block
    path = tmp_path / "small.tar"
    path.write_bytes(tarwrap.wrap_prefix(len(payload)) + payload + tarwrap.wrap_suffix(len(payload)))
    assert main(["inspect", str(path)]) == 65
    assert f"LSMT file too small: {len(payload)} bytes" in capsys.readouterr().err
