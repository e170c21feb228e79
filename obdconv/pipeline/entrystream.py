"""A layer's entries handed from its prepare to the metadata pass while the layer is still being
scanned, so the pass (the ordered, one-thread part of a conversion) runs beside the prepare instead
of after it.

The entries travel as the rows of the spool's entry list (`LayerEntry.to_list`, JSON): the
prepare encodes them once, part by part as the scan finds them (`EntryRows`), appends each part to
a stream file as a frame (`EntryStreamWriter`), and writes the spool's `entries.json.zst` from the
same parts at the end. The reader (`streamed_entries`, in another process of the same machine)
follows the file. Frame: u32 little-endian length, then that many bytes of a JSON array of rows;
the length 0xFFFFFFFF ends the stream, and is written only once the whole blob was read and its
digest verified.

A prepare that reuses a spool writes no stream, and one that fails leaves it unfinished: the reader
then waits for the prepare itself (its error, or its spool's entries).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from obdconv.entries import LayerEntry
from obdconv.errors import FormatError

_LENGTH = struct.Struct("<I")
_END = 0xFFFFFFFF
MAX_FRAME = 1 << 30
POLL_SECONDS = (0.002, 0.02)  # the reader's first and longest wait for more of the stream


def encode_rows(entries: Sequence[LayerEntry]) -> bytes:
    """A JSON array of the entries' rows (the spool's entry list format)."""
    return json.dumps([e.to_list() for e in entries], separators=(",", ":"), ensure_ascii=False,
                      # tar names that are not UTF-8 arrive as surrogate escapes; keep them lossless
                      ).encode("utf-8", "surrogateescape")


def decode_rows(raw: bytes | bytearray | memoryview) -> list[LayerEntry]:
    return [LayerEntry.from_list(row) for row in json.loads(bytes(raw).decode("utf-8", "surrogateescape"))]


class EntryRows:
    """A layer's entry rows encoded part by part; `joined` is what one `encode_rows` of all of them gives."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.count = 0

    def add(self, entries: Sequence[LayerEntry]) -> bytes:
        """Encode the next entries; returns their JSON array."""
        raw = encode_rows(entries)
        if entries:
            self.parts.append(raw[1:-1])
            self.count += len(entries)
        return raw

    def joined(self) -> bytes:
        return b"[" + b",".join(self.parts) + b"]"

    def save(self, path: Path) -> None:
        """The spool's `entries.json.zst`."""
        path.write_bytes(zstandard.ZstdCompressor(level=3).compress(self.joined()))


class EntryStreamWriter:
    """Appends parts of a layer's entry list to the stream file `path` (see the module doc)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: BinaryIO | None = open(self.path, "wb")  # closed by end() or discard()

    def write(self, rows: bytes) -> None:
        """One part: `rows` as `EntryRows.add` returns them."""
        if self._f is None:
            raise ValueError("entry stream already ended")
        self._f.write(_LENGTH.pack(len(rows)) + rows)
        self._f.flush()

    def end(self) -> None:
        """Every entry was written (and the blob's digest verified)."""
        if self._f is not None:
            self._f.write(_LENGTH.pack(_END))
            self._f.close()
            self._f = None

    def discard(self) -> None:
        """The prepare failed: remove the unfinished stream (its reader waits for the prepare)."""
        if self._f is not None:
            self._f.close()
            self._f = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class _Frames:
    """Complete frames read so far from a stream file that may still grow."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f: BinaryIO | None = None
        self.buf = bytearray()
        self.ended = False

    def read(self) -> list[bytes]:
        if self.f is None:
            try:
                self.f = open(self.path, "rb")  # closed by close()
            except FileNotFoundError:
                return []
        while chunk := self.f.read(1 << 20):
            self.buf += chunk
        frames = []
        pos = 0
        while len(self.buf) - pos >= _LENGTH.size:
            (n,) = _LENGTH.unpack_from(self.buf, pos)
            if n == _END:
                self.ended = True
                pos += _LENGTH.size
                break
            if n > MAX_FRAME:
                raise FormatError(f"entry stream {self.path}: frame of {n} bytes")
            if len(self.buf) - pos - _LENGTH.size < n:
                break
            frames.append(bytes(self.buf[pos + _LENGTH.size:pos + _LENGTH.size + n]))
            pos += _LENGTH.size + n
        del self.buf[:pos]
        return frames

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def streamed_entries(path: str | os.PathLike[str] | None, done: Callable[[], bool],
                     finished: Callable[[], Any]) -> Iterator[list[LayerEntry]]:
    """A layer's entries in parts, as its prepare writes them to the stream `path` (None: no
    stream, only the spool). `done()` says whether the prepare has ended; `finished()` waits for it
    and returns its `PreparedLayer` (raising the prepare's error). After the last part the stream
    was complete, or the prepare succeeded and the parts not streamed came from its spool."""
    taken = 0
    if path is not None:
        frames = _Frames(Path(path))
        wait = POLL_SECONDS[0]
        try:
            while True:
                ended = done()  # before reading: a stream finished before the prepare is read whole
                parts = frames.read()
                for raw in parts:
                    entries = decode_rows(raw)
                    taken += len(entries)
                    yield entries
                if frames.ended:
                    return
                if ended:
                    break
                if parts:
                    wait = POLL_SECONDS[0]
                else:
                    time.sleep(wait)
                    wait = min(wait * 2, POLL_SECONDS[1])
        finally:
            frames.close()
    prepared = finished()
    rest = prepared.load_entries()[taken:]
    if rest:
        yield rest
