"""LSMT: entry encoding, header layout, byte-exact commits, reader acceptance rules, stacks."""

from __future__ import annotations

import io
import os
import random
import struct
from pathlib import Path

import pytest

from obdconv.errors import FormatError
from obdconv.formats import lsmt
from obdconv.formats.lsmt import LSMTFile, LSMTHeader, LSMTStack, SegmentMapping

from .conftest import AAAA_UUID

MIB = 1 << 20


# ---- entries and header (expected bytes from the spec's worked examples)


def test_segment_mapping_spec_example() -> None:
    m = SegmentMapping(offset=2048, length=8, moffset=8)
    assert m.pack() == bytes.fromhex("0008000000002000" "0800000000000000")
    assert SegmentMapping.unpack(m.pack()) == m


def test_invalid_entry_bytes() -> None:
    assert lsmt.INVALID_MAPPING.pack() == bytes.fromhex("FFFFFFFFFFFF0300" "0000000000000000")
    assert SegmentMapping.unpack(lsmt.INVALID_ENTRY_BYTES).is_invalid


def test_zeroed_and_tag_bits() -> None:
    m = SegmentMapping(offset=(1 << 50) - 2, length=16383, moffset=(1 << 55) - 1, zeroed=True, tag=0xAB)
    lo, hi = struct.unpack("<QQ", m.pack())
    assert lo == ((1 << 50) - 2) | 16383 << 50
    assert hi == ((1 << 55) - 1) | 1 << 55 | 0xAB << 56
    assert SegmentMapping.unpack(m.pack()) == m


def test_pack_index_equals_each_entry_packed_and_checks_ranges() -> None:
    rng = random.Random(7)
    entries = [SegmentMapping(rng.randrange(1 << 50), rng.randrange(1 << 14), rng.randrange(1 << 55),
                              rng.random() < 0.3, rng.randrange(256)) for _ in range(2000)]
    entries += [lsmt.INVALID_MAPPING, SegmentMapping((1 << 50) - 1, (1 << 14) - 1, (1 << 55) - 1, True, 255)]
    assert lsmt.pack_index(entries) == b"".join(m.pack() for m in entries)
    assert lsmt.pack_index([]) == b""
    for bad in (SegmentMapping(0, 1 << 14, 0), SegmentMapping(-1, 1, 0), SegmentMapping(0, 1, 1 << 55),
                SegmentMapping(0, 1, 0, tag=256)):
        with pytest.raises(FormatError, match="out of range"):
            lsmt.pack_index([*entries[:5], bad])


def test_header_layout() -> None:
    h = lsmt.commit_header(64 << 30, AAAA_UUID, "11111111-2222-3333-4444-555555555555", b"hello")
    assert len(h) == 4096
    assert h[0:8] == bytes.fromhex("4C534D5400010200")
    assert h[8:24] == bytes.fromhex("657E63D29444084CA2D2C8EC4FCFAE8A")
    assert h[24:28] == (390).to_bytes(4, "little")
    assert h[28:32] == b"\x07\x00\x00\x00"
    assert h[32:48] == bytes(16)
    assert h[48:56] == bytes.fromhex("0000000010000000")
    assert h[56:93] == b"AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE\x00"
    assert h[93:130] == b"11111111-2222-3333-4444-555555555555\x00"
    assert h[130:134] == b"\x00\x00\x01\x01"
    assert h[134:139] == b"hello" and h[139:] == bytes(4096 - 139)
    parsed = LSMTHeader.unpack(h)
    assert parsed.uuid == AAAA_UUID.upper() and parsed.user_tag == b"hello"


def test_null_uuid_written_as_zeros_string() -> None:
    h = lsmt.commit_header(1 << 30, None, "not-a-uuid")
    assert h[56:93] == b"00000000-0000-0000-0000-000000000000\x00"
    assert h[93:130] == b"00000000-0000-0000-0000-000000000000\x00"


def test_user_tag_too_long() -> None:
    with pytest.raises(FormatError, match="user tag"):
        lsmt.commit_header(1 << 30, None, None, b"x" * 257)


# ---- byte-exact reproduction of the reference commit


def test_commit_rw_pair_reproduces_fixture(obd_dir: Path) -> None:
    out = io.BytesIO()
    lsmt.commit_rw_pair(obd_dir / "rw_data.bin", obd_dir / "rw_index.bin", out, uuid=AAAA_UUID,
                        user_tag=b"hello")
    assert out.getvalue() == (obd_dir / "commit.lsmt").read_bytes()


def test_writer_reproduces_fixture_from_logical_content(obd_dir: Path) -> None:
    # The logical content comes from reading the RW pair, not from the expected output.
    rw = LSMTFile.open_rw(obd_dir / "rw_data.bin", obd_dir / "rw_index.bin")
    assert [(m.offset, m.length) for m in rw.mappings] == [(2048, 8)]
    data = rw.pread(MIB, 4096)
    assert data == b"\xab" * 4096
    out = io.BytesIO()
    lsmt.commit({MIB: data}, out, virtual_size=rw.virtual_size, uuid=AAAA_UUID, parent_uuid=rw.parent_uuid,
                user_tag=b"hello")
    assert out.getvalue() == (obd_dir / "commit.lsmt").read_bytes()


def test_commit_header_and_tail_compose_fixture(obd_dir: Path) -> None:
    parent = "11111111-2222-3333-4444-555555555555"
    mappings = [SegmentMapping(MIB // 512, 8, 8)]
    blob = (lsmt.commit_header(64 << 30, AAAA_UUID, parent, b"hello") + b"\xab" * 4096
            + lsmt.commit_tail(mappings, 8192, 64 << 30, AAAA_UUID, parent, b"hello"))
    assert blob == (obd_dir / "commit.lsmt").read_bytes()


def test_compaction_splits_long_runs_at_16320() -> None:
    # §1.6: a 9 MiB write commits as 16320 + 2112 sectors.
    w = lsmt.LSMTWriter(virtual_size=64 * MIB)
    w.write(0, os.urandom(9 * MIB))
    out = io.BytesIO()
    w.commit(out)
    f = LSMTFile.open(io.BytesIO(out.getvalue()))
    assert [m.length for m in f.mappings] == [16320, 2112]
    assert [m.moffset for m in f.mappings] == [8, 8 + 16320]


def test_overwrites_drop_garbage_and_zeroed_hide() -> None:
    w = lsmt.LSMTWriter(virtual_size=8 * MIB)
    w.write(0, b"\x01" * 8192)
    w.write(4096, b"\x02" * 8192)
    w.zero(2048, 1024)
    out = io.BytesIO()
    size = w.commit(out)
    f = LSMTFile.open(io.BytesIO(out.getvalue()))
    want = bytearray(12288)
    want[0:8192] = b"\x01" * 8192
    want[4096:12288] = b"\x02" * 8192
    want[2048:3072] = bytes(1024)
    assert f.pread(0, 12288) == want
    # the data area holds only live data (2 KiB + 1 KiB + 8 KiB), plus header, index page, trailer
    assert size == 4096 + 2048 + 1024 + 8192 + 4096 + 4096
    # pieces contiguous in both offset and data position merge: 3072..4096 joins the second write
    assert [(m.offset, m.length, m.moffset, m.zeroed) for m in f.mappings] == [
        (0, 4, 8, False), (4, 2, 12, True), (6, 18, 12, False)]


# ---- reader acceptance rules (§1.5)


def _committed(writes: dict[int, bytes], zeroed: tuple[tuple[int, int], ...] = ()) -> bytes:
    out = io.BytesIO()
    lsmt.commit(writes, out, zeroed=zeroed, virtual_size=8 * MIB)
    return out.getvalue()


def _rewrite_index(blob: bytes, entries: list[SegmentMapping], index_size: int | None = None) -> bytes:
    trailer = LSMTHeader.unpack(blob[-4096:])
    b = bytearray(blob)
    packed = lsmt.pack_index(entries)
    b[trailer.index_offset : trailer.index_offset + len(packed)] = packed
    if index_size is not None:
        trailer.index_size = index_size
        b[-4096:] = trailer.pack()
    return bytes(b)


def test_open_rejects_bad_magic() -> None:
    blob = bytearray(_committed({0: b"x" * 512}))
    blob[0] ^= 0xFF
    with pytest.raises(FormatError, match="magic"):
        LSMTFile.open(bytes(blob))


def test_open_rejects_rw_file(obd_dir: Path) -> None:
    with pytest.raises(FormatError):
        LSMTFile.open(obd_dir / "rw_data.bin")


def test_open_rejects_truncated() -> None:
    blob = _committed({0: b"x" * 512})
    with pytest.raises(FormatError):
        LSMTFile.open(blob[:-100])
    with pytest.raises(FormatError):
        LSMTFile.open(blob[:5000])


def test_open_rejects_index_beyond_trailer() -> None:
    blob = _committed({0: b"x" * 512})
    trailer = LSMTHeader.unpack(blob[-4096:])
    trailer.index_size = 100_000
    with pytest.raises(FormatError, match="overlaps the trailer"):
        LSMTFile.open(blob[:-4096] + trailer.pack())
    trailer = LSMTHeader.unpack(blob[-4096:])
    trailer.index_size = 1_000_001
    with pytest.raises(FormatError, match="exceeds"):
        LSMTFile.open(blob[:-4096] + trailer.pack())


def test_open_rejects_overlap_and_disorder() -> None:
    blob = _committed({0: b"a" * 4096, 8192: b"b" * 4096})
    with pytest.raises(FormatError, match="overlapping"):
        LSMTFile.open(_rewrite_index(blob, [SegmentMapping(0, 8, 8), SegmentMapping(4, 8, 16)]))
    with pytest.raises(FormatError, match="overlapping"):
        LSMTFile.open(_rewrite_index(blob, [SegmentMapping(16, 8, 16), SegmentMapping(0, 8, 8)]))


def test_open_checks_moffset_range() -> None:
    blob = _committed({0: b"a" * 4096})
    end = LSMTHeader.unpack(blob[-4096:]).index_offset // 512  # E
    with pytest.raises(FormatError, match="out of range"):
        LSMTFile.open(_rewrite_index(blob, [SegmentMapping(0, 8, end - 4)]))  # data past E
    with pytest.raises(FormatError, match="out of range"):
        LSMTFile.open(_rewrite_index(blob, [SegmentMapping(0, 8, 7)]))  # inside the header
    # zeroed entries: moffset == E accepted, E + 1 rejected (spec §1.5, verified against the tool)
    LSMTFile.open(_rewrite_index(blob, [SegmentMapping(0, 8, end, zeroed=True)]))
    with pytest.raises(FormatError, match="out of range"):
        LSMTFile.open(_rewrite_index(blob, [SegmentMapping(0, 8, end + 1, zeroed=True)]))


def test_unpadded_index_accepted() -> None:
    blob = _committed({MIB: b"q" * 4096})
    f = LSMTFile.open(_rewrite_index(blob, [SegmentMapping(MIB // 512, 8, 8)], index_size=1))
    assert f.pread(MIB, 4096) == b"q" * 4096 and f.index_padding == 0


def test_warp_tags_kept_and_read_from_target() -> None:
    target = os.urandom(64 * 1024)
    mappings = [SegmentMapping(0, 8, 8), SegmentMapping(8, 16, 32, tag=1)]
    blob = (lsmt.commit_header(MIB, None, None) + b"m" * 4096
            + lsmt.commit_tail(mappings, 8192, MIB, None, None, pad_index=False))
    with pytest.raises(FormatError):
        LSMTFile.open(blob)  # without a target the tag-1 moffset is out of range
    f = LSMTFile.open(blob, target=target)
    assert [m.tag for m in f.mappings] == [0, 1]
    assert f.pread(0, 4096) == b"m" * 4096
    assert f.pread(4096, 8192) == target[32 * 512 : 32 * 512 + 8192]


def test_sparse_rw_layer(tmp_path: Path) -> None:
    data = tmp_path / "data"
    header = LSMTHeader(lsmt.RW_DATA_FLAGS | lsmt.FLAG_SPARSE, virtual_size=4 * MIB).pack()
    with open(data, "wb") as f:
        f.write(header)
        f.truncate(4096 + 4 * MIB)
        f.seek(4096 + MIB)
        f.write(b"s" * 8192)
    rw = LSMTFile.open_rw(data, None)
    assert rw.pread(MIB - 512, 9216) == bytes(512) + b"s" * 8192 + bytes(512)
    assert all(not m.zeroed for m in rw.mappings)


# ---- stacks (§1.7)


def _layer(writes: dict[int, bytes], zeroed: tuple[tuple[int, int], ...] = ()) -> LSMTFile:
    return LSMTFile.open(_committed(writes, zeroed))


def test_stack_top_wins_and_zeroed_hides(tmp_path: Path) -> None:
    bottom = _layer({0: b"A" * 16384})
    middle = _layer({4096: b"B" * 4096}, zeroed=((8192, 4096),))
    top = _layer({12288 + 512: b"C" * 512})
    st = LSMTStack([bottom, middle, top])
    want = bytearray(b"A" * 16384)
    want[4096:8192] = b"B" * 4096
    want[8192:12288] = bytes(4096)
    want[12800:13312] = b"C" * 512
    assert st.pread(0, 16384) == want
    ext = st.extents()
    assert [(e.offset, e.length, e.layer) for e in ext] == [
        (0, 4096, 0), (4096, 4096, 1), (8192, 4096, 1), (12288, 512, 0), (12800, 512, 2), (13312, 3072, 0)]
    assert ext[2].mapping.zeroed
    image = tmp_path / "flat.img"
    st.flatten_to(image)
    assert image.stat().st_size == 8 * MIB
    with open(image, "rb") as f:
        assert f.read(16384) == want
    # sparse: far less allocated than the virtual size
    assert image.stat().st_blocks * 512 < 1 * MIB
