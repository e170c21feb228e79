"""Blob bodies on the wire, for the registry client: a streamed download that resumes where a broken
connection left it, and the shapes of an upload body (sized, re-chunked).

Resuming: a download broken mid-body (reset, read timeout, truncated) asks the registry for the rest
(`Range: bytes=N-`) instead of failing the conversion; the caller's digest check still covers the
whole blob. At most `attempts` resumes per blob, each a request retried within the budget like any
other (RegistryOptions.resume_attempts, retry_budget).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import requests
import urllib3.exceptions

from obdconv.errors import NetworkError

log = logging.getLogger(__name__)


class RawSource:
    """Reads a streamed response body, turning transport failures into NetworkError."""

    def __init__(self, response: requests.Response, what: str) -> None:
        self._response = response
        self._what = what
        response.raw.decode_content = True

    def read(self, n: int = -1) -> bytes:
        try:
            return self._response.raw.read(None if n < 0 else n)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
            raise NetworkError(f"{self._what}: download interrupted: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        self._response.close()


class ResumingSource:
    """A body read through `RawSource`s: when one breaks, `reopen(offset)` gives the rest from `offset`
    on (the client's Range request), at most `attempts` times; then the last error is raised."""

    def __init__(self, first: RawSource, reopen: Callable[[int], RawSource], attempts: int, what: str) -> None:
        self._source = first
        self._reopen = reopen
        self._attempts = attempts
        self._what = what
        self._offset = 0
        self._resumes = 0

    def read(self, n: int = -1) -> bytes:
        while True:
            try:
                data = self._source.read(n)
            except NetworkError as e:
                if self._resumes >= self._attempts:
                    raise
                self._resumes += 1
                log.info("%s: broken at byte %d (%s); asking for the rest (resume %d of %d)",
                         self._what, self._offset, e, self._resumes, self._attempts)
                self._source.close()
                self._source = self._reopen(self._offset)
                continue
            self._offset += len(data)
            return data

    def close(self) -> None:
        self._source.close()


class SizedBody:
    """An iterable request body of known length: requests sends it with Content-Length (it takes
    `len()` of any iterable that has one) and urllib3 then writes each piece as it is, unframed."""

    def __init__(self, pieces: Iterable[bytes], size: int) -> None:
        self._pieces = pieces
        self._size = size

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._pieces)


def rechunk(chunks: Iterable[bytes], limit: int, merge_below: int | None = None) -> Iterator[bytes]:
    """Pieces of at most `limit` bytes, so memory stays bounded.

    Chunks smaller than `merge_below` (default: `limit`) are merged; larger ones pass through without a
    copy (split with slices only when above `limit`): each extra copy of a piece is more resident memory.
    """
    merge_below = limit if merge_below is None else merge_below
    pending = bytearray()
    for chunk in chunks:
        if len(chunk) >= merge_below and not pending:
            if len(chunk) <= limit:
                yield chunk
            else:
                view = memoryview(chunk)
                for start in range(0, len(view), limit):
                    yield bytes(view[start:start + limit])
            continue
        view = memoryview(chunk)
        while len(view):
            room = min(limit, merge_below) - len(pending)
            pending += view[:room]
            view = view[room:]
            if len(pending) >= min(limit, merge_below):
                yield bytes(pending)
                pending.clear()
    if pending:
        yield bytes(pending)
