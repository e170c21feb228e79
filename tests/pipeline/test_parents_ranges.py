"""`BlobByRanges`: a converted parent read in aligned pieces, only where it is read."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from obdconv.errors import FormatError
from obdconv.pipeline.parents import BlobByRanges
from obdconv.registry import open_repository


class _Small(BlobByRanges):
    CHUNK = 1000
    CACHED_CHUNKS = 3


def test_reads_equal_the_blob_and_fetch_only_what_they_touch(tmp_path: Path) -> None:
    repo = open_repository(f"oci:{tmp_path / 'lay'}")
    data = os.urandom(25_500)
    digest, size = repo.upload_blob([data])
    blob = _Small(repo, digest, size)
    assert blob.pread(1500, 200) == data[1500:1700]
    assert blob.fetched == 1000  # one chunk
    assert blob.pread(1999, 2) == data[1999:2001]  # crosses into the next chunk
    assert blob.fetched == 2000
    assert blob.pread(1000, 10) == data[1000:1010]  # cached
    assert blob.fetched == 2000
    assert blob.pread(25_000, 10_000) == data[25_000:]  # the short last chunk, clipped at the end
    assert blob.pread(size, 10) == b""
    rnd = random.Random(3)
    for _ in range(200):
        offset = rnd.randrange(size)
        length = rnd.randrange(1, 4000)
        assert blob.pread(offset, length) == data[offset:offset + length]
    assert len(blob._chunks) <= _Small.CACHED_CHUNKS


def test_a_blob_shorter_than_announced_is_an_error(tmp_path: Path) -> None:
    repo = open_repository(f"oci:{tmp_path / 'lay'}")
    digest, size = repo.upload_blob([b"x" * 1500])
    with pytest.raises(FormatError, match="expected"):
        _Small(repo, digest, size + 700).pread(1000, 1000)
