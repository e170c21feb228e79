"""The C fast path (obdconv/ext4/_fastapply) against the ctypes path: the same bytes, layer by layer.

The ctypes path is the reference here (the engine's original implementation, kept as the
fallback); both are run in this process on the same entry lists and their LayerMetadata compared.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import uuid
from pathlib import Path

import pytest

from obdconv.entries import EntryType, LayerEntry
from obdconv.errors import BadInputError
from obdconv.ext4 import Ext4Builder, LayerMetadata, fast
from obdconv.ext4.mkfs import FAKE_TIME, data_blocks
from tests.ext4.helpers import FS_UUID, Layer, assemble, fsck, scan, write_tar
from tests.ext4.test_stack import layer_members

E, T = LayerEntry, EntryType
NS = 1_000_000_000
needs_fast = pytest.mark.skipif(fast.FAST is None, reason="C fast path not built (pip install -e . with libext2fs-dev)")


def build_with(path: str, image: Path, layers: list[list[LayerEntry]], vsize: int = 64 << 30) -> list[LayerMetadata]:
    """Every layer's metadata, built with the "C" or the "ctypes" path."""
    saved = fast.FAST
    if path == "ctypes":
        fast.FAST = None  # read when the builder's state is made: this builder uses ctypes throughout
    try:
        b = Ext4Builder(image, vsize, FS_UUID)
        b.mkfs()
        return [b.apply(entries) for entries in layers]
    finally:
        fast.FAST = saved


def edge_layers() -> list[list[LayerEntry]]:
    """Many plain files (the fast path) mixed with everything that is not: dirs made implicitly
    and explicitly, directory blocks filling up, xattrs, symlinks, hard links, devices, times at
    and beyond the C int64 range, high uids, huge files (extent trees deeper than the inode),
    replacements, duplicates, whiteouts and an opaque directory in the later layers."""
    rnd = random.Random(5)
    one: list[LayerEntry] = [E("usr", T.DIR, 0o755, mtime_ns=1_600_000_000 * NS)]
    for d in range(30):
        one.append(E(f"usr/d{d:02d}", T.DIR, 0o750, uid=1000 + d, mtime_ns=-5 * NS + d))
        for f in range(rnd.randrange(1, 250)):
            one.append(E(f"usr/d{d:02d}/{'long-' * rnd.randrange(0, 40)}{f}", T.FILE, rnd.choice([0o644, 0o4755]),
                         uid=rnd.choice([0, 100_000, (1 << 32) - 1]), gid=rnd.choice([0, 70_000]),
                         mtime_ns=rnd.randrange(-(1 << 40), 1 << 62), size=rnd.choice([0, 1, 4096, 4097, 70_000])))
    one += [
        E("implicit/parents/file", T.FILE, size=10),
        E("times/min", T.FILE, mtime_ns=-(1 << 63)), E("times/max", T.FILE, mtime_ns=(1 << 63) - 1),
        E("times/below", T.FILE, mtime_ns=-(1 << 63) - 1), E("times/above", T.FILE, mtime_ns=1 << 63),
        E("times/clamp-low", T.FILE, mtime_ns=(-(1 << 31) - 1) * NS),
        E("times/clamp-high", T.FILE, mtime_ns=(1 << 34) * NS), E("times/neg-ns", T.FILE, mtime_ns=-1),
        E("times/dir-far", T.DIR, mtime_ns=1 << 64),
        E("huge", T.FILE, size=600 << 20),  # > 4 extents of 32768 blocks: a depth-1 tree
        E("attr", T.FILE, size=5, xattrs=[("user.a", b"1"), ("security.capability", bytes(20))]),
        E("usr/d00/target", T.FILE, size=3), E("link", T.SYMLINK, link_target="usr/d00/target"),
        E("slow", T.SYMLINK, link_target="x/" * 60), E("hard", T.HARDLINK, link_target="usr/d00/target"), E("dev", T.CHAR, 0o600, devmajor=1, devminor=3),
        E("dup", T.FILE, size=1), E("dup", T.FILE, size=9000),
        E("usr/d02", T.DIR, 0o700, mtime_ns=FAKE_TIME * NS),  # merge, later in the same layer
    ]
    two = [
        E("usr/d03", T.WHITEOUT), E("usr/d04", T.FILE, size=3), E("huge", T.WHITEOUT),
        E("usr/d05/new", T.FILE, size=12_345), E("usr/d06/.wh..wh..opq", T.OPAQUE),
        E("usr/d06", T.OPAQUE), E("usr/d06/kept", T.FILE, size=1),
        E("times/min", T.FILE, size=77), E("usr/d07/x", T.DIR), E("usr/d07/x/y", T.FILE, size=5),
    ] + [E(f"usr/d08/more-{i}", T.FILE, size=i * 100) for i in range(300)]
    three = [E(f"fresh/{i}", T.FILE, size=4096 * i) for i in range(50)] + [E("usr/d08", T.WHITEOUT)]
    return [one, two, three]


def assert_same(c: list[LayerMetadata], py: list[LayerMetadata]) -> None:
    assert len(c) == len(py)
    for k, (a, b) in enumerate(zip(c, py, strict=True)):
        assert [n for n, _ in a.blocks] == [n for n, _ in b.blocks], f"layer {k}: segment block numbers differ"
        for (n, x), (_, y) in zip(a.blocks, b.blocks, strict=True):
            assert x == y, f"layer {k}: block {n} differs"
        assert a.file_extents == b.file_extents, f"layer {k}: file extents differ"
        assert a.to_bytes() == b.to_bytes()


def assert_same_image(a: Path, b: Path) -> None:
    """Two metadata images write the same blocks with the same bytes (the rest are holes in both)."""
    written = data_blocks(a)
    assert written == data_blocks(b)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for n in written:
            assert os.pread(fa.fileno(), 4096, n * 4096) == os.pread(fb.fileno(), 4096, n * 4096), f"block {n}"


@needs_fast
def test_edge_stack_same_bytes_both_paths(tmp_path: Path) -> None:
    layers = edge_layers()
    c = build_with("C", tmp_path / "c.img", layers)
    py = build_with("ctypes", tmp_path / "py.img", layers)
    assert_same(c, py)
    assert any(len(exts) > 4 for _, exts in c[0].file_extents), "the huge file should need a deeper extent tree"
    assert fsck(tmp_path / "c.img").returncode == 0
    assert_same_image(tmp_path / "c.img", tmp_path / "py.img")  # the whole images too


@needs_fast
def test_tar_stack_same_bytes_both_paths(tmp_path: Path) -> None:
    """The kernel-checked stack of test_stack.py (big directory, ACLs, links, replacements)."""
    tars = [write_tar(tmp_path / f"l{i}.tar", m) for i, m in enumerate(layer_members())]
    scanned = [scan(t) for t in tars]
    entries = [e for e, _ in scanned]
    c = build_with("C", tmp_path / "c.img", entries, vsize=1 << 30)
    py = build_with("ctypes", tmp_path / "py.img", entries, vsize=1 << 30)
    assert_same(c, py)
    device = tmp_path / "device.img"
    assemble(device, [Layer(e, d, m) for (e, d), m in zip(scanned, c, strict=True)], vsize=1 << 30)
    result = fsck(device)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_fast
def test_fast_path_is_used_and_errors_name_the_entry(tmp_path: Path) -> None:
    b = Ext4Builder(tmp_path / "m.img", 64 << 20, uuid.UUID(int=9))  # small: runs out of space
    assert b._dirs.fast is fast.FAST
    b.mkfs()
    with pytest.raises(BadInputError, match=r"entry 2 'd/big'.*ext2fs_fallocate"):
        b.apply([E("d", T.DIR), E("d/ok", T.FILE, size=10), E("d/big", T.FILE, size=1 << 30)])


def test_missing_extension_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "obdconv.ext4._fastapply", None)  # import now raises ImportError
    monkeypatch.delenv("OBDCONV_EXT4_NO_FAST", raising=False)
    with caplog.at_level(logging.WARNING, logger="obdconv.ext4.fast"):
        assert fast._load() is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "ctypes" in caplog.records[0].getMessage()


def test_env_forces_ctypes_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OBDCONV_EXT4_NO_FAST", "1")
    assert fast._load() is None


def test_non_ascii_name_over_255_bytes_rejected(tmp_path: Path) -> None:
    b = Ext4Builder(tmp_path / "m.img", 64 << 20, FS_UUID)
    b.mkfs()
    name = "\u00e9" * 200  # 200 characters, 400 bytes in UTF-8
    with pytest.raises(BadInputError, match="longer than 255 bytes"):
        b.apply([E(f"d/{name}", T.FILE, size=1)])


@needs_fast
def test_full_inode_groups_same_bytes_both_paths(tmp_path: Path) -> None:
    """Inode allocation once whole block groups are full (the C path skips full groups, the
    ctypes path lets ext2fs_new_inode scan them): 20k files fill groups 0-1 (8192 inodes each);
    the next layer frees inodes in a full group (whiteout) and adds files under directories
    whose groups are full, which must reuse the freed inodes exactly as ext2fs_new_inode does.
    The last layer does the same with blocks (the C path's fallocate goal hint)."""
    one = [E(f"d{d}", T.DIR) for d in range(4)]
    one += [E(f"d{i % 4}/f{i}", T.FILE, size=i % 3 * 5000) for i in range(20_000)]
    two = [E("d1", T.WHITEOUT)] + [E(f"d{d}/new{i}", T.FILE, size=1) for d in (0, 2, 3) for i in range(3000)]
    three = [E(f"d0/sub{i}", T.DIR) for i in range(20)] + [E(f"d0/sub{i}/x", T.FILE) for i in range(20)]
    # Blocks freed between new files of one layer (replaced files, a whiteout): later files must
    # reuse those holes (the C path's allocation hint is dropped when blocks are freed).
    four = [E(f"e/f{i}", T.FILE, size=3 * 4096) for i in range(600)]
    four += [E(f"e/f{i}", T.FILE, size=4096) for i in range(0, 600, 3)] + [E("d2", T.WHITEOUT)]
    four += [E(f"e/g{i}", T.FILE, size=(i % 4) * 4096) for i in range(2000)]
    layers = [one, two, three, four]
    c = build_with("C", tmp_path / "c.img", layers, vsize=1 << 30)
    py = build_with("ctypes", tmp_path / "py.img", layers, vsize=1 << 30)
    assert_same(c, py)
    assert fsck(tmp_path / "c.img").returncode == 0
