"""One test per defect the fuzzing found (tests/fuzz/README.md lists them), each failing on the code
before its fix."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from obdconv.errors import BadInputError, FormatError
from obdconv.formats import tarwrap
from obdconv.oci import tarscan
from obdconv.oci.tree import tree_from_tar_layers
from tests.fuzz.targets import tar_scanner, tar_wrapper
from tests.oci.helpers import END, checksum, pad, raw_header


def _base256(value: int, width: int) -> bytes:
    """GNU base-256: the first byte's high bit set, two's complement big-endian."""
    raw = bytearray(value.to_bytes(width, "big", signed=True))
    raw[0] |= 0x80
    return bytes(raw)


@pytest.mark.skipif(tarscan.FAST is None, reason="tar scanner C fast path not built")
def test_garbage_collecting_a_tar_error_does_not_segfault() -> None:
    """Defect 1: the C fast path's buffer of the chunk was held by the frame of `feed`; when a bad
    header raised there and the exception's traceback ended in a reference cycle, the garbage
    collector cleared the memoryview before cffi released it: BufferError, then a segfault."""
    script = textwrap.dedent("""
        import gc
        from obdconv.errors import BadInputError, FormatError
        from obdconv.oci.tarscan import TarScanner
        from tests.oci.helpers import pad, raw_header
        tar = bytes(raw_header(b"a", size=5)) + pad(b"hello") + b"\\x01" * 512 + bytes(1024)
        for _ in range(3):
            try:
                TarScanner().feed(tar)  # the C path takes "a", Python fails on the garbage header
            except FormatError as e:
                e.cycle = [e]  # the exception reachable only through a cycle, as tracebacks often are
            gc.collect()
        print("survived")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("mode", [-1, -(1 << 60), 1 << 62], ids=["minus-one", "very-negative", "huge"])
def test_base256_mode_of_any_value_parses(mode: int) -> None:
    """Defect 2: a regular member's mode field in GNU base-256 holding a negative (or a value past
    an unsigned int) number made the socket check raise OverflowError instead of parsing."""
    header = raw_header(b"f", size=3)
    header[100:108] = _base256(mode, 8)
    checksum(header)
    tar = bytes(header) + pad(b"abc") + END
    for chunking in (0, 0x80):  # both parsers (the target compares them), with and without fix-ups
        tar_scanner(bytes([chunking]) + tar)
    entries = tarscan.scan_tar(io.BytesIO(tar)).entries
    assert [(e.path, e.mode) for e in entries] == [("f", mode & 0o7777)]


def test_tar_wrapper_refuses_a_negative_size() -> None:
    """Defect 3: the tar wrapper took a PAX `size=-7` (and a signed octal size field) through int(),
    returning a negative payload size for the ZFile/LSMT readers behind it."""
    prefix = bytearray(tarwrap.wrap_prefix(70))
    at = prefix.find(b"size=70")
    prefix[at : at + 7] = b"size=-7"
    with pytest.raises(FormatError, match="bad PAX size"):
        tar_wrapper(bytes(prefix) + bytes(512))
    header = raw_header(b"overlaybd.commit")
    header[124:136] = b"-0000000070\x00"
    checksum(header)
    with pytest.raises(FormatError, match="bad octal number"):
        tar_wrapper(bytes(header) + bytes(1024))
    assert tarwrap.unwrap(tarwrap.wrap_prefix(70) + bytes(70)) == (1536, 70)  # the well-formed one still works


@pytest.mark.parametrize("mtime", ["9" * 5000, "-" + "1" * 31, "--5", "1.2.3", "\u0661\u0662"])
def test_pax_mtime_beyond_any_time_is_bad_input(tmp_path: Path, mtime: str) -> None:
    """Defect 4 (found by review while writing the targets, not by the fuzzer): a PAX mtime of
    more than 4300 digits made int() raise ValueError in the scanner and in verify's tar model;
    the model also took forms the scanner refuses. Both now say FormatError/BadInputError."""
    info = tarfile.TarInfo("f")
    info.pax_headers = {"mtime": mtime}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.addfile(info, io.BytesIO(b""))
    with pytest.raises(FormatError, match="bad PAX mtime"):
        tar_scanner(b"\x00" + buf.getvalue())
    path = tmp_path / "l.tar"
    path.write_bytes(buf.getvalue())
    with pytest.raises(BadInputError, match="bad PAX mtime"):
        tree_from_tar_layers([path])
