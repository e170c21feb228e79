"""A three-layer stack with every entry kind, through the real tar scanner, libext2fs, e2fsck and the kernel."""

from __future__ import annotations

import random
import struct
import subprocess
from pathlib import Path

import pytest

from obdconv.ext4.reader import tree_from_ext4
from obdconv.oci.tree import tree_from_directory, tree_from_tar_layers
from obdconv.tree import diff_trees
from tests.conftest import requires_root
from tests.ext4.helpers import Layer, Member, assemble, build, fsck, mounted, scan, write_tar


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """Linux xattr form of a POSIX ACL: version 2 header, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


ACL = posix_acl((0x01, 6, 0xFFFFFFFF), (0x02, 4, 1000), (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
                (0x20, 4, 0xFFFFFFFF))
CAP = bytes([1, 0, 0, 2]) + bytes(16)


def layer_members() -> list[list[Member]]:
    rnd = random.Random(1)
    blob = rnd.randbytes
    one = [
        Member("etc", "dir", mode=0o755, xattrs={"user.d": b"dirattr"}),
        Member("etc/passwd", data=b"root:x:0:0\n", uid=100000, gid=70000),
        Member("bin/sh", data=blob(12345), mode=0o755),
        Member("bin/su", data=blob(5000), mode=0o4755),
        Member("tmp", "dir", mode=0o1777),
        Member("usr/lib/libx.so", data=blob(100_000), mode=0o2755),
        Member("usr/lib/link", "hardlink", link="bin/sh", mode=0o755),
        Member("usr/bin/rel", "symlink", link="../lib/libx.so", mode=0o777),
        Member("abs", "symlink", link="/etc/passwd", mode=0o777),
        Member("slow", "symlink", link="t/" * 100, mode=0o777),
        Member("dev/null", "char", mode=0o666, dev=(1, 3)),
        Member("dev/big", "block", mode=0o660, dev=(300, 70000)),
        Member("fifo", "fifo", mode=0o600),
        Member("attrs", data=b"x", xattrs={"user.test": b"v", "security.capability": CAP,
                                          "user.big": b"z" * 3000, "trusted.t": b"\x00\xff"}),
        Member("acl", data=b"acl", xattrs={"system.posix_acl_access": ACL}),
        Member("acldir", "dir", xattrs={"system.posix_acl_default": ACL, "system.posix_acl_access": ACL}),
        Member("old", data=b"1960", mtime="-315619199.123456789", uid=65534, gid=65534),
        Member("future", data=b"2100", mtime="4102444800.999999999"),
        Member("empty", data=b""),
        Member("gone", "dir"),
        Member("gone/child", data=blob(9000), xattrs={"user.big": b"y" * 3000}),
        Member("opq", "dir"),
        Member("opq/a", data=b"a"),
        Member("opq/sub/c", data=b"c"),
        Member("deep/a/b/file", data=b"implicit parents"),
        Member("many", "dir", mode=0o750),
    ] + [Member(f"many/{'n' * 100}{i:04d}", data=blob(rnd.randrange(0, 9000))) for i in range(400)]
    two = [
        Member("gone/.wh..wh..opq", "file"),  # aufs-style marker inside a dir whiteout below
        Member(".wh.gone", "file"),
        Member("usr/lib/.wh.libx.so", "file"),
        Member("opq/new", data=b"new in layer 2"),
        Member("opq/.wh..wh..opq", "file"),
        Member("bin/su", "dir", mode=0o711),
        Member("bin/su/inside", data=b"file replaced by dir"),
        Member("many", data=blob(3_000_000), mode=0o600),  # dir replaced by file: reuses freed blocks
        Member("l2link", "hardlink", link="bin/sh", mode=0o755),
        Member("etc", "dir", mode=0o700, xattrs={"user.e": b"2"}, mtime="1704067299.5"),
        Member("dup", data=b"first"),
        Member("dup", data=b"second wins"),
        Member("etc/passwd", data=b"root:x:0:0:new\n", mode=0o600),
    ]
    three = [
        Member("gone", "symlink", link="opq/new", mode=0o777),
        Member("big", data=blob(5_000_000)),
        Member("usr/bin/rel", "hardlink", link="abs"),  # hardlink to a symlink, replacing a symlink
    ]
    return [one, two, three]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Layer], Path]:
    tmp = tmp_path_factory.mktemp("stack")
    tars = [write_tar(tmp / f"l{i}.tar", members) for i, members in enumerate(layer_members())]
    layers = [Layer(*scan(t)) for t in tars]
    build(tmp / "meta.img", layers)
    device = tmp / "device.img"
    assemble(device, layers)
    return tars, layers, device


def test_device_passes_fsck(stack: tuple[list[Path], list[Layer], Path]) -> None:
    _, _, device = stack
    result = fsck(device)
    assert result.returncode == 0, result.stdout + result.stderr


def test_userspace_tree_equals_tar_model(stack: tuple[list[Path], list[Layer], Path]) -> None:
    tars, _, device = stack
    expected = tree_from_tar_layers(tars)
    actual = tree_from_ext4(device)
    assert diff_trees(expected, actual) == []
    # Spot checks that would expose a model and reader agreeing on something wrong.
    assert actual["bin/sh"].nlink == 3 and actual["l2link"].link_group == "bin/sh"
    assert actual["dev/big"].rdev == (300, 70000) and actual["dev/null"].rdev == (1, 3)
    assert actual["old"].mtime_ns == -315619199_123456789 and actual["old"].uid == 65534
    assert actual["future"].mtime_ns == 4102444800_999999999
    assert actual["etc/passwd"].mode == 0o600 and actual["etc"].mode == 0o700
    assert actual["etc"].xattrs == {"user.d": b"dirattr", "user.e": b"2"}
    assert actual["attrs"].xattrs["user.big"] == b"z" * 3000
    assert actual["acl"].xattrs["system.posix_acl_access"] == ACL
    assert actual["acldir"].xattrs == {"system.posix_acl_access": ACL, "system.posix_acl_default": ACL}
    assert actual["slow"].link_target == "t/" * 100
    assert sorted(p for p in actual if p.startswith("opq")) == ["opq", "opq/new"]
    assert actual["gone"].kind == "symlink" and actual["many"].kind == "file"
    assert actual["bin/su"].kind == "dir" and actual["bin/su/inside"].kind == "file"
    assert actual["deep/a"].mode == 0o755 and actual["deep/a"].mtime_ns == 0
    assert "usr/lib/libx.so" not in actual and actual["usr/bin/rel"].link_group == "abs"


@requires_root
def test_kernel_mount_equals_tar_model(stack: tuple[list[Path], list[Layer], Path]) -> None:
    tars, _, device = stack
    expected = tree_from_tar_layers(tars)
    with mounted(device) as mnt:
        actual = tree_from_directory(mnt)
    assert diff_trees(expected, actual) == []


def test_segments_exclude_live_file_blocks(stack: tuple[list[Path], list[Layer], Path]) -> None:
    _, layers, _ = stack
    for layer in layers:
        assert layer.meta is not None
        numbers = [b for b, _ in layer.meta.blocks]
        assert numbers == sorted(set(numbers))
        owned = {e.pblk + k for _, exts in layer.meta.file_extents for e in exts for k in range(e.length)}
        assert not owned & set(numbers)
        for index, extents in layer.meta.file_extents:
            entry = layer.entries[index]
            assert sum(e.length for e in extents) == -(-entry.size // 4096)
    # layer 0 carries mkfs: the primary superblock block is in it
    assert layers[0].meta is not None and layers[0].meta.blocks[0][0] == 0


@requires_root
def test_kernel_can_write_to_it(stack: tuple[list[Path], list[Layer], Path], tmp_path: Path) -> None:
    """A read-write mount (as a container's writable layer would see it) works and stays clean."""
    _, _, device = stack
    copy = tmp_path / "rw.img"
    subprocess.run(["cp", "--sparse=always", str(device), str(copy)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(copy), str(mnt)], check=True, capture_output=True)
    try:
        (mnt / "newdir").mkdir()
        (mnt / "newdir" / "f").write_bytes(b"w" * 100_000)
        (mnt / "bin" / "sh").unlink()
        (mnt / "etc" / "passwd").write_bytes(b"changed")
        assert (mnt / "usr" / "lib" / "link").read_bytes() == (mnt / "l2link").read_bytes()
    finally:
        subprocess.run(["umount", "-d", str(mnt)], check=True, capture_output=True)
    result = fsck(copy)
    assert result.returncode == 0, result.stdout
