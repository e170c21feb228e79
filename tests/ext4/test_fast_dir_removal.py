"""A directory removed in the middle of a layer, then paths under it again: the C fast path must
not resolve them to the removed directory's freed inode (it held a stale path -> inode cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

from obdconv.entries import EntryType, LayerEntry
from obdconv.errors import BadInputError
from obdconv.ext4 import fast
from obdconv.ext4.reader import tree_from_ext4
from tests.ext4.helpers import fsck
from tests.ext4.test_fast import assert_same, build_with

E, T = LayerEntry, EntryType
needs_fast = pytest.mark.skipif(fast.FAST is None, reason="C fast path not built (pip install -e . with libext2fs-dev)")


@needs_fast
def test_files_under_a_directory_whited_out_earlier_in_the_layer(tmp_path: Path) -> None:
    layer = [E("a", T.DIR), E("a/b", T.DIR), E("a/b/x", T.FILE, size=1), E("a", T.WHITEOUT),
             E("a/b/y", T.FILE, size=5), E("a/b/z", T.FILE, size=0)]
    c = build_with("C", tmp_path / "c.img", [layer], vsize=1 << 30)
    py = build_with("ctypes", tmp_path / "py.img", [layer], vsize=1 << 30)
    assert_same(c, py)
    assert fsck(tmp_path / "c.img").returncode == 0
    tree = tree_from_ext4(tmp_path / "c.img")
    assert {p for p in tree if p.startswith("a")} == {"a", "a/b", "a/b/y", "a/b/z"}  # a, a/b made again (0755)


@needs_fast
@pytest.mark.parametrize("path", ["C", "ctypes"])
def test_file_under_a_directory_replaced_by_a_file_is_rejected(tmp_path: Path, path: str) -> None:
    layer = [E("a", T.DIR), E("a/x", T.FILE), E("a", T.FILE, size=3), E("a/y", T.FILE)]
    with pytest.raises(BadInputError, match="'a' is not a directory"):
        build_with(path, tmp_path / "m.img", [layer], vsize=1 << 30)
