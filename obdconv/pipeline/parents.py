"""Read already converted parent layers back as a block device, for a metadata pass that starts in
the middle of a chain (dedup found layers 0..k-1 converted; layers k.. must be built on top of
exactly the ext4 state those blobs hold, whoever made them).

Native parents are the layer blobs themselves; turboOCI parents are `ext4.fs.meta` warp files whose
file data comes from the original layer blobs (gzip through `gzip.meta`). Native blobs are read
with range requests, only where the pass reads; turbo blobs (small) are downloaded (digest
verified) into a scratch directory first, a turbo parent's original layer only when a file's
bytes are read, which the metadata pass never does.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from obdconv.errors import FormatError, NotFoundError
from obdconv.formats.blob import open_layer_blob
from obdconv.formats.gzindex import GzipRandomReader
from obdconv.formats.lsmt import LSMTStack
from obdconv.formats.source import FileSource
from obdconv.pipeline.mapping import TAG_LOCAL

COPY_CHUNK = 1 << 20


class ParentDevice:
    """An `LSMTStack` as the block device `Ext4Builder.load_parents` reads.

    `LSMTStack.extents()` also yields zeroed pieces (they can span gigabytes in layers made by other
    tools); the fresh metadata image already reads zeros there, so only data pieces are offered.
    Nor are turboOCI tag-1 pieces: they are file bytes from the original layer (live, or stale ones
    of files deleted above, which `load_parents`' own skip of live file data does not cover), which
    a metadata pass never reads. Reading them would download and inflate the original layer.
    """

    def __init__(self, stack: LSMTStack) -> None:
        self.stack = stack
        self.virtual_size = stack.virtual_size

    def pread(self, offset: int, length: int) -> bytes:
        return self.stack.pread(offset, length)

    def extents(self) -> Iterator[tuple[int, int]]:
        for e in self.stack.extents():
            if not e.mapping.zeroed and e.mapping.tag == TAG_LOCAL:
                yield e.offset, e.length


def _download(repo: Any, digest: str, path: Path) -> Path:
    if not path.exists():
        tmp = path.with_suffix(".part")
        with repo.open_blob(digest) as src, open(tmp, "wb") as out:
            while chunk := src.read(COPY_CHUNK):
                out.write(chunk)
        tmp.rename(path)
    return path


def _turbo_members(blob: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob)), mode="r:") as t:
        out = {}
        for m in t.getmembers():
            f = t.extractfile(m) if m.isfile() else None
            if f is not None:
                out[m.name] = f.read()
        return out


def read_back_parents(repo: Any, fmt: str, layer_digests: Sequence[str], source_layer_digests: Sequence[str],
                      scratch: Path, fs_meta_file: str = "ext4.fs.meta", below: Sequence[Any] = ()) -> ParentDevice:
    """The converted layers `layer_digests` (bottom first, format `fmt`) stacked on `below` (layers
    already open: the base layer of `--mkfs=false`); for turbo, `source_layer_digests[i]` is the
    original blob layer i reads its file data from."""
    scratch.mkdir(parents=True, exist_ok=True)
    layers = list(below)
    for i, digest in enumerate(layer_digests):
        if fmt == "native":
            size = repo.head_blob(digest)
            if size is None:
                raise NotFoundError(f"converted parent layer {digest} is gone from the target repository")
            layers.append(open_layer_blob(BlobByRanges(repo, digest, size)))
            continue
        path = _download(repo, digest, scratch / f"{i}-{digest.partition(':')[2]}")
        members = _turbo_members(path.read_bytes())
        if fs_meta_file not in members:
            raise FormatError(f"turbo layer {digest} has no {fs_meta_file}")
        source = source_layer_digests[i]
        target = _SourceOnDemand(repo, source, scratch / f"{i}-src-{source.partition(':')[2]}",
                                 members.get("gzip.meta"))
        layers.append(open_layer_blob(members[fs_meta_file], target=target))
    return ParentDevice(LSMTStack(layers))


class BlobByRanges:
    """A blob read with range requests, in CHUNK-aligned pieces, the last CACHED_CHUNKS kept.

    For native parents: the metadata pass reads only their metadata (packed together after the
    data area in obdconv's layout), so downloading the whole blob would fetch mostly file bytes.
    Parts of a blob cannot be checked against its digest; the ZFile reader checks every block it
    decompresses against the block's CRC instead (as overlaybd itself reads layers lazily)."""

    CHUNK = 4 << 20
    CACHED_CHUNKS = 8

    def __init__(self, repo: Any, digest: str, size: int) -> None:
        self.repo, self.digest, self.size = repo, digest, size
        self.fetched = 0  # bytes requested from the repository so far
        self._chunks: OrderedDict[int, bytes] = OrderedDict()

    def _chunk(self, k: int) -> bytes:
        data = self._chunks.get(k)
        if data is None:
            want = min(self.CHUNK, self.size - k * self.CHUNK)
            data = self.repo.read_blob_range(self.digest, k * self.CHUNK, want)
            if len(data) != want:
                raise FormatError(f"blob {self.digest}: {len(data)} bytes at {k * self.CHUNK}, expected {want}")
            self.fetched += len(data)
            self._chunks[k] = data
            if len(self._chunks) > self.CACHED_CHUNKS:
                self._chunks.popitem(last=False)
        else:
            self._chunks.move_to_end(k)
        return data

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        pieces = []
        pos = offset
        while pos < end:
            k = pos // self.CHUNK
            within = pos - k * self.CHUNK
            piece = self._chunk(k)[within:within + end - pos]
            pieces.append(piece)
            pos += len(piece)
        return b"".join(pieces)


class _SourceOnDemand:
    """A turbo parent's original layer (its files' bytes), downloaded on the first read only. The
    metadata pass reads no file bytes (`Ext4Builder.load_parents` leaves them out), so usually it
    is never downloaded: for a gzip layer, reading it through gzip.meta would inflate it whole."""

    def __init__(self, repo: Any, digest: str, path: Path, gzip_meta: bytes | None) -> None:
        self.repo, self.digest, self.path, self.gzip_meta = repo, digest, path, gzip_meta
        self._source: Any = None
        self._lock = threading.Lock()

    def pread(self, offset: int, length: int) -> bytes:
        with self._lock:
            if self._source is None:
                _download(self.repo, self.digest, self.path)
                self._source = (GzipRandomReader(str(self.path), self.gzip_meta) if self.gzip_meta is not None
                                else FileSource(self.path))
        return self._source.pread(offset, length)  # type: ignore[no-any-return]


def turbo_hit_facts(repo: Any, digest: str) -> tuple[str, bool]:
    """(diff_id, source is gzip) of an existing turbo layer blob: the diff_id is the sha256 of its
    uncompressed archive; the archive holds gzip.meta iff the source layer is gzip."""
    blob = repo.read_blob(digest)
    raw = gzip.decompress(blob)
    return "sha256:" + hashlib.sha256(raw).hexdigest(), "gzip.meta" in _turbo_members(blob)

