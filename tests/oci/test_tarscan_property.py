"""Property test: for random archives, any chunking gives the same entries and data area, and every
file's offsets agree with tarfile's `offset_data`."""

from __future__ import annotations

import io
import tarfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obdconv.entries import EntryType
from tests.oci.helpers import info, make_tar, scan

_names = st.text(alphabet="abcdé_-.", min_size=1, max_size=120).filter(lambda s: s not in (".", ".."))
_member = st.tuples(_names, st.binary(max_size=9000), st.sampled_from(["file", "dir", "sym"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=st.lists(_member, min_size=1, max_size=8),
       fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
       chunks=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=20))
def test_random_archives(members: list[tuple[str, bytes, str]], fmt: int, chunks: list[int]) -> None:
    built = []
    for i, (name, data, kind) in enumerate(members):
        unique = f"m{i}/{name}"  # distinct paths, never ".wh." at the start of a component
        if kind == "file":
            built.append((info(unique, mtime=i), data))
        elif kind == "dir":
            built.append((info(unique, tarfile.DIRTYPE), None))
        else:
            built.append((info(unique, tarfile.SYMTYPE, linkname=name), None))
    raw = make_tar(built, fmt)
    whole = scan(raw)
    assert scan(raw, chunks) == whole
    entries, area, area_size = whole
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        regular = [m for m in tar.getmembers() if m.isreg()]
    files = [e for e in entries if e.type == EntryType.FILE]
    assert len(files) == len(regular)
    for e, m in zip(files, regular, strict=True):
        assert e.tar_offset == m.offset_data and e.size == m.size
        if m.size:
            assert area[e.data_offset : e.data_offset + m.size] == raw[m.offset_data : m.offset_data + m.size]
    assert area_size == len(area) and area_size % 4096 == 0
