"""The reader and load_parents on real overlaybd layers made by the reference tools (shared fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from obdconv.entries import EntryType, LayerEntry
from obdconv.ext4 import Ext4Builder
from obdconv.ext4.reader import tree_from_ext4
from obdconv.oci.tree import tree_from_tar_layers
from obdconv.tree import diff_trees
from tests.ext4.helpers import FS_UUID, Layer, assemble, file_bytes_entries

lsmt = pytest.importorskip("obdconv.formats.lsmt")
blob = pytest.importorskip("obdconv.formats.blob")


@pytest.fixture(scope="module")
def reference_stack(fixtures_dir: Path):
    ref = fixtures_dir / "overlaybd" / "reference-layer"
    f = open(ref / "overlaybd.commit.zfile.tar", "rb")  # kept open: the stack reads lazily
    try:
        yield ref, lsmt.LSMTStack([blob.open_layer_blob(f)])
    finally:
        f.close()


def test_reader_reads_reference_converted_layer(reference_stack, tmp_path: Path) -> None:
    ref, stack = reference_stack
    stack.flatten_to(tmp_path / "flat.img")
    actual = tree_from_ext4(tmp_path / "flat.img")
    expected = tree_from_tar_layers([ref / "layer.tar"])
    assert diff_trees(expected, actual) == []
    assert actual["dir/sub/random.bin"].size == 12345 and actual["dir/sub/uplink"].link_target == "../readme.txt"


def test_load_parents_continues_a_reference_converted_image(reference_stack, tmp_path: Path) -> None:
    ref, stack = reference_stack
    b = Ext4Builder(tmp_path / "meta.img", stack.virtual_size, FS_UUID)
    b.load_parents(stack)
    entries, data = file_bytes_entries([
        LayerEntry("dir/new.txt", EntryType.FILE, 0o640, uid=7, gid=8, mtime_ns=1_000_000_000_500),
        LayerEntry("dir/hello.txt", EntryType.WHITEOUT),
        LayerEntry("dir/sub", EntryType.OPAQUE),
        LayerEntry("dir/sub/only", EntryType.FILE),
    ], {"dir/new.txt": b"on top of the reference", "dir/sub/only": b"x" * 9000})
    layer = Layer(entries, data, b.apply(entries))
    stack.flatten_to(tmp_path / "dev.img")
    assemble_onto(tmp_path / "dev.img", layer)
    tree = tree_from_ext4(tmp_path / "dev.img")
    base = tree_from_tar_layers([ref / "layer.tar"])
    assert "dir/hello.txt" not in tree and tree["dir/hardlink.txt"].nlink == 1
    assert sorted(p for p in tree if p.startswith("dir/sub/")) == ["dir/sub/only"]
    assert tree["dir/new.txt"].size == 23 and (tree["dir/new.txt"].uid, tree["dir/new.txt"].gid) == (7, 8)
    assert tree["dir/sub/only"].size == 9000
    for path in ("readme.txt", "dir/run.sh", "dir/symlink", "emptydir", "dir/empty"):  # untouched lower content is intact
        assert diff_trees({path: base[path]}, {path: tree[path]}) == []


def assemble_onto(device: Path, layer: Layer) -> None:
    """assemble() without truncating: the layer goes on top of an existing flattened image."""
    import os

    size = os.path.getsize(device)
    tmp = device.with_suffix(".layer")
    assemble(tmp, [layer], size)
    with open(tmp, "rb") as src, open(device, "r+b") as dst:
        fd = src.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            os.pwrite(dst.fileno(), os.pread(fd, stop - start, start), start)
            pos = stop
    tmp.unlink()
