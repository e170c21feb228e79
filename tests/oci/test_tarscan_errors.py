"""TarScanner rejections: each error is the right class and names the entry."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from obdconv.errors import FormatError, UnsafePathError, UnsupportedError
from obdconv.oci.tarscan import TarScanner
from tests.oci.helpers import END, info, make_tar, pad, raw_header, scan


def test_escaping_path_is_refused() -> None:
    raw = make_tar([(info("ok"), b"1"), (info("a/../../evil"), b"2")])
    with pytest.raises(UnsafePathError, match=r"a/\.\./\.\./evil"):
        scan(raw)


def test_escaping_hardlink_target_is_refused() -> None:
    raw = make_tar([(info("innocent", tarfile.LNKTYPE, linkname="../../etc/shadow"), None)])
    with pytest.raises(UnsafePathError, match="innocent"):
        scan(raw)


def test_non_directory_at_root_is_refused() -> None:
    raw = bytes(raw_header(b"./", typeflag=b"0", size=0)) + END
    with pytest.raises(UnsafePathError, match=r"root"):
        scan(raw)


def test_bad_checksum_names_entry() -> None:
    raw = bytearray(make_tar([(info("first"), b"a"), (info("second-entry"), b"b")]))
    # corrupt the mode of the second header (the first header + its block come before)
    second = raw.index(b"second-entry")
    raw[second + 100] = ord("7")
    with pytest.raises(FormatError, match=r"second-entry.*checksum"):
        scan(bytes(raw))


def test_truncated_in_content_names_entry() -> None:
    raw = make_tar([(info("big-file"), os.urandom(5000))])
    with pytest.raises(FormatError, match="big-file"):
        scan(raw[: 512 + 3000], [100])


def test_truncated_in_header() -> None:
    raw = make_tar([(info("a"), b"1"), (info("b"), b"2")])
    with pytest.raises(FormatError, match="inside a header"):
        scan(raw[: 1024 + 200])


def test_truncated_in_pax_header_names_entry() -> None:
    raw = make_tar([(info("p" * 200), b"1")], tarfile.PAX_FORMAT)
    with pytest.raises(FormatError, match="truncated"):
        scan(raw[:600])


def test_truncated_after_pax_header() -> None:
    raw = make_tar([(info("p" * 200), b"1")], tarfile.PAX_FORMAT)
    with pytest.raises(FormatError, match="without its entry"):
        scan(raw[:1024])


def test_truncated_in_padding() -> None:
    raw = make_tar([(info("f"), b"12345")])
    with pytest.raises(FormatError, match="padding"):
        scan(raw[: 512 + 100])


def test_zero_block_then_header_is_refused() -> None:
    raw = make_tar([(info("a"), b"1")])
    trick = raw[:1024] + bytes(512) + raw[:1024] + END
    with pytest.raises(FormatError, match="zero block"):
        scan(trick)


@pytest.mark.parametrize("typeflag", [b"V", b"D", b"M", b"N", b"Z"])
def test_unknown_typeflag_names_entry(typeflag: bytes) -> None:
    raw = bytes(raw_header(b"weird-entry", typeflag=typeflag)) + END
    with pytest.raises(UnsafePathError, match="weird-entry"):
        scan(raw)


def test_old_gnu_sparse_typeflag_names_entry() -> None:
    raw = bytes(raw_header(b"holes.img", typeflag=b"S", size=0)) + END
    with pytest.raises(UnsupportedError, match=r"holes\.img"):
        scan(raw)


def test_pax_sparse_names_entry() -> None:
    raw = make_tar([(info("GNUSparseFile.0/disk", pax_headers={"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                                          "GNU.sparse.name": "disk"}), b"")])
    with pytest.raises(UnsupportedError, match=r"GNUSparseFile\.0/disk"):
        scan(raw)


def test_malformed_pax_record() -> None:
    body = b"99 path=x\n"
    raw = bytes(raw_header(b"PaxHeaders/x", typeflag=b"x", size=len(body))) + pad(body) + END
    with pytest.raises(FormatError, match="PAX"):
        scan(raw)


def test_bad_octal_field_names_entry() -> None:
    block = raw_header(b"octal-victim", size=0)
    block[108:116] = b"99x9999\x00"
    from tests.oci.helpers import checksum

    checksum(block)
    with pytest.raises(FormatError, match=r"octal-victim.*uid"):
        scan(bytes(block) + END)


def test_feed_after_finish() -> None:
    scanner = TarScanner()
    scanner.feed(END)
    scanner.finish()
    with pytest.raises(RuntimeError):
        scanner.feed(b"x")


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_real_gnu_tar_sparse_is_rejected(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse.img", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    out = tmp_path / "layer.tar"
    subprocess.run(["tar", f"--format={fmt}", "--sparse", "-cf", str(out), "-C", str(src), "sparse.img"],
                   check=True)
    with pytest.raises(UnsupportedError, match="sparse"):
        scan(out.read_bytes())
