"""TarScanner against tars written by Python's tarfile (GNU, PAX, ustar), GNU tar and the fixtures."""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile

import pytest

from obdconv.entries import EntryType, LayerEntry
from obdconv.oci.tarscan import TarScanner, clean_path, scan_tar
from tests.conftest import requires_shared
from tests.oci.helpers import (
    EDGE3_OVERLAYBD_LAYERS,
    EDGE3_SOURCE_LAYERS,
    END,
    FIXTURES,
    Sink,
    info,
    make_tar,
    pad,
    random_chunks,
    raw_header,
    scan,
)

FORMATS = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT, "ustar": tarfile.USTAR_FORMAT}


def _mixed_members(seed: int) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    rng = random.Random(seed)
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (info("top", tarfile.DIRTYPE, mode=0o755), None),
    ]
    sizes = [0, 1, 511, 512, 513, 4095, 4096, 4097, 10_000, 70_000, 0, 3]
    for i, size in enumerate(sizes):
        members.append((info(f"top/f{i}", mode=0o600 + i, uid=i, gid=2 * i, mtime=1_600_000_000 + i),
                        rng.randbytes(size)))
    members.append((info("top/link", tarfile.SYMTYPE, linkname="f1"), None))
    members.append((info("top/hard", tarfile.LNKTYPE, linkname="top/f2"), None))
    members.append((info("top/fifo", tarfile.FIFOTYPE, mode=0o640), None))
    members.append((info("top/tty", tarfile.CHRTYPE, devmajor=4, devminor=64), None))
    members.append((info("top/sda", tarfile.BLKTYPE, devmajor=8, devminor=1), None))
    members.append((info("top/cont", tarfile.CONTTYPE), b"contiguous"))
    return members


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_offsets_and_fields_match_tarfile(fmt: str) -> None:
    raw = make_tar(_mixed_members(1), FORMATS[fmt])
    entries, _, _ = scan(raw)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = tar.getmembers()
    assert len(entries) == len(members)
    kinds = {tarfile.DIRTYPE: EntryType.DIR, tarfile.SYMTYPE: EntryType.SYMLINK, tarfile.LNKTYPE: EntryType.HARDLINK,
             tarfile.FIFOTYPE: EntryType.FIFO, tarfile.CHRTYPE: EntryType.CHAR, tarfile.BLKTYPE: EntryType.BLOCK}
    for e, m in zip(entries, members, strict=True):
        assert e.path == m.name
        assert e.type == kinds.get(m.type, EntryType.FILE)
        assert (e.mode, e.uid, e.gid) == (m.mode, m.uid, m.gid)
        assert e.mtime_ns == int(m.mtime) * 10**9
        if m.isreg():
            assert e.tar_offset == m.offset_data
            assert e.size == m.size
        else:
            assert e.tar_offset == -1
        if m.issym() or m.islnk():
            assert e.link_target == m.linkname
        if m.ischr() or m.isblk():
            assert (e.devmajor, e.devminor) == (m.devmajor, m.devminor)


def test_data_area_layout() -> None:
    members = _mixed_members(2)
    raw = make_tar(members)
    entries, area, area_size = scan(raw)
    assert area_size == len(area)
    assert area_size % 4096 == 0
    contents = {ti.name: data for ti, data in members if data is not None}
    covered = bytearray(len(area))
    previous_end = 0
    for e in entries:
        if e.type != EntryType.FILE:
            assert e.data_offset == -1
            continue
        data = contents[e.path]
        if not data:
            assert e.data_offset == -1
            continue
        assert e.data_offset % 4096 == 0
        assert e.data_offset >= previous_end  # tar order, no overlap
        assert area[e.data_offset : e.data_offset + len(data)] == data
        covered[e.data_offset : e.data_offset + len(data)] = b"\x01" * len(data)
        previous_end = e.data_offset + len(data)
        assert raw[e.tar_offset : e.tar_offset + e.size] == data
    # everything not covered by a file is zero padding, and nothing is wasted beyond alignment
    assert all(b == 0 for b, c in zip(area, covered, strict=True) if not c)
    expected_size = sum(-(-len(d) // 4096) * 4096 for d in contents.values())
    assert area_size == expected_size


def test_layout_without_sink_is_the_same() -> None:
    raw = make_tar(_mixed_members(3))
    with_sink, _, size1 = scan(raw)
    without, area, size2 = scan(raw, sink=False)
    assert area == b""
    assert with_sink == without
    assert size1 == size2


@pytest.mark.parametrize("chunks", [[1], [511, 2], [513], [4096], random_chunks(7), random_chunks(8, top=40)])
def test_chunking_gives_identical_results(chunks: list[int]) -> None:
    raw = make_tar(_mixed_members(4), tarfile.GNU_FORMAT) + b"trailing garbage after the end"
    reference = scan(raw)
    assert scan(raw, chunks) == reference


def test_memoryview_and_bytearray_chunks() -> None:
    raw = make_tar(_mixed_members(5))
    reference = scan(raw)
    sink = io.BytesIO()
    scanner = TarScanner(sink)
    view = memoryview(bytearray(raw))
    for i in range(0, len(raw), 1000):
        scanner.feed(view[i : i + 1000])
    assert scanner.finish() == reference[0]
    assert sink.getvalue() == reference[1]


def test_gnu_long_names_and_links() -> None:
    long_dir = "d" * 150
    long_name = f"{long_dir}/{'n' * 120}"
    long_target = f"{long_dir}/{'t' * 130}"
    members = [
        (info(long_name), b"x" * 10),
        (info(long_target), b"y"),
        (info(f"{long_dir}/hard", tarfile.LNKTYPE, linkname=long_target), None),
        (info(f"{long_dir}/sym", tarfile.SYMTYPE, linkname="../" + "s" * 200), None),
    ]
    raw = make_tar(members, tarfile.GNU_FORMAT)
    assert b"././@LongLink" in raw  # really the GNU 'L'/'K' form
    entries, area, _ = scan(raw, [100])
    assert [e.path for e in entries] == [long_name, long_target, f"{long_dir}/hard", f"{long_dir}/sym"]
    assert entries[2].link_target == long_target
    assert entries[3].link_target == "../" + "s" * 200  # symlink targets are kept verbatim
    assert area[: 10] == b"x" * 10


def test_ustar_prefix() -> None:
    name = "p" * 90 + "/" + "q" * 90 + "/file"
    raw = make_tar([(info(name), b"abc")], tarfile.USTAR_FORMAT)
    assert raw[345:435] == b"p" * 90  # name really split into prefix + name
    (entry,), _, _ = scan(raw)
    assert entry.path == name


def test_prefix_ignored_without_posix_magic() -> None:
    block = raw_header(b"file", size=3, magic=b"ustar  \x00", prefix=b"ignored")
    (entry,), _, _ = scan(bytes(block) + pad(b"abc") + END)
    assert entry.path == "file"


def test_pax_fields() -> None:
    cap = bytes([1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    members = [
        (info("a", uid=3_000_000_000, gid=4_000_000_000,
              pax_headers={"mtime": "1700000000.123456789", "SCHILY.xattr.user.k": "v1",
                           "SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
                           "SCHILY.xattr.trusted.t": "\u00e9"}), b"data"),
        (info("old", pax_headers={"mtime": "-1.25"}), b""),
        (info("x" * 300), b"long"),
        (info("sym", tarfile.SYMTYPE, linkname="l" * 300), None),
    ]
    raw = make_tar(members, tarfile.PAX_FORMAT)
    entries, _, _ = scan(raw, [37])
    a, old, long_entry, sym = entries
    assert (a.uid, a.gid) == (3_000_000_000, 4_000_000_000)
    assert a.mtime_ns == 1_700_000_000_123_456_789
    assert a.xattrs == [("user.k", b"v1"), ("security.capability", cap), ("trusted.t", "\u00e9".encode())]
    assert old.mtime_ns == -1_250_000_000
    assert long_entry.path == "x" * 300
    assert sym.link_target == "l" * 300


def test_pax_global_header_is_skipped() -> None:
    raw = make_tar([(info("f"), b"1")], tarfile.PAX_FORMAT, pax_headers={"comment": "global", "path": "nope"})
    assert raw[156:157] == b"g"
    (entry,), _, _ = scan(raw)
    assert entry.path == "f"


def test_gnu_base256_numbers() -> None:
    raw = make_tar([(info("f", uid=10**10, gid=2**40, mtime=-100), b"z")], tarfile.GNU_FORMAT)
    assert raw[108] & 0x80 and raw[136] == 0xFF  # tarfile really wrote base-256
    (entry,), _, _ = scan(raw)
    assert (entry.uid, entry.gid, entry.mtime_ns) == (10**10, 2**40, -100 * 10**9)


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_size_beyond_8gib(fmt: str) -> None:
    size = (8 << 30) + 12345
    # headers only (tobuf); the content is streamed below without building an 8 GiB tar
    header = info("big", size=size).tobuf(FORMATS[fmt], "utf-8", "surrogateescape")
    assert len(header) == (512 if fmt == "gnu" else 1536)
    tail = make_tar([(info("after"), b"tail")], FORMATS[fmt])
    scanner = TarScanner()
    scanner.feed(header)
    zeros = memoryview(bytes(16 << 20))
    left = size
    while left:
        n = min(left, len(zeros))
        scanner.feed(zeros[:n])
        left -= n
    scanner.feed(bytes(-size % 512))
    scanner.feed(tail)
    big, after = scanner.finish()
    assert big.size == size
    assert big.tar_offset == len(header)
    assert after.tar_offset == len(header) + size + (-size % 512) + tail.index(b"tail")
    assert after.data_offset == -(-size // 4096) * 4096
    assert scanner.data_area_size == after.data_offset + 4096


def test_whiteouts() -> None:
    members = [
        (info("a/.wh.gone"), b""),
        (info("a/b/.wh..wh..opq"), b""),
        (info(".wh..wh..opq"), b""),
        (info(".wh.top"), b""),
        (info(".wh..wh.plnk", tarfile.DIRTYPE), None),
        (info(".wh..wh.plnk/123", tarfile.REGTYPE), b"aufs hardlink source"),
        (info("a/.wh..wh.aufs"), b""),
        (info("a/kept"), b"k"),
    ]
    entries, area, _ = scan(make_tar(members))
    assert [(e.type, e.path) for e in entries] == [
        (EntryType.WHITEOUT, "a/gone"),
        (EntryType.OPAQUE, "a/b"),
        (EntryType.OPAQUE, "."),
        (EntryType.WHITEOUT, "top"),
        (EntryType.FILE, "a/kept"),
    ]
    assert entries[-1].data_offset == 0 and area[:1] == b"k"


def test_path_cleaning() -> None:
    members = [
        (info("./", tarfile.DIRTYPE, mode=0o700, uid=5), None),
        (info("/abs//x/./y"), b"1"),
        (info("a/../b/c/../d"), b"2"),
        (info("h", tarfile.LNKTYPE, linkname="/abs/x/../x/y"), None),
        (info("s", tarfile.SYMTYPE, linkname="./../../etc//passwd"), None),
    ]
    entries, _, _ = scan(make_tar(members, tarfile.GNU_FORMAT))
    root, abs_, rel, hard, sym = entries
    assert (root.path, root.type, root.mode, root.uid) == (".", EntryType.DIR, 0o700, 5)
    assert abs_.path == "abs/x/y"
    assert rel.path == "b/d"
    assert hard.link_target == "abs/x/y"
    assert sym.link_target == "./../../etc//passwd"


def test_clean_path_function() -> None:
    assert clean_path("a/b/../../c", "e") == "c"
    assert clean_path("/", "e") == ""
    assert clean_path("a/./b//", "e") == "a/b"


def test_old_style_directory_and_socket(caplog: pytest.LogCaptureFixture) -> None:
    old_dir = raw_header(b"olddir/", typeflag=b"\x00", mode=0o755)
    sock = raw_header(b"sock", typeflag=b"0", mode=0o140755)
    entries, _, _ = scan(bytes(old_dir) + bytes(sock) + raw_header(b"f", size=1) + pad(b"!") + END)
    assert [(e.path, e.type) for e in entries] == [("olddir", EntryType.DIR), ("f", EntryType.FILE)]
    assert any("sock" in r.getMessage() and "socket" in r.getMessage() for r in caplog.records)


def test_signed_checksum_accepted() -> None:
    block = raw_header("é".encode() + b"\xff", size=0)
    signed = sum(b - 256 if b > 127 else b for b in block[:148]) + 256 + sum(
        b - 256 if b > 127 else b for b in block[156:])
    block[148:156] = b"%06o\x00 " % signed
    (entry,), _, _ = scan(bytes(block) + END)
    assert entry.path == "é\udcff"  # non-UTF-8 byte kept via surrogateescape


def test_end_without_marker_and_trailing_data() -> None:
    raw = make_tar([(info("f"), b"abc")])
    body = raw[:1024]  # header + content block, no end marker
    assert [e.path for e in scan(body)[0]] == ["f"]
    scanner = TarScanner()
    scanner.feed(raw + b"\x00" * 5000 + b"junk")
    assert scanner.at_end
    assert [e.path for e in scanner.finish()] == ["f"]
    assert scanner.tar_size == len(raw) + 5004


def test_pop_entries_streams() -> None:
    raw = make_tar([(info(f"f{i}"), b"x" * 600) for i in range(5)])
    scanner = TarScanner()
    seen = []
    for i in range(0, len(raw), 700):
        scanner.feed(raw[i : i + 700])
        seen.extend(e.path for e in scanner.pop_entries())
    scanner.finish()
    seen.extend(e.path for e in scanner.pop_entries())
    assert seen == [f"f{i}" for i in range(5)]


@requires_shared
def test_edge3_fixture_layers_match_tarfile() -> None:
    for layer in EDGE3_SOURCE_LAYERS:
        raw = gzip.decompress(layer.read_bytes())
        entries, area, _ = scan(raw, random_chunks(11, top=70_000))
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            regular = {m.name.strip("/").removeprefix("./"): m for m in tar.getmembers() if m.isreg()}
        files = [e for e in entries if e.type == EntryType.FILE]
        for e in files:
            m = regular[e.path]
            assert e.tar_offset == m.offset_data
            if e.size:
                assert area[e.data_offset : e.data_offset + e.size] == raw[m.offset_data : m.offset_data + m.size]
        assert len(files) == len([m for n, m in regular.items() if not n.rpartition("/")[2].startswith(".wh.")])


@requires_shared
def test_edge3_fixture_details() -> None:
    by_layer = [{e.path: e for e in scan_tar(gzip.open(p)).entries} for p in EDGE3_SOURCE_LAYERS]
    first, second, third = by_layer
    assert first["data/null"].type == EntryType.CHAR and (first["data/null"].devmajor, first["data/null"].devminor) == (1, 3)
    assert first["data/fifo"].type == EntryType.FIFO
    assert first["data/suid"].mode == 0o4755
    assert first["tmpdir"].mode == 0o1777
    assert first["data/owned"].uid == 1000
    assert ("user.test", b"value-1") in first["data/hardlink.txt"].xattrs
    assert first["abs-link"].link_target == "/etc/os-release"
    assert second["etc/hello-link"].type == EntryType.HARDLINK
    assert {p for p, e in second.items() if e.type == EntryType.WHITEOUT} == {"data/remove-me", "data/symlink", "gone"}
    assert any(len(p.rpartition("/")[2]) > 100 for p in third)


@requires_shared
def test_tar_wrapper_of_reference_layer() -> None:
    """The reference's overlaybd layer blob is itself a PAX tar (spec overlaybd-format §2.6)."""
    blob = EDGE3_OVERLAYBD_LAYERS[0].read_bytes()
    scanner = scan_tar(io.BytesIO(blob), chunk_size=777)
    (entry,) = scanner.entries
    assert entry.path == "overlaybd.commit"
    assert entry.tar_offset == 1536
    assert blob[1536 : 1536 + 5] == b"ZFile"
    assert entry.size == int(blob[512:1024].split(b"size=")[1].split(b"\n")[0])


@requires_shared
def test_hello_world_platform_layers() -> None:
    """Every gzip layer of the multi-platform fixture: same regular files and offsets as tarfile."""
    blobs = FIXTURES / "hello-world" / "blobs" / "sha256"
    layers = [p for p in sorted(blobs.iterdir()) if p.read_bytes()[:2] == b"\x1f\x8b"]
    assert len(layers) >= 9
    for layer in layers:
        raw = gzip.decompress(layer.read_bytes())
        scanner = scan_tar(io.BytesIO(raw), Sink())
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            regular = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isreg()]
        assert [(e.path, e.tar_offset, e.size) for e in scanner.entries if e.type == EntryType.FILE] == regular
        assert scanner.at_end


def test_entries_serialise_for_the_broker() -> None:
    binary_xattr = (info("x", pax_headers={"SCHILY.xattr.user.b": "\udcff\x00"}), b"")
    raw = make_tar([*_mixed_members(9), binary_xattr])
    entries, _, _ = scan(raw)
    assert entries[-1].xattrs == [("user.b", b"\xff\x00")]
    assert [LayerEntry.from_list(json.loads(json.dumps(e.to_list()))) for e in entries] == entries
