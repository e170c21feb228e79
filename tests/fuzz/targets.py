"""Fuzz targets: each takes arbitrary bytes and either returns or raises an `ObdconvError` subclass.
Any other exception, a hang or unbounded memory is a defect (tests/fuzz/README.md).

Every target also exercises what a caller does next with what parsed (reads through a reader,
the report `inspect` prints), since a parser that accepts a bad value may only fail later.
"""

from __future__ import annotations

import gzip
import json
import random
import struct
from collections.abc import Callable

from obdconv.cli.inspect import _text, inspect_bytes
from obdconv.entries import LayerEntry
from obdconv.errors import ObdconvError
from obdconv.formats import tarwrap
from obdconv.formats.blob import open_layer_blob
from obdconv.formats.crc import raw_crc32c
from obdconv.formats.gzindex import _CRC_COVERS, HEADER_SIZE, GzipIndex, GzipRandomReader
from obdconv.formats.lsmt import LSMTFile
from obdconv.formats.source import BytesSource
from obdconv.formats.zfile import ZFileReader
from obdconv.oci import tarscan

READ = 65536  # bytes read back through a reader per call (bounded: memory must stay bounded)
# How the tar target cuts its input into feed() chunks, chosen by the input's first byte: chunk
# boundaries inside headers, PAX bodies and file data take other code paths (and the C fast path
# hands groups split across chunks back to Python).
CHUNKINGS = (1 << 20, 512, 13, 100, 513, 1024, 4096, 10_000, 65536, 1536)


def gzip_payload() -> bytes:
    """The uncompressed bytes of the gzip blob the gzip.meta target reads through (fixed, so seed
    indexes built from it stay valid)."""
    rnd = random.Random(11)
    words = [bytes(rnd.choices(b"abcdefgh ", k=rnd.randint(2, 12))) for _ in range(200)]
    return b"".join(rnd.choices(words, k=30_000))[:200_000]


GZIP_BLOB = gzip.compress(gzip_payload(), compresslevel=6, mtime=0)


# -- tar scanner: the Python parser and the C fast path must agree ----------------------------------


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes | memoryview) -> None:
        self.data += b


Outcome = tuple[str, object]


def _scan(tar: bytes, chunk: int, fast: bool) -> Outcome:
    sink = _Sink()
    scanner = tarscan.TarScanner(sink)
    if not fast:
        scanner._fast = None  # the Python parser only (the reference); the instance keeps no other state for it
    try:
        for i in range(0, len(tar), chunk):
            scanner.feed(tar[i : i + chunk])
        entries: list[LayerEntry] = scanner.finish()
    except ObdconvError as e:
        return "error", e
    return "ok", (entries, bytes(sink.data), scanner.data_area_size, scanner.tar_size)


def _fix_tar_checksums(tar: bytes) -> bytes:
    """Every non-zero 512-byte block gets a valid header checksum, so mutations of header fields
    reach the code behind the checksum check (file data blocks change too; still a tar to parse)."""
    out = bytearray(tar)
    for pos in range(0, len(out) - 511, 512):
        block = out[pos : pos + 512]
        if any(block):
            block[148:156] = b" " * 8
            out[pos + 148 : pos + 156] = b"%06o\x00 " % sum(block)
    return bytes(out)


def tar_scanner(data: bytes) -> None:
    """Both tar parsers on the same chunks: the same entries and data area, or errors of the same
    class (then re-raised, so the invariant checks the class). The first byte picks the chunking
    and (high bit) whether header checksums are fixed up first."""
    if not data:
        return
    chunk = CHUNKINGS[(data[0] & 0x7F) % len(CHUNKINGS)]
    tar = _fix_tar_checksums(data[1:]) if data[0] & 0x80 else data[1:]
    py = _scan(tar, chunk, fast=False)
    if tarscan.FAST is not None:
        c = _scan(tar, chunk, fast=True)
        if py[0] != c[0] or (py[0] == "ok" and py[1] != c[1]) or \
                (py[0] == "error" and type(py[1]) is not type(c[1])):
            raise AssertionError(f"tar parsers disagree (chunk {chunk}): python {py!r}, C {c!r}")
    if py[0] == "error":
        raise py[1]  # type: ignore[misc]


# -- format readers ---------------------------------------------------------------------------------


def lsmt(data: bytes) -> None:
    try:
        f = LSMTFile.open(BytesSource(data))
        f.pread(0, min(f.virtual_size, READ))
        for m in f.mappings[:8]:
            f.pread(m.offset * 512, min(m.length * 512, READ))
    finally:
        LSMTFile.open(BytesSource(data), warp=True)  # tags other than 0 allowed, bounds unchecked


def zfile(data: bytes) -> None:
    z = ZFileReader(BytesSource(data))
    z.pread(0, min(z.size, READ))
    z.pread(max(z.size - 100, 0), 100)
    z.verify()


def tar_wrapper(data: bytes) -> None:
    found = tarwrap.unwrap(BytesSource(data))
    if found is not None:
        offset, size = found
        if offset < 0 or size < 0:
            raise AssertionError(f"unwrap gave a negative offset or size: {found}")


def _fix_gzip_meta(data: bytes) -> bytes:
    """Sizes that match the file and a valid header CRC, so mutations reach the entries, the windows
    and the reader behind those checks (unit tests cover the checks themselves)."""
    if len(data) < HEADER_SIZE:
        return data
    head = bytearray(data[:HEADER_SIZE])
    struct.pack_into("<q", head, 41, len(data))  # index_file_size
    (index_start,) = struct.unpack_from("<q", head, 313)
    if HEADER_SIZE <= index_start <= len(data):
        struct.pack_into("<q", head, 321, len(data) - index_start)  # index_area_len
    struct.pack_into("<I", head, _CRC_COVERS, raw_crc32c(bytes(head[:_CRC_COVERS]), 0))
    return bytes(head) + data[HEADER_SIZE:]


def gzip_index(data: bytes) -> None:
    index = GzipIndex.parse(_fix_gzip_meta(data))
    for i in range(min(len(index.entries), 4)):
        index.window(i)
    reader = GzipRandomReader(GZIP_BLOB, index, readahead=0)
    for e in index.entries[:4]:
        reader.pread(max(e.de_pos, 0), 4096)


def layer_blob(data: bytes) -> None:
    f = open_layer_blob(BytesSource(data))
    f.pread(0, min(f.virtual_size, READ))
    for m in f.mappings[:8]:
        f.pread(m.offset * 512, min(m.length * 512, READ))


def inspect(data: bytes) -> None:
    info = inspect_bytes(data, "fuzz")
    _text(info)
    json.dumps(info)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "tar_scanner": tar_scanner,
    "lsmt": lsmt,
    "zfile": zfile,
    "tar_wrapper": tar_wrapper,
    "gzip_index": gzip_index,
    "layer_blob": layer_blob,
    "inspect": inspect,
}
