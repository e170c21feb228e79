"""Layer decompression: sniff the compression from magic bytes, then inflate as a stream.

Media types lie (a `+gzip` layer may be plain, a `.tar` may be gzip), so the kind comes from the
first bytes, as containerd's `DecompressStream` does. gzip uses `isal` (Intel ISA-L, several times
faster than zlib) and handles multi-member files (pigz, concatenated layers); zstd uses
`zstandard` frame by frame (multi-frame and skippable frames). A corrupt or truncated stream
raises `FormatError`. Trailing zero bytes after the last gzip member are tolerated (some tools pad
blobs); any other trailing data is an error, as in Go's `compress/gzip`.

`Decompressor.feed(chunk)` returns all output for that chunk; `feed_iter(chunk, max_out)` yields it
in pieces of at most `max_out` bytes for bounded memory with highly compressible input.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import zstandard
from isal import isal_zlib

from obdconv.errors import FormatError, UnsupportedError

Kind = Literal["gzip", "zstd", "none"]

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
UNSUPPORTED_MAGIC = {"bzip2": b"BZh", "xz": b"\xfd7zXZ\x00"}
# Skippable zstd frames (0x184D2A50..5F, little-endian) may lead a zstd stream.
_ZSTD_SKIPPABLE_LOW = 0x184D2A50
_GZIP_WBITS = 31  # 16 + MAX_WBITS: gzip wrapper
SNIFF_SIZE = 6
DEFAULT_MAX_OUT = 4 << 20


def sniff(head: bytes) -> Kind:
    """Compression kind from the first bytes of a blob (>= 6 bytes for a sure answer). bzip2 and xz
    (which containerd and Docker also accept) are recognised by their magic and refused by name:
    read as an uncompressed tar they would only fail later as a "truncated tar"."""
    unsupported = next((name for name, magic in UNSUPPORTED_MAGIC.items() if head.startswith(magic)), None)
    if unsupported and (unsupported != "bzip2" or head[3:4].isdigit()):  # "BZh" + block size 1-9
        raise UnsupportedError(f"{unsupported} compressed layer: bzip2/xz compressed layers are not supported "
                               "(recompress it with gzip or zstd)")
    if head[:2] == GZIP_MAGIC:
        return "gzip"
    if head[:4] == ZSTD_MAGIC:
        return "zstd"
    if len(head) >= 4 and int.from_bytes(head[:4], "little") & 0xFFFFFFF0 == _ZSTD_SKIPPABLE_LOW:
        return "zstd"
    return "none"


class Decompressor:
    """Streaming decompressor for one blob of a known `kind`."""

    def __init__(self, kind: Kind) -> None:
        if kind not in ("gzip", "zstd", "none"):
            raise ValueError(f"unknown compression kind {kind!r}")
        self.kind = kind
        self._obj: object | None = None  # current gzip member / zstd frame decoder
        self._trailing_zeros = False
        self.compressed_size = 0
        self.size = 0  # bytes produced

    def feed(self, chunk: bytes | bytearray | memoryview) -> bytes:
        out = b"".join(self.feed_iter(chunk, max_out=0))
        return out

    def feed_iter(self, chunk: bytes | bytearray | memoryview, max_out: int = DEFAULT_MAX_OUT) -> Iterator[bytes]:
        """Output for `chunk` in pieces of at most `max_out` bytes (0 = unbounded, gzip only bounds)."""
        self.compressed_size += len(chunk)
        if self.kind == "none":
            self.size += len(chunk)
            if len(chunk):
                yield bytes(chunk) if not isinstance(chunk, bytes) else chunk
            return
        data = bytes(chunk)
        if self.kind == "gzip":
            yield from self._gzip(data, max_out)
        else:
            yield from self._zstd(data)

    def finish(self) -> bytes:
        """Flush and check the stream ended at a member/frame boundary."""
        if self.kind == "none":
            return b""
        if self._obj is not None:
            raise FormatError(f"truncated {self.kind} stream: ends inside a "
                              f"{'member' if self.kind == 'gzip' else 'frame'} "
                              f"after {self.compressed_size} compressed bytes")
        if self.compressed_size == 0:
            raise FormatError(f"empty {self.kind} stream")
        return b""

    # -- gzip ---------------------------------------------------------------------------------

    def _gzip(self, data: bytes, max_out: int) -> Iterator[bytes]:
        while data:
            if self._trailing_zeros or (self._obj is None and data[0] == 0 and self.compressed_size > len(data)):
                if data.strip(b"\x00"):
                    raise FormatError("gzip stream: data after trailing zero padding")
                self._trailing_zeros = True
                return
            if self._obj is None:
                self._obj = isal_zlib.decompressobj(wbits=_GZIP_WBITS)
            obj = self._obj
            try:
                out = obj.decompress(data, max_out)  # type: ignore[attr-defined]
                while out:
                    self.size += len(out)
                    yield out
                    tail = obj.unconsumed_tail  # type: ignore[attr-defined]
                    if not tail:
                        break
                    out = obj.decompress(tail, max_out)  # type: ignore[attr-defined]
            except isal_zlib.error as exc:
                raise FormatError(f"corrupt gzip stream near compressed byte {self.compressed_size}: {exc}") from exc
            if obj.eof:  # type: ignore[attr-defined]
                data = obj.unused_data  # type: ignore[attr-defined]
                self._obj = None
            else:
                return

    # -- zstd ---------------------------------------------------------------------------------

    def _zstd(self, data: bytes) -> Iterator[bytes]:
        while data:
            if self._obj is None:
                self._obj = zstandard.ZstdDecompressor().decompressobj()
            obj = self._obj
            try:
                out = obj.decompress(data)  # type: ignore[attr-defined]
            except zstandard.ZstdError as exc:
                raise FormatError(f"corrupt zstd stream near compressed byte {self.compressed_size}: {exc}") from exc
            if out:
                self.size += len(out)
                yield out
            if obj.eof:  # type: ignore[attr-defined]
                data = obj.unused_data  # type: ignore[attr-defined]
                self._obj = None
            else:
                return


def decompress_stream(chunks: Iterator[bytes], kind: Kind | None = None) -> Iterator[bytes]:
    """Decompress an iterator of blob chunks (kind sniffed from the first chunk when None)."""
    decompressor: Decompressor | None = None
    if kind is not None:
        decompressor = Decompressor(kind)
    head = b""
    for chunk in chunks:
        if decompressor is None:
            head += chunk
            if len(head) < SNIFF_SIZE:
                continue
            decompressor = Decompressor(sniff(head))
            chunk, head = head, b""
        yield from decompressor.feed_iter(chunk)
    if decompressor is None:
        decompressor = Decompressor(sniff(head))
        if head:
            yield from decompressor.feed_iter(head)
    tail = decompressor.finish()
    if tail:
        yield tail
