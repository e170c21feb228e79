"""Builder behaviour: mkfs, determinism, wire form, errors, load_parents, big directories, huge files."""

from __future__ import annotations

import os
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from obdconv.entries import EntryType, LayerEntry
from obdconv.errors import BadInputError, FormatError, ObdconvError, UnsafePathError, UnsupportedError
from obdconv.ext4 import Ext4Builder, Extent, LayerMetadata
from obdconv.ext4.mkfs import FAKE_TIME, data_blocks
from obdconv.ext4.reader import tree_from_ext4
from tests.ext4.helpers import FS_UUID, VSIZE, Layer, assemble, build, file_bytes_entries, fsck

E, T = LayerEntry, EntryType


def sample_layers() -> list[Layer]:
    one, d1 = file_bytes_entries([
        E("a", T.DIR, 0o755), E("a/f", T.FILE), E("a/g", T.FILE, xattrs=[("user.big", b"q" * 3000)]),
        E("b/c/d", T.FILE), E("s", T.SYMLINK, link_target="a/f"), E("h", T.HARDLINK, link_target="a/f"),
    ], {"a/f": b"f" * 5000, "a/g": b"g" * 10, "b/c/d": os.urandom(0) + b"d" * 70000})
    two, d2 = file_bytes_entries([
        E("a/g", T.WHITEOUT), E("n", T.FILE), E("b", T.FILE), E("a/f", T.FILE),
    ], {"n": b"n" * 20000, "b": b"b" * 9000, "a/f": b"new"})
    return [Layer(one, d1), Layer(two, d2)]


def test_mkfs_is_deterministic_and_clean(tmp_path: Path) -> None:
    images = []
    for name in ("one.img", "two.img"):
        b = Ext4Builder(tmp_path / name, 64 << 30, FS_UUID)
        b.mkfs()
        images.append(tmp_path / name)
    # Same allocated blocks with the same bytes (cmp would read all 64 GiB of holes).
    blocks = [data_blocks(p) for p in images]
    assert blocks[0] == blocks[1] and len(blocks[0]) > 50
    contents = [[os.pread(fd, 4096, n * 4096) for n in blocks[0]]
                for fd in (os.open(p, os.O_RDONLY) for p in images)]
    assert contents[0] == contents[1]
    assert fsck(images[0]).returncode == 0
    dump = subprocess.run(["dumpe2fs", "-h", str(images[0])], capture_output=True, text=True).stdout
    features = next(line for line in dump.splitlines() if line.startswith("Filesystem features"))
    for wanted in ("extent", "64bit", "flex_bg", "uninit_bg", "ext_attr", "dir_index", "huge_file"):
        assert wanted in features.split()
    for unwanted in ("has_journal", "resize_inode", "orphan_file", "metadata_csum"):
        assert unwanted not in features.split()
    assert str(FS_UUID) in dump
    groups = subprocess.run(["dumpe2fs", str(images[0])], capture_output=True, text=True).stdout
    group_lines = [line for line in groups.splitlines() if line.startswith("Group ") and "Blocks" in line]
    assert len(group_lines) == 512 and all("ITABLE_ZEROED" in line for line in group_lines)
    stat = subprocess.run(["debugfs", "-R", "stat lost+found", str(images[0])], capture_output=True, text=True).stdout
    flags = int(stat.split("Flags: ")[1].split()[0], 16)
    assert not flags & 0x1000  # no EXT2_INDEX_FL on lost+found (the reference mkfs's defect)
    # sparse: 64 GiB of which well under 1 MiB is allocated
    assert os.stat(images[0]).st_blocks * 512 < 1 << 20
    # a small layer on the 64 GiB filesystem touches a few hundred blocks, not every group
    b = Ext4Builder(images[0], 64 << 30, FS_UUID)
    b.mkfs()
    mkfs_blocks = set(data_blocks(images[0]))
    first = b.apply([E("x", T.FILE)])
    second = b.apply([E("y", T.FILE)])
    assert {n for n, _ in first.blocks} >= mkfs_blocks and len(first.blocks) < 250
    assert len(second.blocks) < 64


def test_same_input_gives_same_bytes(tmp_path: Path) -> None:
    runs = []
    for name in ("x", "y"):
        layers = sample_layers()
        build(tmp_path / f"{name}.img", layers)
        runs.append([layer.meta.to_bytes() for layer in layers if layer.meta])
    assert runs[0] == runs[1]
    # No wall clock: the superblock's write time is the fixed fake time (byte-identical next second too).
    first = LayerMetadata.from_bytes(runs[0][1]).blocks[0]
    assert first[0] == 0 and struct.unpack_from("<I", first[1], 1024 + 0x30)[0] == FAKE_TIME
    other = sample_layers()
    other[1].entries[1].mtime_ns += 1
    build(tmp_path / "z.img", other)
    assert other[1].meta is not None and other[1].meta.to_bytes() != runs[0][1]


def test_layer_metadata_roundtrip() -> None:
    meta = LayerMetadata([(0, b"\1" * 4096), (7, os.urandom(4096))],
                         [(3, [Extent(0, 100, 5), Extent(5, 900, 1)]), (4, [])])
    data = meta.to_bytes()
    assert LayerMetadata.from_bytes(data) == meta
    assert len(LayerMetadata([(i, bytes(4096)) for i in range(100)], []).to_bytes()) < 2000
    with pytest.raises(FormatError):
        LayerMetadata.from_bytes(b"nope" + data[4:])
    with pytest.raises(FormatError):
        LayerMetadata.from_bytes(data[:-5])


def test_stack_from_code_entries_is_consistent(tmp_path: Path) -> None:
    layers = sample_layers()
    build(tmp_path / "meta.img", layers)
    assemble(tmp_path / "dev.img", layers)
    assert fsck(tmp_path / "dev.img").returncode == 0
    tree = tree_from_ext4(tmp_path / "dev.img")
    assert set(tree) == {"a", "a/f", "b", "h", "n", "s"}
    assert tree["h"].size == 5000 and tree["h"].nlink == 1 and tree["a/f"].size == 3
    assert tree["b"].kind == "file" and tree["b"].size == 9000


def test_static_errors_leave_builder_unchanged(tmp_path: Path) -> None:
    b = Ext4Builder(tmp_path / "m.img", VSIZE, FS_UUID)
    b.mkfs()
    bad = [
        [E("ok", T.FILE), E("../x", T.FILE)],
        [E("/abs", T.FILE)],
        [E("ok", T.FILE), E("l", T.SYMLINK, link_target="")],
        [E("d", T.CHAR, devmajor=5000)],
        [E("u", T.FILE, uid=1 << 32)],
        [E("x", T.FILE, xattrs=[("user.huge", b"h" * 5000)])],
    ]
    for entries in bad:
        with pytest.raises(BadInputError) as err:
            b.apply(entries)
        assert repr(entries[-1].path) in str(err.value)
    meta = b.apply([E("fine", T.FILE)])  # still usable, and got mkfs's blocks (nothing consumed them)
    assert meta.blocks[0][0] == 0 and len(meta.blocks) > 10


@pytest.mark.parametrize("entries, error, needle", [
    ([E("l", T.SYMLINK, link_target="/etc"), E("l/x", T.FILE)], UnsafePathError, "'l/x'"),
    ([E("h", T.HARDLINK, link_target="missing")], BadInputError, "'h'"),
    ([E("f", T.FILE), E("f/x", T.FILE)], BadInputError, "'f/x'"),
    ([E("d", T.DIR), E("h", T.HARDLINK, link_target="d")], BadInputError, "directory"),
])
def test_fs_errors_name_entry_and_make_builder_unusable(tmp_path: Path, entries: list[LayerEntry],
                                                        error: type, needle: str) -> None:
    b = Ext4Builder(tmp_path / "m.img", VSIZE, FS_UUID)
    b.mkfs()
    b.apply([E("base", T.DIR)])
    with pytest.raises(error) as err:
        b.apply(entries)
    assert needle in str(err.value)
    with pytest.raises(ObdconvError, match="unusable"):
        b.apply([E("more", T.FILE)])
    b.mkfs()  # starts again
    assert b.apply([E("more", T.FILE)]).blocks


class RawDevice:
    """Tiny stand-in for formats.lsmt.LSMTStack over a raw sparse file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.virtual_size = os.path.getsize(path)

    def pread(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), length, offset)

    def extents(self):
        fd = os.open(self.path, os.O_RDONLY)
        try:
            pos = 0
            while pos < self.virtual_size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    return
                stop = os.lseek(fd, start, os.SEEK_HOLE)
                yield start, stop - start
                pos = stop
        finally:
            os.close(fd)


def test_load_parents_equals_continuing(tmp_path: Path) -> None:
    third, d3 = file_bytes_entries([
        E("a", T.OPAQUE), E("a/z", T.FILE), E("n", T.WHITEOUT), E("big", T.FILE), E("h2", T.HARDLINK, link_target="h"),
    ], {"a/z": b"z" * 100, "big": b"B" * 300_000})
    own = [*sample_layers(), Layer(third, d3)]
    build(tmp_path / "own.img", own)
    parents = sample_layers()
    build(tmp_path / "p.img", parents)
    assemble(tmp_path / "parents.dev", parents)  # what the converted parents' LSMT stack reads as
    b = Ext4Builder(tmp_path / "resumed.img", VSIZE, FS_UUID)
    b.load_parents(RawDevice(tmp_path / "parents.dev"))
    resumed = b.apply(third)
    assert own[2].meta is not None
    assert resumed.file_extents == own[2].meta.file_extents
    assert resumed.blocks == own[2].meta.blocks


def test_big_directory_is_linear_time(tmp_path: Path) -> None:
    def run(n: int) -> float:
        b = Ext4Builder(tmp_path / f"d{n}.img", VSIZE, FS_UUID)
        b.mkfs()
        entries = [E("d", T.DIR)] + [E(f"d/file-with-a-longish-name-{i:06d}", T.FILE) for i in range(n)]
        t = time.perf_counter()
        b.apply(entries)
        return time.perf_counter() - t

    small, large = run(3000), run(30000)
    assert large < small * 10 * 2.5, (small, large)  # ~linear; quadratic would be ~100x
    assert fsck(tmp_path / "d30000.img").returncode == 0
    tree = tree_from_ext4(tmp_path / "d30000.img")
    assert len(tree) == 30001


def test_huge_file_gets_multi_level_extent_tree(tmp_path: Path) -> None:
    b = Ext4Builder(tmp_path / "h.img", 64 << 30, uuid.UUID(int=5))
    b.mkfs()
    size = 9 << 30  # > 8 GiB: more extents than fit in the inode
    meta = b.apply([E("huge", T.FILE, size=size), E("after", T.FILE, size=1)])
    (idx, extents), (idx2, ext2) = meta.file_extents
    assert (idx, idx2) == (0, 1)
    assert sum(e.length for e in extents) == size // 4096 and len(extents) > 4
    assert [e.lblk for e in extents] == sorted(e.lblk for e in extents)
    owned = {(e.pblk, e.length) for e in extents + ext2}
    assert len(owned) == len(extents) + len(ext2)
    assert fsck(tmp_path / "h.img").returncode == 0
    stat = subprocess.run(["debugfs", "-R", "stat huge", str(tmp_path / "h.img")], capture_output=True, text=True)
    assert f"Size: {size}" in stat.stdout


@pytest.mark.slow
def test_huge_directories(tmp_path: Path) -> None:
    """100k files in one directory and 66k subdirectories of another (dir_nlink), e2fsck clean."""
    b = Ext4Builder(tmp_path / "big.img", 4 << 30, FS_UUID)
    b.mkfs()
    entries = [E("files", T.DIR)] + [E(f"files/f{i:06d}", T.FILE) for i in range(100_000)]
    entries += [E("dirs", T.DIR)] + [E(f"dirs/d{i:05d}", T.DIR) for i in range(66_000)]
    b.apply(entries)
    b.apply([E("dirs/d00001", T.WHITEOUT), E("files/f000001", T.WHITEOUT), E("files/new", T.FILE)])
    result = fsck(tmp_path / "big.img")
    assert result.returncode == 0, result.stdout[-2000:]
    tree = tree_from_ext4(tmp_path / "big.img")
    assert len(tree) == 2 + 100_000 + 66_000 - 2 + 1


def test_opaque_root_keeps_this_layer_and_lost_found(tmp_path: Path) -> None:
    layers = [Layer(*file_bytes_entries([E("old/x", T.FILE), E("keep", T.DIR)], {"old/x": b"x"})),
              Layer(*file_bytes_entries([E("keep/new", T.FILE), E(".", T.OPAQUE), E(".", T.DIR, 0o700)],
                                        {"keep/new": b"n"}))]
    build(tmp_path / "m.img", layers)
    assemble(tmp_path / "d.img", layers)
    assert fsck(tmp_path / "d.img").returncode == 0
    assert set(tree_from_ext4(tmp_path / "d.img")) == {"keep", "keep/new"}
    stat = subprocess.run(["debugfs", "-R", "stat /", str(tmp_path / "d.img")], capture_output=True, text=True).stdout
    assert "Mode:  0700" in stat


def test_parents_with_metadata_csum_stay_consistent(tmp_path: Path) -> None:
    """Parents made by another mkfs (metadata_csum: checksummed directory blocks) can be continued."""
    parent = tmp_path / "csum.img"
    with open(parent, "wb") as f:
        f.truncate(VSIZE)
    env = {"PATH": os.environ["PATH"], "MKE2FS_CONFIG": "/dev/null"}
    b = Ext4Builder(tmp_path / "m.img", VSIZE, FS_UUID)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", str(parent)], check=True, capture_output=True, env=env)
    b.load_parents(RawDevice(parent))  # without the extent feature: refused, nothing written
    with pytest.raises(UnsupportedError, match="extent"):
        b.apply([E("x", T.FILE)])
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "extent,metadata_csum,^has_journal", str(parent)],
                   check=True, capture_output=True, env=env)
    b.load_parents(RawDevice(parent))
    b.apply([E("d", T.DIR)] + [E(f"d/{'x' * 60}{i}", T.FILE) for i in range(300)] + [E("d/x" + "x" * 59 + "7", T.WHITEOUT)])
    b.apply([E("d/again", T.FILE), E("top", T.SYMLINK, link_target="d")])
    result = fsck(tmp_path / "m.img")
    assert result.returncode == 0, result.stdout
    assert len(tree_from_ext4(tmp_path / "m.img")) == 1 + 300 - 1 + 2


def test_errors_name_a_huge_path_without_quoting_all_of_it() -> None:
    from obdconv.ext4.validate import entry_label

    label = entry_label(7, "a/" * 50_000)
    assert label.startswith("entry 7 'a/a/") and "more characters" in label
    assert len(label) < 300
    assert entry_label(3, "etc/passwd") == "entry 3 'etc/passwd'"
