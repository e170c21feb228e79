"""The `Repository` interface shared by a registry repository (HTTP) and an OCI image layout directory,
plus the pieces both use: `Manifest`, media types, and a blob reader that verifies sha256 while reading."""

from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO, Protocol

from obdconv.errors import BadInputError, IntegrityError
from obdconv.registry.reference import check_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)

READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest or index exactly as stored: its media type, raw bytes, and the sha256 of those bytes."""

    media_type: str
    data: bytes
    digest: str

    @property
    def size(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"Manifest({self.media_type!r}, {self.digest}, {len(self.data)} bytes)"


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...  # a `readinto` is used instead when the source has one


class VerifyingReader(io.RawIOBase):
    """Reads `source` while hashing; at EOF raises IntegrityError if the sha256 or the size is wrong.

    `what` names the blob in errors (e.g. "blob sha256:... from host/repo"). Reading past the expected
    size is caught as soon as it happens, so a server sending more bytes cannot make us buffer them.
    """

    def __init__(self, source: _Readable, digest: str, expected_size: int | None, what: str,
                 closer: object | None = None) -> None:
        super().__init__()
        self._source = source
        self._digest = check_digest(digest)
        self._expected_size = expected_size
        self._what = what
        self._closer = closer if closer is not None else source
        # Hashing inline: a helper thread overlapping hash and recv was tried and gave nothing on 2 busy
        # cores (sha256 itself is the limit) while doubling the memory held.
        self._hash = hashlib.sha256()
        self._size = 0
        self._verified = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._verified:
            return 0
        source_readinto = getattr(self._source, "readinto", None)
        if source_readinto is not None:  # a file: straight into the caller's buffer, one copy
            n = source_readinto(buffer) or 0
            data: bytes | memoryview = memoryview(buffer)[:n]
        else:
            data = self._source.read(len(buffer))
            n = len(data)
            memoryview(buffer)[:n] = data
        if not n:
            self._verify()
            return 0
        self._size += n
        if self._expected_size is not None and self._size > self._expected_size:
            raise IntegrityError(f"{self._what}: more than the expected {self._expected_size} bytes")
        self._hash.update(data)
        return n

    def _verify(self) -> None:
        if self._expected_size is not None and self._size != self._expected_size:
            raise IntegrityError(f"{self._what}: got {self._size} bytes, expected {self._expected_size}")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._digest:
            raise IntegrityError(f"{self._what}: content has digest {actual}, expected {self._digest}")
        self._verified = True

    @property
    def bytes_read(self) -> int:
        return self._size

    def close(self) -> None:
        if not self.closed:
            close = getattr(self._closer, "close", None)
            if close is not None:
                close()
        super().close()


def buffered(reader: VerifyingReader) -> BinaryIO:
    return io.BufferedReader(reader, buffer_size=READ_CHUNK)  # type: ignore[return-value]


def iter_file_chunks(f: BinaryIO, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            return
        yield chunk


class ChunkSource:
    """Blob bytes that can be read more than once: each iteration calls `open()` afresh. An upload
    given one (or a list) can start over when the network breaks it; an iterator cannot."""

    def __init__(self, open: Callable[[], Iterable[bytes]]) -> None:
        self._open = open

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._open())


def iter_ranges_chunks(ranges: Iterable[Sequence[Any]], chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
    """The bytes of `[path, offset, length]` ranges of files, in order, each file opened once per run
    of ranges in it."""
    f: BinaryIO | None = None
    current: Any = None
    try:
        for path, offset, length in ranges:
            if f is None or path != current:
                if f is not None:
                    f.close()
                f = open(path, "rb")  # closed below
                current = path
            f.seek(offset)
            left = length
            while left > 0:
                chunk = f.read(min(left, chunk_size))
                if not chunk:
                    raise BadInputError(f"{path}: ends before byte {offset + length} (prepared data truncated?)")
                left -= len(chunk)
                yield chunk
    finally:
        if f is not None:
            f.close()


class PendingBlob:
    """Bytes sent to a repository but not yet a blob (`Repository.begin_upload`): `commit()` makes
    them blob `digest`, `cancel()` drops them; each at most once, and one of them always should be
    called (an abandoned registry session is purged by the registry only after days)."""

    def __init__(self, digest: str, size: int, commit: Callable[[], None], cancel: Callable[[], None]) -> None:
        self.digest = digest
        self.size = size
        self._commit = commit
        self._cancel = cancel
        self._done = False

    def commit(self) -> None:
        if self._done:
            raise RuntimeError(f"pending blob {self.digest} was already committed or cancelled")
        self._done = True
        self._commit()

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self._cancel()


class Repository(ABC):
    """One repository: read and write manifests and blobs by digest or tag."""

    host: str  # "host[:port]" for a registry, "" for an OCI layout
    name: str  # repository path ("library/redis") or the layout directory

    @abstractmethod
    def get_manifest(self, ref: str) -> Manifest:
        """By tag or digest; the digest returned is always the sha256 of the exact bytes."""

    @abstractmethod
    def head_manifest(self, ref: str) -> str | None:
        """The digest `ref` currently points to, or None if it does not exist."""

    @abstractmethod
    def head_blob(self, digest: str) -> int | None:
        """The blob's size, or None if the repository does not have it."""

    @abstractmethod
    def open_blob(self, digest: str) -> BinaryIO:
        """A stream of the blob; IntegrityError at EOF if the bytes do not match `digest`."""

    @abstractmethod
    def upload_blob(self, chunks: Iterable[bytes], size: int | None = None) -> tuple[str, int]:
        """Store a blob whose digest is not known up front; returns (digest, size). `size`, when the
        caller knows it, is checked (IntegrityError if the chunks add up to anything else) and lets a
        registry upload send it as Content-Length instead of a chunk-framed body. `chunks` that can be
        iterated again (a list, a `ChunkSource`; not an iterator) are sent again if the network breaks
        the upload."""

    @abstractmethod
    def begin_upload(self, chunks: Iterable[bytes], size: int | None = None) -> PendingBlob:
        """Send a blob's bytes (hashing, `size` checked as in `upload_blob`) without making it a blob
        yet: nothing is visible in the repository until `commit()`. Lets a caller do the heavy part
        of an upload before it knows whether the blob should exist at all."""

    def begin_upload_ranges(self, ranges: Sequence[Sequence[Any]], size: int) -> PendingBlob:
        """`begin_upload` of the `[path, offset, length]` ranges of files one after the other
        (`size` bytes together): a registry sends their chunks (again, if the network breaks the
        upload); an OCI layout copies them in the kernel (no bytes through Python) and hashes them
        beside the copy."""
        return self.begin_upload(ChunkSource(partial(iter_ranges_chunks, ranges)), size=size)

    adopts_files = False  # whether `adopt_file` can take files (then it still may not, for some)

    def adopt_file(self, path: str, size: int, lock: int) -> PendingBlob | None:
        """`begin_upload` of the whole file `path` (`size` bytes) by taking the file itself rather
        than its bytes, or None when this repository cannot (a registry never can; an OCI layout
        on another filesystem cannot), for the caller to send the bytes instead. The caller
        promises the file never changes again; `lock` (an fd holding its flock) is the caller's
        until None is returned, else released when the blob is committed or cancelled."""
        return None

    @abstractmethod
    def push_blob(self, f: BinaryIO, digest: str, size: int) -> None:
        """Store a blob of known digest and size from `f` (skipped if already present)."""

    @abstractmethod
    def mount_blob(self, digest: str, from_repo: str) -> bool:
        """Make `digest` from another repository of the same registry available here without copying."""

    @abstractmethod
    def put_manifest(self, data: bytes, media_type: str, ref: str | None = None) -> str:
        """Store exact bytes under their digest, and under `ref` if it is a tag; returns the digest."""

    @abstractmethod
    def list_tags(self) -> list[str]: ...

    @abstractmethod
    def delete_manifest(self, ref: str) -> None: ...

    @abstractmethod
    def delete_blob(self, digest: str) -> None: ...

    def read_blob(self, digest: str) -> bytes:
        """A whole (small) blob, verified: configs and the like."""
        with self.open_blob(digest) as f:
            return f.read()

    @abstractmethod
    def read_blob_range(self, digest: str, offset: int, length: int) -> bytes:
        """`length` bytes of a blob from `offset` (fewer only at its end). NOT checked against
        `digest` (that takes the whole blob): for readers that check what they read themselves,
        as ZFile does with each block's CRC."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the repository may not be used afterwards."""

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
