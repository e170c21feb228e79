"""ZFile: byte-exact reproduction of the reference files, reading, corrupt and legacy inputs."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pytest

from obdconv.errors import FormatError
from obdconv.formats import lsmt, tarwrap, zfile
from obdconv.formats.crc import raw_crc32c
from obdconv.formats.zfile import BlockCompressor, ZFileHeader, ZFileReader

from .conftest import AAAA_UUID


def _committed_from_rw(obd_dir: Path, uuid: str | None = None, user_tag: bytes = b"") -> bytes:
    out = io.BytesIO()
    lsmt.commit_rw_pair(obd_dir / "rw_data.bin", obd_dir / "rw_index.bin", out, uuid=uuid, user_tag=user_tag)
    return out.getvalue()


# ---- byte-exact against the reference tools


def test_p10000_initial_header(obd_dir: Path) -> None:
    payload = (obd_dir / "p10000.bin").read_bytes()
    assert zfile.compress_zfile(payload, "lz4", 4096, overwrite_header=False) == \
        (obd_dir / "p10000.zfile").read_bytes()


def test_p10000_spec_values() -> None:
    # §2.5 worked example, built from the payload description in the spec.
    payload = bytes(4096) + b"A" * 4096 + bytes(range(256)) * 7 + bytes(16)
    blocks = BlockCompressor("lz4", 4096).compress(payload)
    assert [len(b) for b in blocks] == [30, 30, 279]
    assert [struct.unpack("<I", b[-4:])[0] for b in blocks] == [0xB4911724, 0x72E23554, 0x1640B135]
    header, tail = zfile.zfile_parts([len(b) for b in blocks], len(payload), "lz4", 4096, overwrite_header=False)
    assert struct.unpack_from("<I", header, 28)[0] == 0xC7A212FC
    assert tail[:12] == bytes.fromhex("1E0000001E00000017010000")
    trailer = ZFileHeader.unpack(tail[12:])
    assert trailer.index_crc == 0x10621906
    assert tail[12 + 28 : 12 + 32] == bytes.fromhex("A64740FD")  # the spec lists the digest's bytes
    assert (trailer.flags, trailer.index_offset, trailer.index_size, trailer.original_file_size) == (0x16, 851, 3, 10000)


def test_commit_lz4_overwrite_header(obd_dir: Path) -> None:
    raw = _committed_from_rw(obd_dir)  # overlaybd-commit -z without --uuid: uuid zero
    assert zfile.compress_zfile(raw, "lz4", 4096) == (obd_dir / "commit.lsmt.zfile").read_bytes()


def test_commit_zstd_8k(obd_dir: Path) -> None:
    raw = _committed_from_rw(obd_dir)
    assert zfile.compress_zfile(raw, "zstd", 8192) == (obd_dir / "commit.lsmt.zstd8k.zfile").read_bytes()


def test_commit_tar_wrapped_streamed(obd_dir: Path) -> None:
    # Streamed the way an assembler does it: header, precompressed blocks, tail, then the wrapper.
    raw = _committed_from_rw(obd_dir, uuid=AAAA_UUID)
    blocks = BlockCompressor("lz4", 4096).compress(raw)
    header, tail = zfile.zfile_parts([len(b) for b in blocks], len(raw), "lz4", 4096)
    payload = header + b"".join(blocks) + tail
    blob = tarwrap.wrap_prefix(len(payload)) + payload + tarwrap.wrap_suffix(len(payload))
    assert blob == (obd_dir / "commit.lsmt.zfile.tar").read_bytes()


def test_writer_streaming_equals_one_shot() -> None:
    data = os.urandom(100_000) + b"z" * 300_000
    buf = io.BytesIO()
    with zfile.ZFileWriter(buf, "lz4", 4096, flush_bytes=65536) as w:
        for k in range(0, len(data), 7000):
            w.write(data[k : k + 7000])
    assert buf.getvalue() == zfile.compress_zfile(data)
    assert BlockCompressor("lz4", 4096, threads=4, batch_blocks=3).compress(data) == \
        BlockCompressor("lz4", 4096, threads=1).compress(data)


# ---- reading


@pytest.mark.parametrize("algorithm,bs", [("lz4", 4096), ("zstd", 4096), ("lz4", 65536), ("zstd", 16384)])
def test_random_reads(algorithm: str, bs: int) -> None:
    data = os.urandom(50_000) + bytes(70_000) + b"text " * 20_001
    r = ZFileReader(zfile.compress_zfile(data, algorithm, bs))
    assert r.size == len(data) and r.block_count == -(-len(data) // bs)
    for off, n in [(0, 1), (0, len(data)), (bs - 3, 10), (len(data) - 5, 100), (12345, 54321), (len(data), 5)]:
        assert r.pread(off, n) == data[off : off + n]
    r.verify()


def test_empty_payload() -> None:
    r = ZFileReader(zfile.compress_zfile(b""))
    assert r.size == 0 and r.pread(0, 10) == b""


def test_fixtures_read_back(obd_dir: Path) -> None:
    for name in ("commit.lsmt.zfile", "commit.lsmt.zstd8k.zfile"):
        r = ZFileReader(obd_dir / name)
        f = lsmt.LSMTFile.open(r)
        assert f.pread(1 << 20, 4096) == b"\xab" * 4096
        assert f.uuid == lsmt.ZERO_UUID
    assert ZFileReader(obd_dir / "p10000.zfile").pread(0, 10000) == (obd_dir / "p10000.bin").read_bytes()


# ---- corrupt input: FormatError, never wrong bytes


def _sample() -> tuple[bytes, bytes]:
    data = bytes(range(256)) * 64  # 16 KiB: 4 blocks
    return data, zfile.compress_zfile(data, "lz4", 4096)


def test_bad_magic() -> None:
    _, z = _sample()
    with pytest.raises(FormatError, match="magic"):
        ZFileReader(b"X" + z[1:])


def test_block_crc_mismatch() -> None:
    data, z = _sample()
    r = ZFileReader(z)
    bad = bytearray(z)
    bad[r.offsets[2] + 1] ^= 0x40  # inside block 2's compressed bytes
    r = ZFileReader(bytes(bad))
    assert r.pread(0, 8192) == data[:8192]  # untouched blocks still read
    with pytest.raises(FormatError, match="block 2: CRC mismatch"):
        r.pread(8192, 10)
    with pytest.raises(FormatError, match="CRC mismatch"):
        r.pread(0, len(data))
    with pytest.raises(FormatError):
        r.verify()


def test_header_digest_mismatch() -> None:
    _, z = _sample()
    bad = bytearray(z)
    bad[72] = 0x20  # block_size field changed, digest not updated
    with pytest.raises(FormatError, match="digest"):
        ZFileReader(bytes(bad))


def test_jump_table_crc_and_oversize_length() -> None:
    _, z = _sample()
    r = ZFileReader(z)
    bad = bytearray(z)
    bad[r.info.index_offset] ^= 1
    with pytest.raises(FormatError, match="jump table CRC"):
        ZFileReader(bytes(bad))
    # an oversize length with a matching CRC (a consistent but malicious file)
    blocks = [z[r.offsets[i] : r.offsets[i + 1]] for i in range(r.block_count)]
    blocks[1] = os.urandom(70_000)
    header, tail = zfile.zfile_parts([len(b) for b in blocks], r.size, "lz4", 4096)
    forged = header + b"".join(blocks) + tail
    with pytest.raises(FormatError, match="stored length"):
        ZFileReader(forged)


def test_truncated() -> None:
    _, z = _sample()
    with pytest.raises(FormatError):
        ZFileReader(z[:300])
    # With the initial header (no index in it) a cut file has no trailer.
    z2 = zfile.compress_zfile(bytes(20000), overwrite_header=False)
    with pytest.raises(FormatError):
        ZFileReader(z2[:-10])


def test_block_count_must_cover_size() -> None:
    _, z = _sample()
    h = ZFileHeader.unpack(z[:512])
    h.original_file_size = 5 * 4096
    with pytest.raises(FormatError, match="blocks for"):
        ZFileReader(h.pack() + z[512:])


def test_decompressed_size_checked() -> None:
    # A block that decodes to fewer bytes than the block size is an error, not a short read.
    short = BlockCompressor("lz4", 4096).compress(b"q" * 4000)[0]
    header, tail = zfile.zfile_parts([len(short), len(short)], 8000, "lz4", 4096)
    r = ZFileReader(header + short + short + tail)
    with pytest.raises(FormatError, match="expected 4096"):
        r.pread(0, 10)


# ---- legacy quirk (§2.7)


def test_legacy_garbage_flags_tolerated() -> None:
    data = os.urandom(3000) + bytes(9000)
    z = bytearray(zfile.compress_zfile(data, overwrite_header=False))
    # header: stack-garbage flags with bit4 (digest) and bit3 clear, garbage digest/level/reserved
    struct.pack_into("<Q", z, 32, 0x00007FFEA4640B43)
    struct.pack_into("<I", z, 28, 0xDEADBEEF)
    z[77] = 0x55
    struct.pack_into("<I", z, 80, 0x12345678)
    struct.pack_into("<Q", z, 40, 0x4141414141)  # garbage index fields, not used (bit3 clear)
    # trailer: garbage high bits, digest bit clear, garbage index_crc
    t = len(z) - 512
    struct.pack_into("<Q", z, t + 32, 0x00007FFEA4640B46)
    struct.pack_into("<I", z, t + 64, 0xBADC0FFE)
    r = ZFileReader(bytes(z))
    assert r.pread(0, len(data)) == data
    # the same garbage index_crc is rejected when the digest bit is set
    struct.pack_into("<Q", z, t + 32, 0x16)
    with pytest.raises(FormatError, match="jump table CRC"):
        ZFileReader(bytes(z))


def test_header_digest_formula() -> None:
    h = ZFileHeader(zfile.INITIAL_HEADER_FLAGS).pack()
    blank = bytearray(h)
    blank[28:32] = bytes(4)
    assert struct.unpack_from("<I", h, 28)[0] == raw_crc32c(bytes(blank), 0)
