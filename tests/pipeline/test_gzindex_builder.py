"""The gzip index builder's large output buffer (formats.gzindex.OUTPUT_ROOM): access-point windows
and inflated bytes stay exact across buffer wraps, whatever the input chunking."""

from __future__ import annotations

import random
import zlib

import pytest

from obdconv.formats.gzindex import OUTPUT_ROOM, WINSIZE, GzipIndex, GzipIndexBuilder, GzipRandomReader

# Spans whose access points include some less than WINSIZE after a buffer wrap (their window
# straddles it), checked by the test itself.
SPANS = (65536, 69632, 90112)


def _payload(size: int) -> bytes:
    rnd = random.Random(3)
    words = [bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz", k=rnd.randint(2, 9))) for _ in range(300)]
    out = bytearray()
    while len(out) < size:
        out += rnd.randbytes(rnd.randint(100, 20000)) if rnd.random() < 0.3 else b" ".join(rnd.choices(words, k=900))
    return bytes(out[:size])


DATA = _payload(2 * OUTPUT_ROOM + 123_457)  # wraps the output buffer twice


def _gzip_blob() -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    return c.compress(DATA) + c.flush()


def _build(blob: bytes, chunk: int, span: int = SPANS[0]) -> tuple[bytes, bytes]:
    b = GzipIndexBuilder(span)
    out = b"".join(b.feed(blob[i:i + chunk]) for i in range(0, len(blob), chunk))
    return out, b.finish(len(blob))


def test_windows_and_output_exact_across_buffer_wraps_and_chunkings() -> None:
    blob = _gzip_blob()
    straddling = 0
    for span in SPANS:
        results = {chunk: _build(blob, chunk, span) for chunk in (1000, 65536, 1 << 20, len(blob))}
        for out, _ in results.values():
            assert out == DATA
        metas = {meta for _, meta in results.values()}
        assert len(metas) == 1
        index = GzipIndex.parse(metas.pop())
        assert index.entries[-1].de_pos > 2 * OUTPUT_ROOM  # access points after both wraps
        for k, e in enumerate(index.entries):
            expected = (bytes(WINSIZE) + DATA)[e.de_pos:e.de_pos + WINSIZE]  # zeros before the start
            assert index.window(k) == expected, (span, k)
            straddling += any(w < e.de_pos < w + WINSIZE for w in (OUTPUT_ROOM, 2 * OUTPUT_ROOM))
    assert straddling >= 2  # the case the wrap's history copy exists for was exercised


def test_random_reads_after_the_wraps() -> None:
    blob = _gzip_blob()
    _, meta = _build(blob, 1 << 20)
    reader = GzipRandomReader(blob, meta)
    rnd = random.Random(11)
    for _ in range(30):
        off = rnd.randrange(OUTPUT_ROOM, len(DATA))
        length = rnd.randrange(1, 100_000)
        assert reader.pread(off, length) == DATA[off:off + length]


def test_window_of_a_boundary_before_a_block_longer_than_the_buffer() -> None:
    """A deflate block of zeros can inflate to more than the buffer holds (memLevel 9: ~8 MiB per
    block): the boundary before it is still the pending access point while the buffer wraps, and
    its window must be the bytes before that boundary, not what the wrap wrote over them."""
    rnd = random.Random(5)
    data = rnd.randbytes(300_000) + bytes(3 * OUTPUT_ROOM) + rnd.randbytes(300_000)
    c = zlib.compressobj(9, zlib.DEFLATED, 31, 9)
    blob = c.compress(data) + c.flush()
    for span in (65536, 1 << 20):
        b = GzipIndexBuilder(span)
        assert b.feed(blob) == data
        index = GzipIndex.parse(b.finish(len(blob)))
        gaps = [y.de_pos - x.de_pos for x, y in zip(index.entries, index.entries[1:], strict=False)]
        assert max(gaps) > OUTPUT_ROOM  # the long block is there
        for k, e in enumerate(index.entries):
            assert index.window(k) == (bytes(WINSIZE) + data)[e.de_pos:e.de_pos + WINSIZE], (span, k)


def test_c_inflate_loop_gives_the_python_loop_s_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder's C loop (formats/_fast_impl.c) against its Python loop: the same output and
    gzip.meta with pigz-like sync flushes, an empty second member and padding, any chunking,
    both libraries."""
    from obdconv.formats import gzindex

    if gzindex.builder._FAST is None:
        pytest.skip("formats C fast path not built (pip install -e .)")
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    flushed = b"".join(c.compress(DATA[i:i + 131072]) + c.flush(zlib.Z_SYNC_FLUSH)
                       for i in range(0, len(DATA), 131072)) + c.flush()
    # (a later member may only be empty: one with data is refused, MultiMemberGzip)
    blobs = [_gzip_blob(), flushed + zlib.compress(b"", wbits=31) + bytes(10)]
    libraries = [gzindex.system_zlib(), gzindex.bundled_zlib_ng()]

    def build(blob: bytes, chunk: int, library: gzindex.InflateLibrary | None) -> tuple[bytes, bytes]:
        b = GzipIndexBuilder(65536, library=library)
        out = b"".join(b.feed(blob[i:i + chunk]) for i in range(0, len(blob), chunk))
        return out, b.finish(len(blob))

    for library in [lib for lib in libraries if lib is not None]:
        for blob in blobs:
            fast = [build(blob, chunk, library) for chunk in (777, 1 << 20)]
            monkeypatch.setattr(gzindex.builder, "_FAST", None)
            slow = [build(blob, chunk, library) for chunk in (777, 1 << 20)]
            monkeypatch.undo()
            assert fast == slow, library.name
            assert fast[0] == fast[1]
            assert fast[0][0].startswith(DATA)
