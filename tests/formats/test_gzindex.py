"""gzip index (§5): built while inflating, then random reads equal plain decompression."""

from __future__ import annotations

import gzip
import random
import shutil
import subprocess
import zlib

import pytest

from obdconv.errors import FormatError, UnsupportedError
from obdconv.formats import gzindex
from obdconv.formats.crc import raw_crc32c
from obdconv.formats.gzindex import GzipIndex, GzipIndexBuilder, GzipRandomReader, MultiMemberGzip


def _payload(seed: int, size: int) -> bytes:
    rnd = random.Random(seed)
    words = [bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz", k=rnd.randint(2, 9))) for _ in range(500)]
    out = bytearray()
    while len(out) < size:
        if rnd.random() < 0.2:
            out += rnd.randbytes(rnd.randint(1000, 30000))
        else:
            out += b" ".join(rnd.choices(words, k=2000))
    return bytes(out[:size])


DATA = _payload(1, 6_000_000)


def _build(blob: bytes, chunk: int, span: int = 1 << 20) -> tuple[bytes, bytes]:
    b = GzipIndexBuilder(span)
    out = b"".join(b.feed(blob[i : i + chunk]) for i in range(0, len(blob), chunk))
    return out, b.finish(len(blob))


def _check_random_reads(blob: bytes, meta: bytes, data: bytes, n: int = 60) -> None:
    r = GzipRandomReader(blob, meta)
    rnd = random.Random(7)
    for off, length in [(0, 100), (len(data) - 10, 100), *[(rnd.randrange(len(data)), rnd.randrange(1, 200_000))
                                                            for _ in range(n)]]:
        assert r.pread(off, length) == data[off : off + length], (off, length)


def test_python_gzip_blob() -> None:
    blob = gzip.compress(DATA, 6)
    out, meta = _build(blob, 65536)
    assert out == DATA
    idx = GzipIndex.parse(meta)
    h = idx.header
    assert (h.span, h.window, h.index_size, h.gzip_file_size, h.index_file_size) == \
        (1 << 20, 32768, 29, len(blob), len(meta))
    assert h.uncompress_file_size == len(DATA)
    assert idx.entries[0].de_pos == 0 and idx.entries[0].en_pos == 10  # after the 10-byte gzip header
    # one access point per span crossed, each at or before its multiple of the span
    assert len(idx.entries) == -(-len(DATA) // (1 << 20))
    for k, e in enumerate(idx.entries):
        assert e.de_pos <= k << 20 and (k == 0 or e.de_pos > (k - 1) << 20)
    assert idx.window(0) == bytes(32768)  # zero-filled before the stream start
    e = idx.entries[2]
    assert idx.window(2) == DATA[e.de_pos - 32768 : e.de_pos]
    _check_random_reads(blob, meta, DATA)


def test_index_independent_of_chunking() -> None:
    blob = gzip.compress(DATA[:2_500_000], 9)
    metas = {_build(blob, chunk, span=65536)[1] for chunk in (997, 4096, 32768, 1 << 20)}
    assert len(metas) == 1


@pytest.mark.skipif(shutil.which("pigz") is None, reason="pigz not installed")
def test_pigz_blob() -> None:
    blob = subprocess.run(["pigz", "-c", "-6"], input=DATA, capture_output=True, check=True).stdout
    out, meta = _build(blob, 100_000)
    assert out == DATA
    _check_random_reads(blob, meta, DATA)


def test_multi_member_with_data_is_refused() -> None:
    """Later members the runtime's reader cannot reach (it stops at the first member's end):
    refused as soon as one of them inflates to a byte (docs/ARCHITECTURE.md, Decisions)."""
    cut = 2_000_000
    blob = gzip.compress(DATA[:cut]) + gzip.compress(DATA[cut:4_000_000]) + gzip.compress(DATA[4_000_000:])
    with pytest.raises(MultiMemberGzip, match=f"uncompressed byte {cut}") as info:
        _build(blob, 50_000)
    assert isinstance(info.value, UnsupportedError) and info.value.first_member_size == cut
    # Fed in one piece, the first member's end and the next member's data arrive together.
    with pytest.raises(MultiMemberGzip):
        _build(blob, len(blob))


def test_empty_later_members_and_zero_padding_are_accepted() -> None:
    blob = gzip.compress(DATA[:1_000_000]) + gzip.compress(b"") + gzip.compress(b"") + bytes(700)
    out, meta = _build(blob, 30_000)
    assert out == DATA[:1_000_000]
    assert GzipIndex.parse(meta).header.uncompress_file_size == 1_000_000
    _check_random_reads(blob, meta, DATA[:1_000_000], n=10)


def test_reader_continues_across_members_of_an_index_made_elsewhere() -> None:
    """`GzipRandomReader` still reads past the first member of a foreign index (verify uses it to
    read what other tools made), though our builder refuses such blobs."""
    cut = 2_000_000
    first = gzip.compress(DATA[:cut])
    blob = first + gzip.compress(DATA[cut:3_000_000])
    b = GzipIndexBuilder(1 << 20)
    for i in range(0, len(first), 50_000):
        b.feed(first[i : i + 50_000])
    meta = b.finish(len(blob))
    assert GzipIndex.parse(meta).header.uncompress_file_size == cut
    _check_random_reads(blob, meta, DATA[:3_000_000], n=20)


def test_header_crc_and_layout() -> None:
    _, meta = _build(gzip.compress(DATA[:300_000]), 4096)
    assert meta[:8] == b"ddgzidx\x00" and meta[8] == 1 and meta[10] == 1 and meta[11] == 6
    assert int.from_bytes(meta[329:333], "little") == raw_crc32c(meta[:329], 0)
    idx = GzipIndex.parse(meta)
    first = idx.entries[0]
    assert first.win_pos == 333 and zlib.decompress(meta[333 : 333 + first.win_len]) == bytes(32768)


def test_corrupt_meta_rejected() -> None:
    _, meta = _build(gzip.compress(DATA[:300_000]), 4096)
    bad = bytearray(meta)
    bad[20] ^= 1
    with pytest.raises(FormatError, match="CRC"):
        GzipIndex.parse(bytes(bad))
    with pytest.raises(FormatError, match="magic"):
        GzipIndex.parse(b"x" + meta[1:])
    with pytest.raises(FormatError):
        GzipIndex.parse(meta[:-1])
    with pytest.raises(FormatError, match="truncated"):
        GzipIndex.parse(meta[:100])


def test_corrupt_or_truncated_gzip() -> None:
    blob = gzip.compress(DATA[:500_000])
    b = GzipIndexBuilder()
    b.feed(blob[: len(blob) // 2])
    with pytest.raises(FormatError, match="truncated"):
        b.finish(len(blob))
    bad = bytearray(blob)
    bad[len(bad) // 2 : len(bad) // 2 + 64] = bytes(64)
    with pytest.raises(FormatError):
        _build(bytes(bad), 65536)


def test_span_minimum() -> None:
    with pytest.raises(FormatError, match="span"):
        gzindex.GzipIndexBuilder(span=1000)


def test_zlib_ng_and_system_zlib_give_the_same_index_and_reads() -> None:
    """The builder prefers zlib-ng (from the `zlib-ng` package, a dependency) over the system
    zlib; deflate block boundaries belong to the stream, so the two must agree byte for byte."""
    ng = gzindex.bundled_zlib_ng()
    assert ng is not None, "zlib-ng's C API is not reachable from the installed zlib-ng package"
    assert gzindex.INFLATE_LIBRARY.name == ng.name  # the default when it is installed
    system = gzindex.system_zlib()
    pigz = shutil.which("pigz")
    blobs = [gzip.compress(DATA, 6), gzip.compress(DATA[:3_000_000], 1), zlib.compress(DATA[:1_000_000], 9),
             gzip.compress(DATA[:2_000_000]) + gzip.compress(b"")]  # an empty later member is accepted
    if pigz:
        blobs.append(subprocess.run([pigz, "-c", "-9"], input=DATA, capture_output=True, check=True).stdout)
    for blob in blobs:
        results = []
        for library in (ng, system):
            b = GzipIndexBuilder(65536, library=library)
            out = b"".join(b.feed(blob[i:i + 77_777]) for i in range(0, len(blob), 77_777))
            results.append((out, b.finish(len(blob))))
        assert results[0] == results[1]
        assert len(GzipIndex.parse(results[0][1]).entries) > 1
    # a reader on either library reads the same bytes
    blob = gzip.compress(DATA, 6)
    _, meta = _build(blob, 65536)
    for library in (ng, system):
        r = GzipRandomReader(blob, meta, library=library)
        assert r.pread(4_000_123, 70_000) == DATA[4_000_123:4_070_123]
