"""A layer applied in parts (`Ext4Builder.begin_layer`, as the runner does while the layer is still
being scanned) gives the same metadata and image bytes as one `apply` of the whole list: on both
paths, whatever the cut points (an opaque marker after the entries it must keep, whiteouts of
entries of earlier parts), with another builder applying its own layers between the parts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from obdconv.entries import EntryType, LayerEntry
from obdconv.errors import BadInputError, ObdconvError
from obdconv.ext4 import Ext4Builder, LayerMetadata, fast
from tests.ext4.helpers import FS_UUID, fsck
from tests.ext4.test_fast import assert_same, assert_same_image, edge_layers, needs_fast

E, T = LayerEntry, EntryType


def _in_parts(b: Ext4Builder, entries: list[LayerEntry], cuts: list[int]) -> LayerMetadata:
    session = b.begin_layer()
    for lo, hi in zip([0, *cuts], [*cuts, len(entries)], strict=True):
        session.add(entries[lo:hi])
    return session.finish()


def _cuts(rng: random.Random, n: int, parts: int) -> list[int]:
    return sorted(rng.sample(range(1, n), min(parts, n - 1))) if n > 1 else []


def _build(image: Path, layers: list[list[LayerEntry]], cuts: list[list[int]] | None) -> list[LayerMetadata]:
    b = Ext4Builder(image, 64 << 30, FS_UUID)
    b.mkfs()
    if cuts is None:
        return [b.apply(entries) for entries in layers]
    return [_in_parts(b, entries, c) for entries, c in zip(layers, cuts, strict=True)]


@pytest.mark.parametrize("path", ["C", "ctypes"])
@pytest.mark.parametrize("seed", [1, 2])
def test_parts_give_the_same_bytes_as_one_apply(tmp_path: Path, path: str, seed: int) -> None:
    if path == "C" and fast.FAST is None:
        pytest.skip("C fast path not built (pip install -e . with libext2fs-dev)")
    layers = edge_layers()
    # Opaque directories after what they keep: tracking must cover entries of earlier parts.
    layers[1] += [E("usr/d09/late", T.FILE, size=7), E("usr/d09", T.OPAQUE), E("usr/d10/q", T.FILE, size=1),
                  E("usr/d11/gone/x", T.WHITEOUT), E("usr/d10", T.OPAQUE)]
    rng = random.Random(seed)
    cuts = [_cuts(rng, len(entries), rng.choice([1, 3, 40])) for entries in layers]
    saved = fast.FAST
    if path == "ctypes":
        fast.FAST = None
    try:
        whole = _build(tmp_path / "whole.img", layers, None)
        parts = _build(tmp_path / "parts.img", layers, cuts)
    finally:
        fast.FAST = saved
    assert_same(parts, whole)
    assert_same_image(tmp_path / "parts.img", tmp_path / "whole.img")
    assert fsck(tmp_path / "parts.img").returncode == 0


@needs_fast
def test_another_builder_between_parts(tmp_path: Path) -> None:
    """Two metadata passes in one process (two manifests) interleave part by part: each gets the
    bytes it gets alone (the write capture and the C allocation hint are process-wide)."""
    layers = edge_layers()
    alone = _build(tmp_path / "alone.img", layers, None)
    a = Ext4Builder(tmp_path / "a.img", 64 << 30, FS_UUID)
    other = Ext4Builder(tmp_path / "b.img", 64 << 30, FS_UUID)
    a.mkfs()
    other.mkfs()
    got = []
    for entries in layers:
        session = a.begin_layer()
        third = len(entries) // 3
        session.add(entries[:third])
        other.apply(entries[third:][:50])  # whatever it is, it must not leak into `a`
        session.add(entries[third:2 * third])
        other.begin_layer().finish()  # an empty layer of `other` between two parts of `a`
        session.add(entries[2 * third:])
        got.append(session.finish())
    assert_same(got, alone)
    assert_same_image(tmp_path / "a.img", tmp_path / "alone.img")


def test_bad_entry_in_a_later_part_breaks_the_builder(tmp_path: Path) -> None:
    b = Ext4Builder(tmp_path / "m.img", 64 << 30, FS_UUID)
    b.mkfs()
    session = b.begin_layer()
    session.add([E("ok", T.FILE, size=3)])
    with pytest.raises(BadInputError, match=r"entry 2 'bad'"):
        session.add([E("fine", T.FILE), E("bad", T.FILE, uid=-1)])
    with pytest.raises(ObdconvError, match="unusable"):
        b.apply([E("x", T.FILE)])


def test_bad_first_part_leaves_the_builder_usable(tmp_path: Path) -> None:
    b = Ext4Builder(tmp_path / "m.img", 64 << 30, FS_UUID)
    b.mkfs()
    with pytest.raises(BadInputError, match=r"entry 0 'bad'"):
        b.begin_layer().add([E("bad", T.FILE, uid=-1)])
    assert b.apply([E("x", T.FILE, size=1)]).file_extents


def test_abort_after_a_part_breaks_the_builder_and_frees_the_capture(tmp_path: Path) -> None:
    b = Ext4Builder(tmp_path / "m.img", 64 << 30, FS_UUID)
    b.mkfs()
    session = b.begin_layer()
    session.add([E("d", T.DIR), E("d/f", T.FILE, size=9)])
    session.abort()
    with pytest.raises(ObdconvError, match="unusable"):
        b.apply([E("x", T.FILE)])
    other = Ext4Builder(tmp_path / "o.img", 64 << 30, FS_UUID)  # the process-wide capture is free again
    other.mkfs()
    assert other.apply([E("y", T.FILE, size=1)]).file_extents
