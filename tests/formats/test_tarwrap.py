"""Tar wrapper (§2.6): exact bytes of the tool's wrapper, and both unwrap forms."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from obdconv.errors import FormatError
from obdconv.formats import tarwrap


def test_prefix_and_suffix_match_fixture(obd_dir: Path) -> None:
    blob = (obd_dir / "commit.lsmt.zfile.tar").read_bytes()
    assert tarwrap.unwrap(blob) == (1536, 1392)
    assert tarwrap.wrap_prefix(1392) == blob[:1536]
    assert tarwrap.wrap_suffix(1392) == blob[1536 + 1392 :]
    assert blob[512:525] == b"13 size=1392\n"  # the spec's example record


def test_python_tarfile_reads_our_wrapper() -> None:
    payload = bytes(range(256)) * 5 + b"tail"
    blob = tarwrap.wrap_prefix(len(payload)) + payload + tarwrap.wrap_suffix(len(payload))
    assert len(blob) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        (member,) = tf.getmembers()
        assert member.name == "overlaybd.commit" and member.size == len(payload)
        assert member.mode == 0o100644 and member.uname == "root" and member.mtime == 0
        assert tf.extractfile(member).read() == payload  # type: ignore[union-attr]
    assert tarwrap.unwrap(blob) == (1536, len(payload))


def test_pax_record_length_counts_itself() -> None:
    for n in (0, 9, 99_999, 10**12):
        rec = tarwrap.pax_record("size", str(n))
        length, _ = rec.split(b" ", 1)
        assert int(length) == len(rec)


def test_go_archive_tar_form() -> None:
    # ACI's Go wrapper: one plain ustar header, payload at 512 (made here with Python's tarfile).
    payload = b"Z" * 1000
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("overlaybd.commit")
        info.size, info.mode = len(payload), 0o444
        tf.addfile(info, io.BytesIO(payload))
    blob = buf.getvalue()
    off, size = tarwrap.unwrap(blob)  # type: ignore[misc]
    assert (off, size) == (512, 1000) and blob[off : off + size] == payload


def test_not_a_tar() -> None:
    assert tarwrap.unwrap(b"ZFile\x00\x01\x00" + bytes(600)) is None
    blob = bytearray(tarwrap.wrap_prefix(10))
    blob[148] ^= 1  # checksum broken: not recognised, like is_tar_file
    assert tarwrap.unwrap(bytes(blob)) is None


def test_bad_pax_record() -> None:
    blob = bytearray(tarwrap.wrap_prefix(10))
    blob[512:520] = b"xx size="
    with pytest.raises(FormatError, match="PAX"):
        tarwrap.unwrap(bytes(blob))
