"""The builder keeps the filesystem open from one layer to the next (C path): every layer must
come out exactly as when the image is closed after each layer and opened again for the next
(what `close()` between applies forces, and what the ctypes path always does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from obdconv.entries import EntryType, LayerEntry
from obdconv.errors import BadInputError, ObdconvError
from obdconv.ext4 import Ext4Builder, LayerMetadata, fast
from tests.ext4.helpers import FS_UUID, fsck
from tests.ext4.test_fast import assert_same, assert_same_image, edge_layers

E, T = LayerEntry, EntryType
needs_fast = pytest.mark.skipif(fast.FAST is None, reason="C fast path not built (pip install -e . with libext2fs-dev)")


def build(image: Path, layers: list[list[LayerEntry]], *, reopen: bool) -> list[LayerMetadata]:
    with Ext4Builder(image, 1 << 30, FS_UUID) as b:
        b.mkfs()
        out = []
        for entries in layers:
            out.append(b.apply(entries))
            if reopen:
                b.close()
                assert not b._fs
            else:
                assert bool(b._fs) == (fast.FAST is not None), "the C path keeps the filesystem open"
    assert not b._fs, "leaving the with-block closes it"
    return out


@needs_fast
def test_kept_open_layers_equal_reopened_layers(tmp_path: Path) -> None:
    layers = edge_layers()
    kept = build(tmp_path / "kept.img", layers, reopen=False)
    reopened = build(tmp_path / "reopened.img", layers, reopen=True)
    assert_same(kept, reopened)
    assert fsck(tmp_path / "kept.img").returncode == 0
    assert_same_image(tmp_path / "kept.img", tmp_path / "reopened.img")


@needs_fast
def test_image_file_holds_each_layer_while_kept_open(tmp_path: Path) -> None:
    """After each apply the file itself is a consistent filesystem (nothing left in a cache)."""
    image = tmp_path / "m.img"
    with Ext4Builder(image, 1 << 30, FS_UUID) as b:
        b.mkfs()
        for k, entries in enumerate(edge_layers()):
            b.apply(entries)
            assert b._fs, "kept open"
            result = fsck(image)
            assert result.returncode == 0, f"after layer {k}: {result.stdout}{result.stderr}"


def test_failure_while_kept_open_frees_the_handle_and_mkfs_starts_over(tmp_path: Path) -> None:
    b = Ext4Builder(tmp_path / "m.img", 1 << 30, FS_UUID)
    b.mkfs()
    b.apply([E("f", T.FILE, size=1)])
    with pytest.raises(BadInputError):
        b.apply([E("f/x", T.FILE)])  # parent is a file: found while applying
    assert not b._fs
    with pytest.raises(ObdconvError, match="unusable"):
        b.apply([E("g", T.FILE)])
    b.mkfs()
    meta = b.apply([E("g", T.FILE, size=5)])
    assert [index for index, _ in meta.file_extents] == [0]
    b.close()
    b.close()  # twice is fine
    assert fsck(tmp_path / "m.img").returncode == 0
