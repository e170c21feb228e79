"""The tar scanner's C fast path (obdconv.oci._tarscanfast) against its pure-Python reference.

Every archive here is scanned twice -- with the C fast path and with `tarscan.FAST = None` (what
OBDCONV_TARSCAN_NO_FAST=1 gives) -- in several chunkings, and the two must agree on everything:
entries, data area bytes, sizes, end state, or the exact error class and message.
"""

from __future__ import annotations

import gzip
import logging
import random
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from obdconv.errors import BadInputError
from obdconv.oci import tarscan
from obdconv.oci.tarscan import TarScanner
from tests.conftest import requires_shared
from tests.oci.helpers import (
    EDGE3_SOURCE_LAYERS,
    END,
    FIXTURES,
    Sink,
    checksum,
    info,
    make_tar,
    pad,
    random_chunks,
    raw_header,
)

pytestmark = pytest.mark.skipif(tarscan.FAST is None, reason="tar scanner C fast path not built or disabled")

CHUNKINGS: list[list[int] | None] = [None, [511], [512], [513], [4096], random_chunks(5, top=3000), [1 << 20]]


@contextmanager
def fast_path(enabled: bool) -> Iterator[None]:
    saved = tarscan.FAST
    tarscan.FAST = saved if enabled else None
    try:
        yield
    finally:
        tarscan.FAST = saved


def outcome(raw: bytes, chunks: list[int] | None, *, fast: bool, sink: bool = True) -> tuple[object, ...]:
    """Everything observable about scanning `raw` fed in `chunks` (cycled), or the error it raises."""
    data_sink = Sink() if sink else None
    with fast_path(fast):
        scanner = TarScanner(data_sink)
    try:
        pos = i = 0
        while pos < len(raw):
            n = chunks[i % len(chunks)] if chunks else len(raw)
            scanner.feed(memoryview(raw)[pos : pos + n])
            pos += n
            i += 1
        entries = scanner.finish()
    except BadInputError as e:
        return ("error", type(e).__name__, str(e))
    area = bytes(data_sink.buf) if data_sink else b""
    return ("ok", entries, area, scanner.data_area_size, scanner.tar_size, scanner.at_end)


def assert_same(raw: bytes, chunkings: list[list[int] | None] = CHUNKINGS) -> tuple[object, ...]:
    reference = outcome(raw, None, fast=False)
    for chunks in chunkings:
        assert outcome(raw, chunks, fast=True) == reference, f"chunks {chunks}"
        assert outcome(raw, chunks, fast=True, sink=False)[:2] == outcome(raw, chunks, fast=False, sink=False)[:2]
    return reference


def pax(records: list[tuple[bytes, bytes]], typeflag: bytes = b"x", name: bytes = b"PaxHeader") -> bytes:
    """A PAX extended header block and its padded body."""
    body = b""
    for key, value in records:
        payload = b" " + key + b"=" + value + b"\n"
        length = len(payload) + 1
        while len(str(length)) + len(payload) != length:
            length += 1
        body += str(length).encode() + payload
    return bytes(raw_header(name, typeflag, len(body))) + pad(body)


def member(name: bytes, data: bytes = b"", typeflag: bytes = b"0", **kw: object) -> bytes:
    return bytes(raw_header(name, typeflag, len(data), **kw)) + pad(data)  # type: ignore[arg-type]


def with_field(block: bytes, start: int, value: bytes) -> bytes:
    """`block` (a header followed by anything) with a field overwritten and the checksum redone."""
    header = bytearray(block[:512])
    header[start : start + len(value)] = value
    checksum(header)
    return bytes(header) + block[512:]


# -- the fast path is real --------------------------------------------------------------------------


def test_ordinary_members_never_reach_the_python_header_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = make_tar([(info(f"dir/{'long' * 40}/f{i}", mtime=1_700_000_000.25, uid=3_000_000), b"x" * i * 300)
                    for i in range(40)])
    python_headers: list[int] = []
    original = TarScanner._on_header
    monkeypatch.setattr(TarScanner, "_on_header",
                        lambda self, block: (python_headers.append(self._offset), original(self, block))[1])
    scanner = TarScanner(Sink())
    scanner.feed(raw)
    entries = scanner.finish()
    assert len(entries) == 40 and entries[5].mtime_ns == 1_700_000_000_250_000_000 and entries[5].uid == 3_000_000
    # Only the two zero blocks of the end marker went through Python.
    assert len(python_headers) == 2


def test_python_only_when_disabled_by_environment() -> None:
    import subprocess
    import sys

    code = "from obdconv.oci import tarscan; print(tarscan.FAST is None)"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                        env={"PATH": "/usr/bin:/bin"})
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin", "OBDCONV_TARSCAN_NO_FAST": "1"})
    assert (on.stdout.strip(), off.stdout.strip()) == ("False", "True")


# -- real tars ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tarfile_archives(fmt: int) -> None:
    rng = random.Random(fmt)
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [(info("top", tarfile.DIRTYPE, mode=0o755), None)]
    for i, size in enumerate([0, 1, 511, 512, 513, 4095, 4096, 4097, 10_000, 70_000, 0, 3]):
        members.append((info(f"top/f{i}", mode=0o4600 + i, uid=i, gid=2 * i, mtime=1_600_000_000 + i),
                        rng.randbytes(size)))
    members += [
        (info("top/link", tarfile.SYMTYPE, linkname="../x/./y"), None),
        (info("top/hard", tarfile.LNKTYPE, linkname="./top/../top/f2"), None),
        (info("top/fifo", tarfile.FIFOTYPE, mode=0o640), None),
        (info("top/tty", tarfile.CHRTYPE, devmajor=4, devminor=64), None),
        (info("top/sda", tarfile.BLKTYPE, devmajor=8, devminor=1), None),
        (info("top/cont", tarfile.CONTTYPE), b"contiguous"),
        (info("./top//x/./y/../z", mode=0o7777), b"cleaned"),
        (info("top/" + "p" * 99 + "/" + "q" * 60), b"prefix or long name"),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        members += [
            (info("top/" + "n" * 300, mtime=-12345), b"long name"),
            (info("top/longlink", tarfile.SYMTYPE, linkname="t" * 200), None),
            (info("top/longhard", tarfile.LNKTYPE, linkname="top/" + "n" * 300), None),
            (info("top/big-ids", uid=1 << 30, gid=(1 << 22) + 1), b"ids"),
            (info("top/caf\u00e9-\udcff"), b"non-utf8 name"),
        ]
    if fmt == tarfile.PAX_FORMAT:
        members += [
            (info("top/frac", mtime=1_700_000_000.123456789), b"frac"),
            (info("top/xattr", pax_headers={"SCHILY.xattr.user.a": "1", "SCHILY.xattr.security.b": "\udcff"}),
             b"xattrs"),
            (info("top/comment", pax_headers={"comment": "ignored", "atime": "1.5"}), b"ignored keys"),
        ]
    reference = assert_same(make_tar(members, fmt))
    assert reference[0] == "ok"


@requires_shared
def test_fixture_layers() -> None:
    layers = [*EDGE3_SOURCE_LAYERS]
    blobs = FIXTURES / "hello-world" / "blobs" / "sha256"
    layers += [p for p in sorted(blobs.iterdir()) if p.read_bytes()[:2] == b"\x1f\x8b"][:3]
    for layer in layers:
        assert assert_same(gzip.decompress(layer.read_bytes()))[0] == "ok", layer.name


def test_many_small_files_across_record_and_arena_limits() -> None:
    """More records than one C call holds, and paths big enough to fill its arena."""
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for i in range(tarscan._FAST_MAX_RECORDS + 300):
        members.append((info(f"d/{i}", mtime=i), bytes([i % 251]) * (i % 700)))
    for i in range(20):
        members.append((info(f"long/{i}-" + "x" * 60_000), b"y"))
    assert_same(make_tar(members, tarfile.PAX_FORMAT), [None, [1 << 20], random_chunks(8, top=200_000)])


# -- hand-made edge cases: each must give the same entries or the same error ------------------------

def _cases() -> dict[str, Callable[[], bytes]]:
    ok = member(b"ok", b"data")
    return {
        "ustar prefix": lambda: member(b"name", b"x", prefix=b"some/prefix") + END,
        "prefix without posix magic": lambda: member(b"name", b"x", magic=b"ustar  \x00", prefix=b"ignored") + END,
        "prefix only, empty name": lambda: member(b"", b"", b"\x00", prefix=b"dir") + END,
        "aregtype dir": lambda: member(b"olddir/", b"", b"\x00") + ok + END,
        "aregtype dir with data": lambda: member(b"olddir/", b"abc", b"\x00") + ok + END,
        "regular named with slash": lambda: member(b"file/", b"abc", b"0") + END,
        "socket": lambda: member(b"sock", b"", mode=0o140755) + ok + END,
        "whiteout": lambda: member(b"d/.wh.gone") + member(b".wh.top") + ok + END,
        "opaque": lambda: member(b"d/.wh..wh..opq") + member(b".wh..wh..opq") + ok + END,
        "aufs": lambda: member(b".wh..wh.plnk/123", b"zz") + member(b".wh..wh.aufs") + ok + END,
        "bad whiteout": lambda: member(b"d/.wh..") + END,
        "root dir": lambda: member(b"./", b"", b"5", mode=0o700) + ok + END,
        "root file": lambda: member(b"./", b"x") + END,
        "escape": lambda: ok + member(b"a/../../x") + END,
        "hardlink escape": lambda: member(b"h", typeflag=b"1", linkname=b"../x") + END,
        "hardlink to root": lambda: member(b"h", typeflag=b"1", linkname=b"./") + END,
        "symlink kept verbatim": lambda: member(b"s", typeflag=b"2", linkname=b"./a/../b//") + END,
        "devices": lambda: with_field(member(b"dev", typeflag=b"3"), 329, b"0000012\x000000034\x00") + END,
        "bad devmajor": lambda: with_field(member(b"dev", typeflag=b"4"), 329, b"0000019\x00") + END,
        "dir with size": lambda: with_field(member(b"dir", typeflag=b"5"), 124, b"00000001000\x00") + ok + END,
        "bad checksum": lambda: ok + member(b"x", b"1")[:148] + b"0000000\x00" + member(b"x", b"1")[156:] + END,
        "odd checksum spelling": lambda: _respell_checksum(member(b"x", b"1")) + END,
        "signed checksum": lambda: _signed_checksum_member() + END,
        "base-256 size": lambda: with_field(member(b"b", b"q" * 700), 124, b"\x80" + (700).to_bytes(11, "big"))
        + END,
        "base-256 negative mtime": lambda: with_field(member(b"b"), 136, (-5).to_bytes(12, "big", signed=True))
        + END,
        "octal with 8": lambda: with_field(member(b"b"), 100, b"0000648\x00") + END,
        "octal with spaces": lambda: with_field(member(b"b", b"1"), 100, b"  644  \x00") + END,
        "octal junk": lambda: with_field(member(b"b"), 108, b"12 34\x00\x00\x00") + END,
        "empty number fields": lambda: with_field(member(b"b"), 108, b"\x00" * 16) + END,
        "huge mtime": lambda: with_field(member(b"b"), 136, b"77777777777\x00") + END,
        "unknown type": lambda: member(b"z", typeflag=b"Z") + END,
        "gnu sparse": lambda: member(b"z", typeflag=b"S") + END,
        "gnu long name": lambda: member(b"././@LongLink", b"long/" + b"n" * 150 + b"\x00", b"L") + ok + END,
        "gnu long link": lambda: member(b"././@LongLink", b"t" * 150 + b"\x00", b"K")
        + member(b"l", typeflag=b"2") + END,
        "global header": lambda: pax([(b"comment", b"g")], b"g") + ok + END,
        "pax basic": lambda: pax([(b"path", b"p/" + b"q" * 200), (b"mtime", b"1700000000.5"), (b"uid", b"70000"),
                                  (b"gid", b"0012")]) + ok + END,
        "pax size override": lambda: pax([(b"size", b"5")]) + with_field(member(b"s", b"12345"), 124,
                                                                         b"00000000000\x00") + END,
        "pax size on a dir": lambda: pax([(b"size", b"5000")]) + member(b"d", typeflag=b"5") + ok + END,
        "pax linkpath": lambda: pax([(b"linkpath", b"a/./../b")]) + member(b"h", typeflag=b"1")
        + pax([(b"linkpath", b"x" * 300)]) + member(b"s", typeflag=b"2") + END,
        "pax X typeflag": lambda: pax([(b"path", b"solaris")], b"X") + ok + END,
        "pax mtime forms": lambda: b"".join(pax([(b"mtime", t)]) + member(b"m%d" % i) for i, t in enumerate(
            [b"-1.5", b" 12.\n", b"0.1234567891", b"-0", b"1.000000001", b"99999999999", b"1e3", b"1.2.3", b"--1"]))
        + END,
        "pax mtime negative": lambda: pax([(b"mtime", b"-86400.25")]) + ok + END,
        "pax bad mtime": lambda: pax([(b"mtime", b"12x")]) + ok + END,
        "pax uid forms": lambda: pax([(b"uid", b" 12 ")]) + ok + pax([(b"gid", b"+7")]) + ok
        + pax([(b"uid", b"1_000")]) + ok + END,
        "pax bad uid": lambda: pax([(b"uid", b"abc")]) + ok + END,
        "pax negative size": lambda: pax([(b"size", b"-1")]) + ok + END,
        "pax duplicate keys": lambda: pax([(b"path", b"first"), (b"path", b"second"), (b"mtime", b"5")]) + ok + END,
        "pax empty path": lambda: pax([(b"path", b"")]) + member(b"dir", typeflag=b"5") + END,
        "pax escaping path": lambda: pax([(b"path", b"../up")]) + ok + END,
        "pax xattr": lambda: pax([(b"SCHILY.xattr.user.x", b"\x00\xff\n=")]) + ok + END,
        "pax sparse": lambda: pax([(b"GNU.sparse.major", b"1")]) + ok + END,
        "pax empty body": lambda: member(b"PaxHeader", b"", b"x") + ok + END,
        "pax nul padding": lambda: member(b"PaxHeader", b"9 uid=42\n\x00\x00\x00", b"x") + ok + END,
        "pax malformed length": lambda: member(b"PaxHeader", b"x9 uid=42\n", b"x") + ok + END,
        "pax leading zeros": lambda: member(b"PaxHeader", b"010 uid=42\n", b"x") + ok + END,
        "pax length too short": lambda: member(b"PaxHeader", b"3 uid=42\n", b"x") + ok + END,
        "pax no newline": lambda: member(b"PaxHeader", b"9 uid=42x", b"x") + ok + END,
        "pax no equals": lambda: member(b"PaxHeader", b"8 uid42\n", b"x") + ok + END,
        "pax no space": lambda: member(b"PaxHeader", b"9" * 30, b"x") + ok + END,
        "two pax headers": lambda: pax([(b"uid", b"1")]) + pax([(b"gid", b"2")]) + ok + END,
        "pax then gnu long name": lambda: pax([(b"uid", b"1")])
        + member(b"././@LongLink", b"gnu-long\x00", b"L") + ok + END,
        "pax then end": lambda: pax([(b"uid", b"1")]) + END,
        "pax too big": lambda: with_field(member(b"PaxHeader", b"", b"x"), 124, b"%011o\x00" % ((64 << 20) + 1))
        + END,
        "zero block then header": lambda: ok + bytes(512) + ok + END,
        "no end marker": lambda: ok + member(b"other", b"x" * 5000),
        "trailing data": lambda: ok + END + b"garbage" * 1000,
        "truncated content": lambda: ok + member(b"t", b"x" * 5000)[:3000],
        "truncated padding": lambda: ok + member(b"t", b"x" * 100)[:300],
        "truncated header": lambda: ok + member(b"t")[:300],
        "truncated pax": lambda: ok + pax([(b"path", b"x" * 900)])[:1000],
        "non-utf8 names": lambda: member(b"caf\xe9/\xff\xfe", b"1") + member(b"l\xff", typeflag=b"2",
                                                                           linkname=b"\xfe\xfd") + END,
        "nul in pax path": lambda: pax([(b"path", b"a\x00b")]) + ok + END,
    }


def _respell_checksum(block: bytes) -> bytes:
    """The same checksum value written with a leading tab (Python's int() accepts it)."""
    header = bytearray(block[:512])
    value = int(bytes(header[148:154]), 8)
    header[148:156] = b"\t%05o\x00 " % value
    return bytes(header) + block[512:]


def _signed_checksum_member() -> bytes:
    header = raw_header(b"signed\xff\xfe", b"0", 3)
    header[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in header)
    header[148:156] = b"%06o\x00 " % signed
    return bytes(header) + pad(b"abc")


@pytest.mark.parametrize("case", sorted(_cases()))
def test_edge_case_agrees_with_python(case: str, caplog: pytest.LogCaptureFixture) -> None:
    raw = _cases()[case]()
    chunkings: list[list[int] | None] = [*CHUNKINGS, [1], [7, 505, 1024]]
    with caplog.at_level(logging.WARNING, logger="obdconv.oci.tarscan"):
        reference = assert_same(raw, chunkings)
    if case == "socket":
        assert reference[0] == "ok" and "socket" in caplog.text
    if case in ("escape", "bad checksum", "pax sparse", "zero block then header", "truncated content"):
        assert reference[0] == "error"  # the harness compares errors too, not just successes


def test_strided_chunks_use_the_python_path() -> None:
    """A non-contiguous memoryview has no plain pointer for the C code: still scanned correctly."""
    raw = make_tar([(info(f"f{i}"), b"z" * (i * 100)) for i in range(20)])
    doubled = bytes(b for byte in raw for b in (byte, 0))
    with fast_path(True):
        scanner = TarScanner()
    scanner.feed(memoryview(doubled)[::2])
    assert scanner.finish() == outcome(raw, None, fast=False, sink=False)[1]


def test_mutated_headers_agree_with_python() -> None:
    """Bytes of headers and PAX bodies overwritten at random (seeded), checksums redone or not: the
    C path must still agree with Python on every mutant, whether it scans or fails."""
    rng = random.Random(7)
    members = [(info("dir/" + ("f" * 110 if n % 2 else "") + f"file{n}.txt", mtime=1700000000.5 + n),
                rng.randbytes(rng.randrange(0, 3000))) for n in range(6)]  # odd ones need PAX paths
    base = make_tar(members, tarfile.PAX_FORMAT)
    assert base.count(b"path=") >= 3
    headers = [off for off in range(0, len(base) - 1024, 512) if base[off + 257 : off + 262] == b"ustar"]
    interesting = (b"0", b"7", b"\x00", b"/", b".", b" ", b"x", b"5", b"\n", b"=", b"9")
    for _ in range(300):
        raw = bytearray(base)
        off = rng.choice(headers)
        for _ in range(rng.randrange(1, 4)):
            at = off + rng.randrange(0, 1024)  # the header or the PAX body right after it
            raw[at] = rng.choice(interesting)[0] if rng.random() < 0.7 else rng.randrange(256)
        if rng.random() < 0.8:
            checksum(memoryview(raw)[off : off + 512])
        assert_same(bytes(raw), [None, [512], random_chunks(3, top=2000)])
