"""Decompression: sniffing, multi-member gzip, multi-frame zstd, chunking, corruption and truncation."""

from __future__ import annotations

import gzip
import os
import random
import shutil
import subprocess

import pytest
import zstandard

from obdconv.errors import FormatError
from obdconv.oci.decompress import Decompressor, decompress_stream, sniff
from tests.conftest import requires_shared
from tests.oci.helpers import EDGE3_SOURCE_LAYERS

PAYLOAD_A = os.urandom(200_000) + bytes(300_000)
PAYLOAD_B = b"second member " * 5000


def _feed_all(kind: str, blob: bytes, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    d = Decompressor(kind)  # type: ignore[arg-type]
    out = bytearray()
    pos = 0
    while pos < len(blob):
        n = rng.randint(1, 20_000)
        out += d.feed(blob[pos : pos + n])
        pos += n
    out += d.finish()
    return bytes(out)


def test_sniff() -> None:
    assert sniff(gzip.compress(b"x")) == "gzip"
    assert sniff(zstandard.ZstdCompressor().compress(b"x")) == "zstd"
    assert sniff(b"\x50\x2a\x4d\x18\x04\x00\x00\x00") == "zstd"  # skippable frame first
    assert sniff(b"a/file\x00\x00") == "none"
    assert sniff(b"") == "none"


def test_gzip_multi_member_and_padding() -> None:
    blob = gzip.compress(PAYLOAD_A) + gzip.compress(PAYLOAD_B) + bytes(64)
    assert _feed_all("gzip", blob, 1) == PAYLOAD_A + PAYLOAD_B


@pytest.mark.skipif(shutil.which("pigz") is None, reason="pigz not installed")
def test_pigz_output() -> None:
    blob = subprocess.run(["pigz", "-c", "-b", "128"], input=PAYLOAD_A, capture_output=True, check=True).stdout
    assert _feed_all("gzip", blob, 2) == PAYLOAD_A


def test_bounded_output_pieces() -> None:
    blob = gzip.compress(bytes(10 << 20))
    d = Decompressor("gzip")
    pieces = list(d.feed_iter(blob, max_out=1 << 20))
    d.finish()
    assert max(len(p) for p in pieces) <= 1 << 20
    assert sum(len(p) for p in pieces) == 10 << 20


def test_zstd_multi_frame_and_skippable() -> None:
    skippable = b"\x50\x2a\x4d\x18" + (5).to_bytes(4, "little") + b"skip!"
    blob = skippable + zstandard.ZstdCompressor().compress(PAYLOAD_A) + zstandard.ZstdCompressor(level=9).compress(PAYLOAD_B)
    assert sniff(blob) == "zstd"
    assert _feed_all("zstd", blob, 3) == PAYLOAD_A + PAYLOAD_B


def test_none_passthrough() -> None:
    assert _feed_all("none", PAYLOAD_B) == PAYLOAD_B


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_truncated(kind: str) -> None:
    blob = gzip.compress(PAYLOAD_A) if kind == "gzip" else zstandard.ZstdCompressor().compress(PAYLOAD_A)
    with pytest.raises(FormatError, match="truncated"):
        _feed_all(kind, blob[:-5])


def test_corrupt_gzip() -> None:
    blob = bytearray(gzip.compress(PAYLOAD_A))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(FormatError, match="corrupt gzip"):
        _feed_all("gzip", bytes(blob))


def test_corrupt_zstd() -> None:
    blob = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(PAYLOAD_A))
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(FormatError, match="corrupt zstd"):
        _feed_all("zstd", bytes(blob))


def test_garbage_after_gzip() -> None:
    with pytest.raises(FormatError):
        _feed_all("gzip", gzip.compress(b"abc") + b"\x00\x00garbage")


@requires_shared
def test_decompress_stream_sniffs_fixture() -> None:
    blob = EDGE3_SOURCE_LAYERS[0].read_bytes()
    # the first chunks are smaller than the sniff size
    assert b"".join(decompress_stream(iter([blob[:2], blob[2:3], blob[3:]]))) == gzip.decompress(blob)
    assert b"".join(decompress_stream(iter([b"ab"]))) == b"ab"
