"""`regular_file_data`: the blocks `load_parents` leaves out must be exactly live regular files'
data (checked against e2fsprogs' debugfs), and leaving them out must not change what the next
layers' metadata pass produces."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from obdconv.entries import EntryType as T
from obdconv.entries import LayerEntry as E
from obdconv.ext4 import Ext4Builder
from obdconv.ext4.filedata import regular_file_data, subtract
from obdconv.ext4.mkfs import data_blocks
from obdconv.ext4.reader import tree_from_ext4
from tests.ext4.helpers import FS_UUID, Layer, assemble, file_bytes_entries
from tests.ext4.test_builder import RawDevice
from tests.ext4.test_fast import assert_same, edge_layers

BLOCK = 4096
VSIZE = 64 << 30
needs_debugfs = pytest.mark.skipif(shutil.which("debugfs") is None, reason="debugfs (e2fsprogs) not installed")


def _debugfs_file_blocks(image: Path, paths: list[str]) -> set[int]:
    """Data blocks of `paths` per debugfs's extent dump (leaf entries only)."""
    script = "".join(f'ex "/{p}"\n' for p in paths)
    out = subprocess.run(["debugfs", "-f", "-", str(image)], input=script, capture_output=True, text=True,
                         check=True).stdout
    blocks: set[int] = set()
    for line in out.splitlines():
        parts = line.split()
        # "Level Entries Logical Physical Length Flags" rows: "2/ 2   1/ 84   0 -   3  10241 -  10244   4"
        if len(parts) < 8 or "/" not in parts[0] or not parts[0].rstrip("/").isdigit():
            continue
        level, depth = int(parts[0].rstrip("/")), int(parts[1])
        if level != depth:
            continue  # an index entry: that block is metadata
        phys = line.split(None)[7:]
        first = int(phys[0])
        last = int(phys[2]) if len(phys) > 2 and phys[1] == "-" else first
        blocks.update(range(first, last + 1))
    return blocks


def _walk_blocks(image: Path) -> set[int]:
    ranges = regular_file_data(RawDevice(image))
    assert ranges is not None, "the walk gave up on an image it should understand"
    return {b for off, n in ranges for b in range(off // BLOCK, (off + n) // BLOCK)}


@needs_debugfs
@pytest.mark.parametrize("count", [1, 3])
def test_file_data_is_what_debugfs_lists(tmp_path: Path, count: int) -> None:
    image = tmp_path / "m.img"
    b = Ext4Builder(image, VSIZE, FS_UUID)
    b.mkfs()
    for entries in edge_layers()[:count]:
        b.apply(entries)
    b.close()
    tree = tree_from_ext4(image)
    files = sorted(p for p, e in tree.items() if e.kind == "file")
    expected = _debugfs_file_blocks(image, files)
    assert expected, "the stack has file data"
    if count == 1:
        # the 600 MiB file's tree is deeper than its inode: index blocks exist and are not data
        assert len(expected) > (600 << 20) // BLOCK
    assert _walk_blocks(image) == expected


def _parents_and_top() -> tuple[list[Layer], Layer]:
    one, d1 = file_bytes_entries([
        E("etc", T.DIR), E("etc/conf", T.FILE), E("bin", T.DIR), E("bin/tool", T.FILE), E("big", T.FILE),
        E("lnk", T.SYMLINK, link_target="x" * 200), E("hard", T.HARDLINK, link_target="bin/tool"),
    ], {"etc/conf": b"c" * 10, "bin/tool": b"t" * 70_000, "big": b"B" * (3 << 20)})
    two, d2 = file_bytes_entries([E("etc/conf", T.FILE), E("bin/tool", T.WHITEOUT), E("data", T.FILE)],
                                 {"etc/conf": b"new" * 5000, "data": b"D" * 500_000})
    top, d3 = file_bytes_entries([E("big", T.WHITEOUT), E("etc/added", T.FILE), E("data", T.FILE)],
                                 {"etc/added": b"a" * 9000, "data": b"d" * 20_000})
    return [Layer(one, d1), Layer(two, d2)], Layer(top, d3)


def _resume(tmp_path: Path, name: str, device: Path, top: Layer) -> tuple[Path, list]:
    b = Ext4Builder(tmp_path / name, VSIZE, FS_UUID)
    b.load_parents(RawDevice(device))
    meta = b.apply(top.entries)
    b.close()
    return tmp_path / name, [meta]


def test_parents_without_file_data_give_the_same_next_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parents, top = _parents_and_top()
    b = Ext4Builder(tmp_path / "own.img", VSIZE, FS_UUID)
    b.mkfs()
    for layer in parents:
        layer.meta = b.apply(layer.entries)
    b.close()
    assemble(tmp_path / "dev.img", parents, VSIZE)  # the converted parents: metadata AND file bytes
    skipped = regular_file_data(RawDevice(tmp_path / "dev.img"))
    assert skipped and sum(n for _, n in skipped) >= (3 << 20) + 500_000
    lean, lean_meta = _resume(tmp_path, "lean.img", tmp_path / "dev.img", top)
    # none of the parents' file bytes reached the scratch image
    copied = data_blocks(lean)
    assert not any(off // BLOCK <= blk < (off + n) // BLOCK for off, n in skipped for blk in copied)
    monkeypatch.setattr("obdconv.ext4.builder.regular_file_data", lambda device: None)  # copy everything
    full, full_meta = _resume(tmp_path, "full.img", tmp_path / "dev.img", top)
    assert any(off // BLOCK <= blk < (off + n) // BLOCK for off, n in skipped for blk in data_blocks(full))
    assert_same(lean_meta, full_meta)


def test_layouts_it_does_not_parse_are_copied_whole(tmp_path: Path) -> None:
    image = tmp_path / "metabg.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "meta_bg,^resize_inode", str(image)], check=True)
    assert regular_file_data(RawDevice(image)) is None
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(os.urandom(1 << 20))
    assert regular_file_data(RawDevice(garbage)) is None


@needs_debugfs
def test_reference_converted_parents_skip_exactly_their_file_data(fixtures_dir: Path, tmp_path: Path) -> None:
    """A layer made by the reference tools (other features: resize_inode, sparse_super2)."""
    blob = pytest.importorskip("obdconv.formats.blob")
    lsmt = pytest.importorskip("obdconv.formats.lsmt")
    ref = fixtures_dir / "overlaybd" / "reference-layer" / "overlaybd.commit.zfile.tar"
    with open(ref, "rb") as f:
        stack = lsmt.LSMTStack([blob.open_layer_blob(f)])
        ranges = regular_file_data(stack)
        stack.flatten_to(tmp_path / "flat.img")
    assert ranges is not None
    walked = {b for off, n in ranges for b in range(off // BLOCK, (off + n) // BLOCK)}
    tree = tree_from_ext4(tmp_path / "flat.img")
    expected = _debugfs_file_blocks(tmp_path / "flat.img", sorted(p for p, e in tree.items() if e.kind == "file"))
    assert len(expected) >= 4  # dir/sub/random.bin alone is 12345 bytes
    assert walked == expected


def test_subtract_leaves_exactly_the_rest() -> None:
    pieces: list[tuple[int, int]] = []
    subtract([(0, 100), (200, 50), (300, 10)], [(10, 20), (40, 5), (90, 130), (305, 100)],
             lambda o, n: pieces.append((o, n)))
    assert pieces == [(0, 10), (30, 10), (45, 45), (220, 30), (300, 5)]
    pieces.clear()
    subtract([(0, 10)], [], lambda o, n: pieces.append((o, n)))
    assert pieces == [(0, 10)]
