"""ZFile batch paths: packed compression, batched/threaded decoding into one buffer, preadinto,
zero-copy sources, and their error reporting. Oracles are independent of the code under test:
python-lz4 / python-zstandard for decoding, crc32c for the CRC formula of spec §2.3."""

from __future__ import annotations

import io
import os
import random
import struct

import crc32c
import lz4.block
import pytest
import zstandard

from obdconv.errors import FormatError
from obdconv.formats import tarwrap, zfile
from obdconv.formats.crc import ZFILE_BLOCK_CRC_SEED, block_crc_ok
from obdconv.formats.source import BytesSource, WindowSource
from obdconv.formats.zfile import BlockCompressor, ZFileHeader, ZFileReader

BS = 4096


def _payload(size: int, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    words = [bytes(rnd.choices(b"abcdefgh ", k=rnd.randint(1, 9))) for _ in range(200)]
    text = b"".join(rnd.choices(words, k=size // 2))[: size // 2]
    return (text + rnd.randbytes(size // 4) + bytes(size))[:size]


def _spec_crc(body: bytes) -> int:
    """rawCRC32C(body, 100007) straight from spec §0: standard CRC-32C with both inversions undone."""
    return crc32c.crc32c(body, ZFILE_BLOCK_CRC_SEED ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def _decode(algorithm: str, body: bytes, size: int) -> bytes:
    if algorithm == "lz4":
        return lz4.block.decompress(body, uncompressed_size=size)
    return zstandard.ZstdDecompressor().decompress(body, max_output_size=size)


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096, 7 * 4096 + 100])
def test_compress_packed_blocks_decode_and_carry_spec_crc(algorithm: str, size: int) -> None:
    data = _payload(size)
    packed, lengths = BlockCompressor(algorithm, BS, batch_blocks=3).compress_packed(data)
    assert len(lengths) == -(-size // BS) and sum(lengths) == len(packed)
    pos = 0
    for k, n in enumerate(lengths):
        block = packed[pos : pos + n]
        body, stored_crc = block[:-4], struct.unpack("<I", block[-4:])[0]
        assert stored_crc == _spec_crc(body)
        assert _decode(algorithm, body, BS) == data[k * BS : (k + 1) * BS]
        pos += n
    # the list form is the same bytes cut at the same places
    assert [len(b) for b in BlockCompressor(algorithm, BS).compress(data)] == lengths
    assert b"".join(BlockCompressor(algorithm, BS).compress(data)) == packed


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_threads_and_batches_do_not_change_bytes(algorithm: str) -> None:
    data = _payload(40 * BS + 123)
    one = BlockCompressor(algorithm, BS, threads=1).compress_packed(data)
    assert BlockCompressor(algorithm, BS, threads=3, batch_blocks=2).compress_packed(data) == one
    assert BlockCompressor(algorithm, BS, threads=1, batch_blocks=5).compress_packed(data) == one
    batches = list(BlockCompressor(algorithm, BS, threads=2, batch_blocks=4).iter_packed(data))
    assert len(batches) == 11
    assert b"".join(b for b, _ in batches) == one[0]


def test_writer_any_write_pattern_same_file() -> None:
    data = _payload(300_000, seed=5)
    whole = zfile.compress_zfile(data)
    for sizes in ([1, 4095, 4097, 70_000, 200_000], [150_000, 3, 149_997], [300_000]):
        buf = io.BytesIO()
        with zfile.ZFileWriter(buf, "lz4", BS, flush_bytes=3 * BS) as w:
            pos = 0
            for n in [*sizes, len(data)]:
                w.write(memoryview(data)[pos : pos + n])
                pos += n
        assert buf.getvalue() == whole


def test_block_crc_ok_residue() -> None:
    rnd = random.Random(3)
    for _ in range(50):
        body = rnd.randbytes(rnd.randint(0, 300))
        seed = rnd.getrandbits(32)
        good = body + struct.pack("<I", crc32c.crc32c(body, seed ^ 0xFFFFFFFF) ^ 0xFFFFFFFF)
        assert block_crc_ok(good, seed)
        bit = rnd.randrange(len(good) * 8)
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        assert not block_crc_ok(bytes(bad), seed)
    assert not block_crc_ok(b"abc", 0)


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_preadinto_and_pread_agree_with_data(algorithm: str) -> None:
    data = _payload(20 * BS + 777, seed=9)
    r = ZFileReader(zfile.compress_zfile(data, algorithm, BS))
    for off, n in [(0, len(data)), (0, 5 * BS), (BS, 3 * BS), (3, 2 * BS), (BS - 1, 2),
                   (19 * BS, 5000), (len(data) - 10, 100), (len(data), 10)]:
        buf = bytearray(n)
        got = r.preadinto(off, buf)
        want = data[off : off + n]
        assert got == len(want) and bytes(buf[:got]) == want
        assert r.pread(off, n) == want
    big = bytearray(b"\xee" * (len(data) + 50))
    view = memoryview(big)[10:]
    assert r.preadinto(0, view) == len(data)
    assert bytes(big[10 : 10 + len(data)]) == data and big[:10] == b"\xee" * 10 and big[-40:] == b"\xee" * 40


def test_decompress_to_and_sources(tmp_path: object) -> None:
    data = _payload(9 * BS + 5, seed=11)
    z = zfile.compress_zfile(data, "zstd", BS)
    out = io.BytesIO()
    ZFileReader(z).decompress_to(out, chunk_blocks=2)
    assert out.getvalue() == data
    wrapped = tarwrap.wrap_prefix(len(z)) + z + tarwrap.wrap_suffix(len(z))
    window = WindowSource(BytesSource(wrapped), len(tarwrap.wrap_prefix(len(z))), len(z))
    assert ZFileReader(window).pread(0, len(data)) == data
    path = os.path.join(str(tmp_path), "x.zfile")
    with open(path, "wb") as f:
        f.write(z)
    assert ZFileReader(path).pread(BS, 6 * BS) == data[BS : 7 * BS]


def _blocks(z: bytes) -> tuple[ZFileReader, list[bytes]]:
    r = ZFileReader(z)
    return r, [z[r.offsets[i] : r.offsets[i + 1]] for i in range(r.block_count)]


def _rebuild(blocks: list[bytes], size: int, algorithm: str) -> bytes:
    header, tail = zfile.zfile_parts([len(b) for b in blocks], size, algorithm, BS)
    return header + b"".join(blocks) + tail


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", _spec_crc(body))


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_batch_errors_name_the_first_bad_block(algorithm: str) -> None:
    data = _payload(12 * BS, seed=4)
    z = zfile.compress_zfile(data, algorithm, BS)
    r, blocks = _blocks(z)

    crc_bad = bytearray(z)
    crc_bad[r.offsets[7] + 2] ^= 0x10
    bad = ZFileReader(bytes(crc_bad))
    assert bad.pread(0, 7 * BS) == data[: 7 * BS]
    with pytest.raises(FormatError, match="block 7: CRC mismatch"):
        bad.pread(0, len(data))
    with pytest.raises(FormatError, match="block 7: CRC mismatch"):
        bad.preadinto(4 * BS, bytearray(6 * BS))

    # valid CRC over bytes the codec rejects
    garbage = list(blocks)
    garbage[5] = _with_crc(b"\xff" * 40)
    with pytest.raises(FormatError, match="block 5: cannot decompress"):
        ZFileReader(_rebuild(garbage, len(data), algorithm)).pread(0, len(data))

    # valid CRC, valid stream, but a short block in the middle
    short = list(blocks)
    body = lz4.block.compress(b"s" * 100, store_size=False) if algorithm == "lz4" else \
        zstandard.ZstdCompressor().compress(b"s" * 100)
    short[3] = _with_crc(body)
    with pytest.raises(FormatError, match="block 3: decompressed to 100 bytes, expected 4096"):
        ZFileReader(_rebuild(short, len(data), algorithm)).pread(BS, 5 * BS)

    # an earlier codec failure wins over a later CRC failure
    both = list(garbage)
    both[9] = both[9][:-1] + bytes([both[9][-1] ^ 1])
    with pytest.raises(FormatError, match="block 5: "):
        ZFileReader(_rebuild(both, len(data), algorithm)).verify()


def test_threaded_reader_reports_block_in_later_batch() -> None:
    data = _payload(2100 * BS, seed=8)  # > 2 decode batches of 1024 blocks
    z = zfile.compress_zfile(data, "lz4", BS)
    r = ZFileReader(z, threads=2)
    assert r.pread(0, len(data)) == data
    bad = bytearray(z)
    bad[r.offsets[1500] + 1] ^= 1
    with pytest.raises(FormatError, match="block 1500: CRC mismatch"):
        ZFileReader(bytes(bad), threads=2).pread(0, len(data))


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
def test_unverified_file_reads_in_batches(algorithm: str) -> None:
    # verify=0: stored blocks carry no CRC (spec §2.3); built by hand with the reference codecs.
    data = _payload(6 * BS + 300, seed=6)
    chunks = [data[o : o + BS] for o in range(0, len(data), BS)]
    if algorithm == "lz4":
        blocks = [lz4.block.compress(c, store_size=False) for c in chunks]
    else:
        blocks = [zstandard.ZstdCompressor(level=3).compress(c) for c in chunks]
    table = struct.pack(f"<{len(blocks)}I", *map(len, blocks))
    common = dict(index_offset=zfile.HEADER_SPACE + sum(map(len, blocks)), index_size=len(blocks),
                  original_file_size=len(data), index_crc=crc32c.crc32c(table, 0xFFFFFFFF) ^ 0xFFFFFFFF,
                  block_size=BS, algo=zfile.ALGORITHMS[algorithm], verify=0)
    z = (ZFileHeader(zfile.OVERWRITE_HEADER_FLAGS, **common).pack() + b"".join(blocks) + table  # type: ignore[arg-type]
         + ZFileHeader(zfile.TRAILER_FLAGS, **common).pack())  # type: ignore[arg-type]
    r = ZFileReader(z)
    assert not r.verify_crc
    assert r.pread(0, len(data)) == data
    assert r.pread(BS + 7, 3 * BS) == data[BS + 7 : 4 * BS + 7]


def test_serial_chunks_join_to_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _payload(30 * BS + 5, seed=12)
    whole = BlockCompressor("lz4", BS, threads=1).compress_packed(data)
    monkeypatch.setattr(zfile.compress, "SERIAL_CHUNK", 4 * BS)
    chunks = list(BlockCompressor("lz4", BS, threads=1, batch_blocks=3).iter_packed(data))
    assert len(chunks) == 11  # 3-block chunks (the largest batch multiple <= 4 blocks)
    assert b"".join(c for c, _ in chunks) == whole[0]
    assert [n for _, lengths in chunks for n in lengths] == whole[1]
