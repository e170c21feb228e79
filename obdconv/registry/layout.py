"""An OCI image layout directory (`oci:PATH`) used like a registry repository.

Tags are the `org.opencontainers.image.ref.name` annotations of index.json's descriptors; blobs live in
blobs/sha256/<hex>. Every write is atomic (a temp file in the same directory, then rename), and index.json
updates are serialised across processes with a lock file and replaced atomically.

A blob being written is a `.upload-*` temp file its writer holds flock'ed until it is renamed into
place or removed; the first write through a repository object removes the `.upload-*` files that
an interrupted process left (unlocked and older than the object, obdconv/leftovers.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from obdconv.errors import BadInputError, FormatError, IntegrityError, NotFoundError
from obdconv.leftovers import hold, release, remove_leftovers
from obdconv.oci.digests import ranges_sha256, sha256_digest
from obdconv.registry.reference import check_digest, is_digest
from obdconv.registry.repository import (
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    READ_CHUNK,
    Manifest,
    PendingBlob,
    Repository,
    VerifyingReader,
    buffered,
    iter_file_chunks,
)

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
OCI_LAYOUT_FILE = "oci-layout"
OCI_LAYOUT_CONTENT = b'{"imageLayoutVersion":"1.0.0"}'
INDEX_FILE = "index.json"
LOCK_FILE = ".obdconv-index.lock"
UPLOAD_PREFIX = ".upload-"
T = TypeVar("T")


def _guess_media_type(data: bytes) -> str:
    """A manifest's type from its own JSON: `mediaType` if set, else by shape (OCI allows omitting it)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return ""
    if not isinstance(doc, dict):
        return ""
    media_type = doc.get("mediaType", "")
    if media_type in MANIFEST_MEDIA_TYPES:
        return media_type
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc or "config" in doc:
        return OCI_MANIFEST
    return ""


class OCILayoutRepository(Repository):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = Path(path)
        self.host = ""
        self.name = str(path)
        self._opened = time.time()
        self._swept = False

    def __repr__(self) -> str:
        return f"OCILayoutRepository({self.name})"

    # -- layout plumbing ----------------------------------------------------------------------------------

    def _blob_path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / "blobs" / "sha256" / digest.split(":", 1)[1]

    def _where(self, ref: str) -> str:
        return f"oci:{self.name}{'@' if is_digest(ref) else ':'}{ref}"

    def _ensure_layout(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        if not self._swept:  # once per object: partial blobs of interrupted writers
            self._swept = True
            remove_leftovers(self.root / "blobs" / "sha256", [UPLOAD_PREFIX], self._opened)
        layout_file = self.root / OCI_LAYOUT_FILE
        if not layout_file.exists():
            _atomic_write(layout_file, OCI_LAYOUT_CONTENT)
        if not (self.root / INDEX_FILE).exists():
            _atomic_write(self.root / INDEX_FILE, _dump_index({"schemaVersion": 2, "manifests": []}))

    def _read_index(self) -> dict[str, Any]:
        path = self.root / INDEX_FILE
        try:
            index = json.loads(path.read_bytes())
        except FileNotFoundError:
            if not self.root.is_dir():
                raise NotFoundError(f"OCI layout directory {self.root} does not exist") from None
            return {"schemaVersion": 2, "manifests": []}
        except (ValueError, RecursionError) as e:
            raise FormatError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
            raise FormatError(f"{path} is not an OCI image index")
        index.setdefault("manifests", [])
        return index

    @contextlib.contextmanager
    def _index_update(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write of index.json under an exclusive lock; replaced atomically on exit."""
        self._ensure_layout()
        with open(self.root / LOCK_FILE, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = self._read_index()
            yield index
            _atomic_write(self.root / INDEX_FILE, _dump_index(index))

    def _resolve(self, ref: str) -> tuple[str, dict[str, Any] | None]:
        """(digest, descriptor in index.json or None) for a tag or digest."""
        manifests = self._read_index()["manifests"]
        if is_digest(ref):
            descriptor = next((d for d in manifests if d.get("digest") == ref), None)
            return ref, descriptor
        tagged = [d for d in manifests if (d.get("annotations") or {}).get(REF_NAME_ANNOTATION) == ref]
        if not tagged:
            raise NotFoundError(f"manifest {self._where(ref)} not found (no such tag in index.json)")
        return tagged[-1]["digest"], tagged[-1]

    # -- manifests ----------------------------------------------------------------------------------------

    def get_manifest(self, ref: str) -> Manifest:
        digest, descriptor = self._resolve(ref)
        try:
            data = self._blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"manifest {self._where(ref)}: blob {digest} missing") from None
        actual = sha256_digest(data)
        if actual != digest:
            raise IntegrityError(f"manifest {self._where(ref)}: content has digest {actual}, expected {digest}")
        if descriptor is not None and "size" in descriptor and descriptor["size"] != len(data):
            raise BadInputError(f"manifest {self._where(ref)}: index.json's descriptor says {descriptor['size']} "
                                f"bytes, the blob has {len(data)}")
        media_type = (descriptor or {}).get("mediaType") or _guess_media_type(data)
        if media_type not in MANIFEST_MEDIA_TYPES:
            raise BadInputError(f"manifest {self._where(ref)} has unknown media type {media_type!r}")
        return Manifest(media_type, data, digest)

    def head_manifest(self, ref: str) -> str | None:
        try:
            digest, _ = self._resolve(ref)
        except NotFoundError:
            return None
        return digest if self._blob_path(digest).exists() else None

    def put_manifest(self, data: bytes, media_type: str, ref: str | None = None) -> str:
        digest = sha256_digest(data)
        if ref and is_digest(ref) and ref != digest:
            raise IntegrityError(f"manifest for {self._where(ref)}: bytes have digest {digest}")
        self._ensure_layout()
        self._check_referenced(data, ref or digest)
        self._store(iter([bytes(data)]), digest, len(data))
        descriptor: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(data)}
        with self._index_update() as index:
            manifests: list[dict[str, Any]] = index["manifests"]
            if ref and not is_digest(ref):
                # A tag moves: drop the descriptor that carried it before.
                manifests[:] = [d for d in manifests
                                if (d.get("annotations") or {}).get(REF_NAME_ANNOTATION) != ref]
                descriptor["annotations"] = {REF_NAME_ANNOTATION: ref}
                manifests.append(descriptor)
            elif not any(d.get("digest") == digest for d in manifests):
                manifests.append(descriptor)
        return digest

    def _check_referenced(self, data: bytes, ref: str) -> None:
        """Like a registry (MANIFEST_BLOB_UNKNOWN), refuse a manifest whose config, layers or child
        manifests are not in the layout: e.g. written by another machine into ITS directory of the
        same path. (A `subject` may live elsewhere, as in a registry.)"""
        try:
            doc = json.loads(data)
        except ValueError:
            return  # not JSON: nothing it refers to
        if not isinstance(doc, dict):
            return
        referenced = [doc.get("config"), *(doc.get("layers") or []), *(doc.get("manifests") or [])]
        for d in referenced:
            if isinstance(d, dict) and isinstance(d.get("digest"), str) and is_digest(d["digest"]):
                if not self._blob_path(d["digest"]).exists():
                    raise NotFoundError(f"manifest for {self._where(ref)} refers to blob {d['digest']}, which is not in "
                                        f"the layout {self.root} (a registry would refuse it too)")

    def list_tags(self) -> list[str]:
        names = {(d.get("annotations") or {}).get(REF_NAME_ANNOTATION) for d in self._read_index()["manifests"]}
        return sorted(n for n in names if n)

    def delete_manifest(self, ref: str) -> None:
        """Like a registry: deletes the manifest `ref` resolves to, with every tag pointing at it."""
        digest, _ = self._resolve(ref)
        with self._index_update() as index:
            before = len(index["manifests"])
            index["manifests"] = [d for d in index["manifests"] if d.get("digest") != digest]
            if len(index["manifests"]) == before and not self._blob_path(digest).exists():
                raise NotFoundError(f"manifest {self._where(ref)} not found")
        with contextlib.suppress(FileNotFoundError):
            self._blob_path(digest).unlink()

    # -- blobs --------------------------------------------------------------------------------------------

    def head_blob(self, digest: str) -> int | None:
        try:
            return self._blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open_blob(self, digest: str) -> BinaryIO:
        path = self._blob_path(digest)
        try:
            f = open(path, "rb")  # closed by the returned reader
        except FileNotFoundError:
            raise NotFoundError(f"blob {self._where(digest)} not found") from None
        return buffered(VerifyingReader(f, digest, None, f"blob {self._where(digest)}"))

    def read_blob_range(self, digest: str, offset: int, length: int) -> bytes:
        try:
            with open(self._blob_path(digest), "rb") as f:
                return os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise NotFoundError(f"blob {self._where(digest)} not found") from None

    def upload_blob(self, chunks: Iterable[bytes], size: int | None = None) -> tuple[str, int]:
        self._ensure_layout()
        return self._store(chunks, expected_size=size)

    def begin_upload(self, chunks: Iterable[bytes], size: int | None = None) -> PendingBlob:
        """The bytes go to a hidden temp file beside the blobs; commit renames it into place."""
        self._ensure_layout()
        return self._pending(*self._write_temp(chunks, None, size))

    def begin_upload_ranges(self, ranges: Sequence[Sequence[Any]], size: int) -> PendingBlob:
        """The ranges are copied into the temp file by the kernel (copy_file_range: no bytes through
        Python, about half the CPU of reading and writing them) while a thread hashes them."""
        self._ensure_layout()
        return self._pending(*self._copy_temp(ranges, size))

    adopts_files = True

    def adopt_file(self, path: str, size: int, lock: int) -> PendingBlob | None:
        """The file becomes the blob by a hard link beside the blobs (no copy), once hashed and
        fsynced (both at once); None when it cannot be linked here (another filesystem)."""
        self._ensure_layout()
        tmp_name = str(self.root / "blobs" / "sha256" / f"{UPLOAD_PREFIX}{secrets.token_hex(8)}")
        try:
            os.link(path, tmp_name)
        except OSError:
            return None
        try:
            digest, hashed_size, _ = _hashed_beside([[tmp_name, 0, size + 1]], partial(_fsync_path, tmp_name))
            if hashed_size != size:
                raise IntegrityError(f"blob for {self.name}: {path} is {hashed_size} bytes, expected {size}")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        return self._pending(tmp_name, digest, size, lock)

    def _pending(self, tmp_name: str, digest: str, written: int, lock: int) -> PendingBlob:
        def commit() -> None:
            try:
                self._install(tmp_name, digest)
            finally:
                release(lock)

        def cancel() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            release(lock)

        return PendingBlob(digest, written, commit, cancel)

    def push_blob(self, f: BinaryIO, digest: str, size: int) -> None:
        if self.head_blob(digest) is not None:
            return
        self._ensure_layout()
        self._store(iter_file_chunks(f), digest, size)

    def mount_blob(self, digest: str, from_repo: str) -> bool:
        """A layout has no mounts; "mounted" only when the blob is already here (as a registry says 201)."""
        return self.head_blob(digest) is not None

    def delete_blob(self, digest: str) -> None:
        try:
            self._blob_path(digest).unlink()
        except FileNotFoundError:
            raise NotFoundError(f"blob {self._where(digest)} not found") from None

    def _store(self, chunks: Iterable[bytes], expected_digest: str | None = None,
               expected_size: int | None = None) -> tuple[str, int]:
        """Write to a temp file beside the blobs, hashing; rename into place once verified."""
        tmp_name, digest, size, lock = self._write_temp(chunks, expected_digest, expected_size)
        try:
            self._install(tmp_name, digest)
        finally:
            release(lock)
        return digest, size

    def _write_temp(self, chunks: Iterable[bytes], expected_digest: str | None,
                    expected_size: int | None) -> tuple[str, str, int, int]:
        """`_temp_blob` of `chunks`, hashed as written and checked against what was expected."""

        def fill(fd: int) -> tuple[str, int]:
            hasher = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    hasher.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = "sha256:" + hasher.hexdigest()
            if expected_size is not None and size != expected_size:
                what = f"blob {expected_digest}" if expected_digest else "blob"
                raise IntegrityError(f"{what} for {self.name}: {size} bytes, expected {expected_size}")
            if expected_digest is not None and digest != expected_digest:
                raise IntegrityError(f"blob for {self.name}: content has digest {digest}, expected {expected_digest}")
            return digest, size

        return self._temp_blob(fill)

    def _copy_temp(self, ranges: Sequence[Sequence[Any]], size: int) -> tuple[str, str, int, int]:
        """`_temp_blob` of byte ranges of files, copied in the kernel and hashed by a helper thread."""

        def fill(fd: int) -> tuple[str, int]:
            def copy() -> int:
                with os.fdopen(fd, "wb", buffering=0) as out:
                    written = sum(_copy_range(out, path, offset, length) for path, offset, length in ranges)
                    os.fsync(out.fileno())
                return written

            digest, hashed_size, written = _hashed_beside(ranges, copy)
            if written != size or hashed_size != size:
                raise IntegrityError(f"blob for {self.name}: {written} bytes, expected {size}")
            return digest, size

        return self._temp_blob(fill)

    def _temp_blob(self, fill: Callable[[int], tuple[str, int]]) -> tuple[str, str, int, int]:
        """(temp file, digest, size, lock): a temp file beside the blobs, written and checked by
        `fill(fd)` (which returns its digest and size), and removed again if anything fails. `lock`
        holds the temp file's flock (marking it as in use, not left over) until released."""
        fd, tmp_name = tempfile.mkstemp(prefix=UPLOAD_PREFIX, dir=self.root / "blobs" / "sha256")
        lock: int | None = None
        try:
            lock = hold(tmp_name)
            digest, size = fill(fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            release(lock)
            raise
        return tmp_name, digest, size, lock

    def _install(self, tmp_name: str, digest: str) -> None:
        try:
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, self._blob_path(digest))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise



def _hashed_beside(ranges: Sequence[Sequence[Any]], work: Callable[[], T]) -> tuple[str, int, T]:
    """(digest, size, `work()`'s result) of the `[path, offset, length]` ranges, hashed in a
    helper thread (`ranges_sha256`) while `work` (a copy, an fsync) runs in this one."""
    with ThreadPoolExecutor(1, thread_name_prefix="layout-hash") as hasher:
        hashed = hasher.submit(ranges_sha256, ranges)
        result = work()
        digest, size = hashed.result()
    return digest, size, result


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_range(out: BinaryIO, path: str | os.PathLike[str], offset: int, length: int) -> int:
    """Append `length` bytes of file `path` from `offset` to `out` (an unbuffered file); returns
    the bytes copied (fewer if the file is shorter: the caller's size check reports it)."""
    with open(path, "rb") as f:
        left = length
        try:
            while left:
                n = os.copy_file_range(f.fileno(), out.fileno(), left, offset + length - left)
                if n == 0:
                    break
                left -= n
        except OSError:  # no copy_file_range between these files (old kernel, other filesystem)
            f.seek(offset + length - left)
            while left and (chunk := f.read(min(left, READ_CHUNK))):
                out.write(chunk)
                left -= len(chunk)
    return length - left


def _dump_index(index: dict[str, Any]) -> bytes:
    return json.dumps(index, separators=(",", ":")).encode()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
