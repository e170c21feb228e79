"""Random-access byte sources: the one small abstraction every reader in this package sits on.

A *source* is anything with `pread(offset, length) -> bytes`. Readers accept file objects, paths and
other readers (a ZFile reader, a tar payload window, a gzip random reader) and adapt them here.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable


@runtime_checkable
class RandomAccess(Protocol):
    """Anything that can read `length` bytes at `offset` (short only at end of data)."""

    def pread(self, offset: int, length: int) -> bytes: ...


class FileSource:
    """A file as a source. Uses os.pread when the object has a real descriptor (thread safe, no
    shared file position); otherwise falls back to seek + read under the caller's discipline.
    `use_fd=False` always seeks and reads: a tar member's file object (`TarFile.extractfile`)
    answers `fileno()` with the descriptor of the whole archive, not of the member's bytes."""

    def __init__(self, f: BinaryIO | str | os.PathLike[str], use_fd: bool = True) -> None:
        self._owned = isinstance(f, (str, os.PathLike))
        self._f: BinaryIO = open(f, "rb") if isinstance(f, (str, os.PathLike)) else f
        try:
            self._fd: int | None = self._f.fileno() if use_fd else None
        except (OSError, AttributeError, io.UnsupportedOperation):
            self._fd = None

    @property
    def size(self) -> int:
        if self._fd is not None:
            return os.fstat(self._fd).st_size
        pos = self._f.tell()
        end = self._f.seek(0, io.SEEK_END)
        self._f.seek(pos)
        return end

    def pread(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        if self._fd is not None:
            return os.pread(self._fd, length, offset)
        self._f.seek(offset)
        return self._f.read(length)

    def close(self) -> None:
        if self._owned:
            self._f.close()

    def __del__(self) -> None:
        # Sources opened from a path are owned here; readers rarely have a moment to close them.
        if getattr(self, "_owned", False):
            self._f.close()


class BytesSource:
    """An in-memory buffer as a source."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data).cast("B") if not isinstance(data, bytes) else data

    @property
    def size(self) -> int:
        return len(self._data)

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self._data[offset : offset + max(length, 0)])

    def pread_view(self, offset: int, length: int) -> memoryview:
        """Like `pread` but without the copy (readers that only decode from the bytes use it)."""
        return memoryview(self._data)[offset : offset + max(length, 0)]


class WindowSource:
    """`size` bytes of another source starting at `base` (e.g. the payload inside a tar wrapper)."""

    def __init__(self, inner: RandomAccess, base: int, size: int) -> None:
        self._inner, self._base, self.size = inner, base, size

    def pread(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        return self._inner.pread(self._base + offset, min(length, self.size - offset))

    def pread_view(self, offset: int, length: int) -> memoryview:
        """`pread` as a memoryview, without a copy when the inner source has `pread_view` too."""
        if offset >= self.size or length <= 0:
            return memoryview(b"")
        inner_view = getattr(self._inner, "pread_view", None)
        length = min(length, self.size - offset)
        if inner_view is None:
            return memoryview(self._inner.pread(self._base + offset, length))
        return inner_view(self._base + offset, length)  # type: ignore[no-any-return]


def source_size(src: RandomAccess) -> int:
    """Size of a source that has a `size` attribute (all the adapters above do)."""
    size = getattr(src, "size", None)
    if size is None:
        raise TypeError(f"{type(src).__name__} has no size")
    return int(size)


def as_source(f: RandomAccess | BinaryIO | bytes | bytearray | str | os.PathLike[str]) -> RandomAccess:
    """Adapt a path, a bytes buffer, a file object or an existing source to `RandomAccess`."""
    if isinstance(f, (bytes, bytearray, memoryview)):
        return BytesSource(f)
    if isinstance(f, (str, Path, os.PathLike)):
        return FileSource(f)
    if hasattr(f, "pread"):
        return f  # type: ignore[return-value]
    return FileSource(f)  # type: ignore[arg-type]
