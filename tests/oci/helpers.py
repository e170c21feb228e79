"""Building tars for the oci tests (with Python's tarfile, or crafted header blocks for cases tarfile
cannot write) and scanning them."""

from __future__ import annotations

import io
import random
import tarfile

from obdconv.entries import LayerEntry
from obdconv.oci.tarscan import TarScanner
from tests.conftest import FIXTURES as SHARED_FIXTURES

FIXTURES = SHARED_FIXTURES / "oci"
EDGE3_BLOBS = FIXTURES / "edge3" / "blobs" / "sha256"
EDGE3_SOURCE_LAYERS = [
    EDGE3_BLOBS / "9fa897e38b959b05ce153dc69e1d8afa2c95b30d335412ab04ebcd2c01372163",
    EDGE3_BLOBS / "fb9515ddd0d8728114631b38af7d27a1e384124cbe226bdba87cc7ef35b88f72",
    EDGE3_BLOBS / "803243446ff006f4f04c1baa0eaa5b923960eb993d322353a4acff4a9d81666e",
]
EDGE3_SOURCE_CONFIG = EDGE3_BLOBS / "89c88694d6bf760838ba31b5f73630a782f0aaff0f816f4944a85f71609e12aa"
EDGE3_OVERLAYBD_LAYERS = [
    EDGE3_BLOBS / "4d4410be2f9eb2a9b949dd236a61c6af6d1a19d6d22cc800514bf95d842e3d38",
    EDGE3_BLOBS / "9b84af0db6ffffd29341a796bc9f5909747c70927f40ed17315114f55a90f4f5",
    EDGE3_BLOBS / "c14f745a7abff3e6c544cd7650483dd2354340c64096b3d08a103ec044a45a5e",
]


def info(name: str, type_: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT,
             **open_kw: object) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **open_kw) as tar:  # type: ignore[call-overload]
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            else:
                tar.addfile(ti)
    return buf.getvalue()


class Sink:
    """A data sink that checks it is only ever handed bytes-like objects, and keeps them."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.writes = 0

    def write(self, data: bytes | memoryview) -> int:
        self.buf += data
        self.writes += 1
        return len(data)


def scan(raw: bytes, chunk_sizes: list[int] | None = None, sink: bool = True) -> tuple[list[LayerEntry], bytes, int]:
    """Scan `raw` fed in the given chunk sizes (cycled), or whole. -> (entries, data area, size)."""
    data_sink = Sink() if sink else None
    scanner = TarScanner(data_sink)
    if not chunk_sizes:
        scanner.feed(raw)
    else:
        pos = 0
        i = 0
        while pos < len(raw):
            n = chunk_sizes[i % len(chunk_sizes)]
            scanner.feed(raw[pos : pos + n])
            pos += n
            i += 1
    entries = scanner.finish()
    return entries, bytes(data_sink.buf) if data_sink else b"", scanner.data_area_size


def random_chunks(seed: int, count: int = 64, top: int = 3000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, top) for _ in range(count)]


def checksum(block: bytearray) -> None:
    """Write a valid ustar checksum into a 512-byte header block."""
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)


def raw_header(name: bytes, typeflag: bytes = b"0", size: int = 0, mode: int = 0o644, *,
               magic: bytes = b"ustar\x0000", prefix: bytes = b"", linkname: bytes = b"") -> bytearray:
    """A hand-made ustar header block (for types and fields tarfile will not write)."""
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"%07o\x00" % mode
    block[108:116] = b"%07o\x00" % 0
    block[116:124] = b"%07o\x00" % 0
    block[124:136] = b"%011o\x00" % size
    block[136:148] = b"%011o\x00" % 1_700_000_000
    block[156:157] = typeflag
    block[157 : 157 + len(linkname)] = linkname
    block[257:265] = magic
    block[345 : 345 + len(prefix)] = prefix
    checksum(block)
    return block


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


END = bytes(1024)
