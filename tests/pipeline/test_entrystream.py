"""Entries streamed from a prepare to the metadata pass (entrystream.py): the parts add up to the
spool's entry list byte for byte, a reader following a file being written gets every entry once
and in order, falls back to the spool when there is no (complete) stream, and raises the prepare's
error; the runner converting with streams gives the digests of a run without them."""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from obdconv.entries import EntryType, LayerEntry
from obdconv.errors import IntegrityError
from obdconv.pipeline import runner
from obdconv.pipeline.entrystream import EntryRows, EntryStreamWriter, encode_rows, streamed_entries
from obdconv.pipeline.prepare import prepare_layer
from obdconv.pipeline.results import RunnerOptions
from obdconv.registry import open_repository
from obdconv.request import ConversionRequest
from obdconv.verify import verify_reference
from tests.pipeline.images import Layout, directory, file, layer, symlink

E, T = LayerEntry, EntryType


def _entries(n: int, seed: int) -> list[LayerEntry]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = f"d{i % 7}/f{i}" + ("\udcff" if i % 97 == 0 else "")  # a non-UTF-8 byte, surrogate-escaped
        xattrs = [("user.k", rng.randbytes(5))] if i % 50 == 0 else []
        out.append(E(name, rng.choice([T.FILE, T.DIR, T.SYMLINK]), size=rng.randrange(9999), link_target="x",
                     xattrs=xattrs, tar_offset=i * 512, data_offset=i * 4096))
    return out


class _Spool:
    def __init__(self, entries: list[LayerEntry]) -> None:
        self.entries = entries

    def load_entries(self) -> list[LayerEntry]:
        return list(self.entries)


def test_parts_join_to_one_encoding() -> None:
    entries = _entries(1000, 1)
    rows = EntryRows()
    cuts = [0, 1, 2, 400, 401, 999, 1000]
    for lo, hi in itertools.pairwise(cuts):
        rows.add(entries[lo:hi])
    assert rows.joined() == encode_rows(entries)
    assert rows.count == 1000
    assert EntryRows().joined() == encode_rows([]) == b"[]"


def test_reader_follows_a_stream_being_written(tmp_path: Path) -> None:
    entries = _entries(3000, 2)
    path = tmp_path / "s" / "0.entries"
    done = threading.Event()

    def write() -> None:
        w = EntryStreamWriter(path)
        for lo in range(0, 3000, 700):
            w.write(encode_rows(entries[lo:lo + 700]))
            time.sleep(0.03)
        w.end()
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    parts = list(streamed_entries(path, done.is_set, lambda: pytest.fail("the stream was complete")))
    writer.join()
    assert [len(p) for p in parts] == [700, 700, 700, 700, 200]
    assert [e for p in parts for e in p] == entries


def test_no_stream_reads_the_spool(tmp_path: Path) -> None:
    entries = _entries(10, 3)
    assert [e for p in streamed_entries(tmp_path / "missing", lambda: True, lambda: _Spool(entries)) for e in p] \
        == entries
    assert list(streamed_entries(None, lambda: True, lambda: _Spool(entries))) == [entries]


def test_an_unfinished_stream_continues_from_the_spool(tmp_path: Path) -> None:
    entries = _entries(100, 4)
    w = EntryStreamWriter(tmp_path / "s")
    w.write(encode_rows(entries[:30]))
    parts = list(streamed_entries(tmp_path / "s", lambda: True, lambda: _Spool(entries)))
    assert parts == [entries[:30], entries[30:]]


def test_a_failed_prepare_is_raised(tmp_path: Path) -> None:
    w = EntryStreamWriter(tmp_path / "s")
    w.write(encode_rows(_entries(5, 5)))
    w.discard()
    assert not (tmp_path / "s").exists()

    def failed() -> Any:
        raise IntegrityError("blob digest mismatch")

    with pytest.raises(IntegrityError, match="mismatch"):
        list(streamed_entries(tmp_path / "s", lambda: True, failed))


def _big_layer_image(root: Path) -> Layout:
    """A layer of more entries than one streamed part, with an opaque directory and whiteouts
    late in it (they act on entries of earlier parts and of the layer below)."""
    rng = random.Random(6)
    base = [directory("keep"), directory("opq"), file("opq/lower", b"lower"), file("keep/gone", b"x")]
    big = [directory("d"), file("opq/upper", b"up")]  # in the first part; the opaque marker in the last
    big += [file(f"d/f{i}", rng.randbytes(rng.choice([0, 10, 5000]))) for i in range(5000)]
    big += [symlink("d/link", "f1"), file("opq/.wh..wh..opq", b""), file("keep/.wh.gone", b""),
            file("d/.wh.f7", b"")]
    lay = Layout(root)
    lay.image([layer(base, "gzip"), layer(big, "gzip"), layer([file("top", b"t")], "none")], tag="t")
    return lay


def test_prepare_streams_what_it_spools(tmp_path: Path) -> None:
    lay = _big_layer_image(tmp_path / "src")
    repo = open_repository(f"oci:{lay.root}")
    desc = json.loads(repo.get_manifest("t").data)["layers"][1]
    stream = tmp_path / "stream"
    prepared = prepare_layer(repo, desc, tmp_path / "spool", native=True, turbo=False, entry_stream=stream)
    parts = list(streamed_entries(stream, lambda: True, lambda: pytest.fail("the stream was complete")))
    assert len(parts) > 1
    assert [e for p in parts for e in p] == prepared.load_entries()
    stream.unlink()
    again = prepare_layer(repo, desc, tmp_path / "spool", native=True, turbo=False, entry_stream=stream)
    assert again.spool == prepared.spool and not stream.exists()  # reused: nothing streamed


@pytest.mark.slow
def test_runner_with_streams_gives_the_digests_of_one_without(tmp_path: Path) -> None:
    """The pool run applies the big layer in streamed parts, the inline run in one; both images
    hold exactly the source's files (the opaque marker in the last part keeps the first part's file)."""
    lay = _big_layer_image(tmp_path / "src")
    results = {}
    for workers in (2, 1):
        work = tmp_path / f"w{workers}"
        request = ConversionRequest(f"oci:{lay.root}", input_tag="t", overlaybd_tag=f"obd{workers}",
                                    turbo_tag=f"turbo{workers}", workdir=str(work), oci=True)
        result = runner.convert(request, options=RunnerOptions(workers=workers))
        results[workers] = {o.format: o.root_digest for o in result.outputs}
        assert not (work / runner.STREAMS_DIR).exists()
    assert results[2] == results[1]
    report = verify_reference(f"oci:{lay.root}:obd2", f"oci:{lay.root}:t")
    assert report.ok, report.format_text()
