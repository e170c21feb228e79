"""Layers gzip-compressed as several members (RFC 1952 allows it; some parallel compressors write
it): native conversion reads every member; turboOCI refuses them with a clear error, because the
overlaybd runtime's gzip index reader stops at the end of the first member (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import gzip
import itertools
import json
import random
from pathlib import Path

import pytest

from obdconv.errors import UnsupportedError
from obdconv.pipeline.runner import RunnerOptions, convert
from obdconv.request import ConversionRequest
from obdconv.verify import verify_reference
from tests.pipeline.images import LAYER_TYPES, Layer, Layout, directory, file, make_tar, sha


def _multi_member_layer() -> Layer:
    rng = random.Random(5)
    tar = make_tar([directory("data"), *[file(f"data/f{i}", rng.randbytes(rng.randrange(1, 40_000)))
                                         for i in range(40)]])
    cuts = [0, len(tar) // 3 + 17, 2 * len(tar) // 3 + 5, len(tar)]  # members split inside file data
    blob = b"".join(gzip.compress(tar[a:b], mtime=0) for a, b in itertools.pairwise(cuts))
    assert gzip.decompress(blob) == tar
    return Layer(blob, sha(tar), LAYER_TYPES[(False, "gzip")])


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    lay = Layout(tmp_path / "layout")
    lay.image([Layer(*_plain_first()), _multi_member_layer()], tag="src")
    return lay.root


def _plain_first() -> tuple[bytes, str, str]:
    tar = make_tar([file("base", b"base layer")])
    return gzip.compress(tar, mtime=0), sha(tar), LAYER_TYPES[(False, "gzip")]


def _tags(layout: Path) -> set[str]:
    index = json.loads((layout / "index.json").read_text())
    return {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]}


def test_native_conversion_reads_every_member(layout: Path, tmp_path: Path) -> None:
    convert(ConversionRequest(repository=f"oci:{layout}", input_tag="src", overlaybd_tag="obd", oci=True,
                              workdir=str(tmp_path / "w")), options=RunnerOptions(workers=1))
    report = verify_reference(f"oci:{layout}:obd", f"oci:{layout}:src")
    assert report.ok, report.format_text()
    assert report.platforms[0].entries_compared == 1 + 1 + 40


def test_turbo_conversion_is_refused_naming_the_layer(layout: Path, tmp_path: Path) -> None:
    digest = json.loads(Path(layout, "blobs", "sha256", _manifest_digest(layout)).read_text())["layers"][1]["digest"]
    with pytest.raises(UnsupportedError) as info:
        convert(ConversionRequest(repository=f"oci:{layout}", input_tag="src", turbo_tag="turbo", oci=True,
                                  workdir=str(tmp_path / "w")), options=RunnerOptions(workers=1))
    message = str(info.value)
    assert digest in message and "more than one member" in message and "overlaybd (native)" in message
    assert info.value.exit_code == 69
    assert _tags(layout) == {"src"}  # nothing published


def _manifest_digest(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    return index["manifests"][0]["digest"].partition(":")[2]
