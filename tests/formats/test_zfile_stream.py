"""Parallel ZFile compression gives the bytes of the serial path: the C batch compressor against the
Python loop over the same liblz4, `BlockStream` on a pool against one thread, for lz4 and zstd,
block sizes 4 KiB..64 KiB, empty/tiny/odd-sized payloads and any batching; errors reach the caller."""

from __future__ import annotations

import io
import random

import crc32c
import pytest

from obdconv.errors import FormatError
from obdconv.formats.crc import ZFILE_BLOCK_CRC_SEED, raw_crc32c
from obdconv.formats.zfile import BlockCompressor, BlockStream, ZFileReader, codec, zfile_parts
from obdconv.formats.zfile.header import ALGORITHMS, HEADER_SPACE

needs_fast = pytest.mark.skipif(codec._fast is None, reason="ZFile C fast path not built (pip install -e .)")


def _payload(size: int, seed: int) -> bytes:
    """Compressible and incompressible stretches, zero runs: what a data area holds."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rng.randrange(3)
        n = rng.randint(1, 20000)
        out += rng.randbytes(n) if kind == 0 else bytes(n) if kind == 1 else (b"text %d " % rng.randrange(99)) * (n // 8)
    return bytes(out[:size])


def _stream(data: bytes, algorithm: str, bs: int, threads: int, batches: list[int]) -> tuple[bytes, list[int]]:
    out = io.BytesIO()
    stream = BlockStream(out, algorithm, bs, threads, window=3)
    pos = 0
    for n in batches:
        stream.submit(memoryview(data)[pos:pos + n])
        pos += n
    stream.submit(data[pos:])
    stream.close()
    assert stream.raw_size == len(data)
    assert stream.compressed_size == len(out.getvalue())
    return out.getvalue(), stream.lengths


@pytest.mark.parametrize("algorithm", ["lz4", "zstd"])
@pytest.mark.parametrize("bs", [4096, 8192, 16384, 32768, 65536])
def test_stream_equals_serial_compressor(algorithm: str, bs: int) -> None:
    data = _payload(37 * bs + 1234, seed=bs)
    want = BlockCompressor(algorithm, bs, threads=1).compress_packed(data)
    rng = random.Random(bs)
    batches = [bs * rng.randint(1, 7) for _ in range(5)]
    for threads in (1, 3):
        assert _stream(data, algorithm, bs, threads, batches) == want
    # and it is a valid ZFile payload
    header, tail = zfile_parts(want[1], len(data), algorithm, bs)
    assert ZFileReader(header + want[0] + tail).pread(0, len(data)) == data


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097])
def test_stream_tiny_payloads(size: int) -> None:
    data = _payload(size, seed=size)
    want = BlockCompressor("lz4", 4096, threads=1).compress_packed(data)
    assert _stream(data, "lz4", 4096, 2, []) == want


@needs_fast
@pytest.mark.parametrize("bs", [4096, 16384, 65536])
def test_c_batch_equals_python_loop(bs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _payload(300 * 1024 + 17, seed=7)
    fast = BlockCompressor("lz4", bs, threads=1).compress_packed(data)
    monkeypatch.setattr(codec, "_fast", None)
    assert BlockCompressor("lz4", bs, threads=1).compress_packed(data) == fast


@needs_fast
@pytest.mark.parametrize("seed", [0, 1, ZFILE_BLOCK_CRC_SEED, 0xFFFFFFFF])
def test_c_crc32c_hardware_and_table_agree_with_the_library(seed: int) -> None:
    rng = random.Random(seed)
    lib = codec._fast.lib  # type: ignore[union-attr]
    for n in (0, 1, 7, 8, 9, 4096, 100_003):
        data = rng.randbytes(n)
        want = raw_crc32c(data, seed)
        assert want == crc32c.crc32c(data, seed ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
        assert lib.obd_crc32c_raw(seed, data, n, 0) == want
        assert lib.obd_crc32c_raw(seed, data, n, 1) == want


@needs_fast
def test_c_batch_refuses_a_too_small_buffer() -> None:
    with pytest.raises(FormatError, match="too small"):
        codec._fast_lz4_into(memoryview(bytes(8192)), 4096, bytearray(100), 0, [])


def test_stream_reports_a_failed_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = codec.compress_into

    def flaky(*args: object) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise FormatError("codec broke")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr("obdconv.formats.zfile.compress.compress_into", flaky)
    stream = BlockStream(io.BytesIO(), "lz4", 4096, threads=2, window=2)
    with pytest.raises(FormatError, match="codec broke"):
        for _ in range(50):
            stream.submit(bytes(4096))
        stream.close()
    stream.abort()  # idempotent after the failure, never raises


def test_stream_done_callbacks_run_once_per_batch() -> None:
    done: list[int] = []
    stream = BlockStream(io.BytesIO(), "lz4", 4096, threads=3)
    for i in range(20):
        stream.submit(bytes(8192), lambda i=i: done.append(i))
    stream.close()
    assert sorted(done) == list(range(20))


def test_packed_output_layout() -> None:
    """Each stored block is the compressed bytes + the raw CRC of them, as a reader checks."""
    data = _payload(5 * 4096, seed=3)
    packed, lengths = _stream(data, "lz4", 4096, 2, [4096])
    pos = 0
    for n in lengths:
        block = packed[pos:pos + n]
        assert int.from_bytes(block[-4:], "little") == raw_crc32c(block[:-4], ZFILE_BLOCK_CRC_SEED)
        pos += n
    assert pos == len(packed)
    assert HEADER_SPACE == 512 and ALGORITHMS["lz4"] == 1
