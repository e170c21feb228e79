"""Tree models: tar layers applied with overlay semantics, and a directory walk; cross-checked with umoci."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from obdconv.errors import BadInputError, UnsafePathError, UnsupportedError
from obdconv.oci.tree import tree_from_directory, tree_from_tar_layers
from obdconv.tree import diff_trees
from tests.conftest import requires_shared
from tests.oci.helpers import EDGE3_SOURCE_LAYERS, FIXTURES, info, make_tar


def _layers(tmp_path: Path, *layers: list[tuple[tarfile.TarInfo, bytes | None]], compress: str = "none") -> list[Path]:
    paths = []
    for i, members in enumerate(layers):
        raw = make_tar(members)
        if compress == "gzip":
            raw = gzip.compress(raw)
        elif compress == "zstd":
            raw = zstandard.ZstdCompressor().compress(raw[: len(raw) // 2]) + zstandard.ZstdCompressor().compress(
                raw[len(raw) // 2 :])  # two frames
        p = tmp_path / f"layer{i}.tar"
        p.write_bytes(raw)
        paths.append(p)
    return paths


@requires_shared
def test_edge3_source_tree_facts() -> None:
    """What the fixture README says the three layers do."""
    tree = tree_from_tar_layers(EDGE3_SOURCE_LAYERS)
    assert "data/remove-me" not in tree  # whiteout of a file
    assert tree["data/symlink"].kind == "file"  # whited-out symlink recreated as a file
    assert "gone/deep" not in tree and "gone/deep/file" not in tree  # directory whiteout
    assert tree["gone"].kind == "dir" and "gone/new" in tree  # recreated in layer 3
    links = {p for p, e in tree.items() if e.link_group == tree["data/hello.txt"].link_group}
    assert links == {"data/hardlink.txt", "data/hello.txt", "etc/hello-link"}
    assert all(tree[p].nlink == 3 for p in links)
    assert tree["data/hello.txt"].xattrs == {"user.test": b"value-2"}
    assert tree["data/fifo"].kind == "fifo"
    assert tree["data/null"].kind == "char" and tree["data/null"].rdev == (1, 3)
    assert tree["data/suid"].mode == 0o4755
    assert tree["tmpdir"].mode == 0o1777
    assert tree["data/owned"].uid == 1000 and tree["data/owned"].gid == 1000
    assert tree["abs-link"].kind == "symlink" and tree["abs-link"].link_target == "/etc/os-release"
    assert tree["data/sub/random.bin"].size == 300 * 1024
    assert tree["etc/passwd"].mode == 0o600  # changed mode in layer 2
    assert "." not in tree and "" not in tree


@requires_shared
@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="umoci unpack of devices and owners needs root")
def test_edge3_model_equals_umoci_unpack(tmp_path: Path) -> None:
    image = tmp_path / "image"
    shutil.copytree(FIXTURES / "edge3", image)
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{image}:source", str(bundle)], check=True,
                   capture_output=True)
    modelled = tree_from_tar_layers(EDGE3_SOURCE_LAYERS)
    unpacked = tree_from_directory(bundle / "rootfs")
    assert diff_trees(modelled, unpacked) == []


def test_overlay_semantics(tmp_path: Path) -> None:
    lower = [
        (info("d", tarfile.DIRTYPE, mode=0o750, mtime=100), None),
        (info("d/old"), b"old"),
        (info("d/sub", tarfile.DIRTYPE), None),
        (info("d/sub/x"), b"x"),
        (info("f2d"), b"file becomes dir"),
        (info("d2f", tarfile.DIRTYPE), None),
        (info("d2f/child"), b"c"),
        (info("shared"), b"shared content"),
        (info("link-to-shared", tarfile.LNKTYPE, linkname="shared"), None),
        (info("merge", tarfile.DIRTYPE, mode=0o700, pax_headers={"SCHILY.xattr.user.a": "1"}), None),
    ]
    upper = [
        (info("d/new-before-opq"), b"new"),
        (info("d/.wh..wh..opq"), b""),
        (info("f2d", tarfile.DIRTYPE, mode=0o711), None),
        (info("d2f"), b"now a file"),
        (info("other-link", tarfile.LNKTYPE, linkname="shared"), None),
        (info("merge", tarfile.DIRTYPE, mode=0o755, pax_headers={"SCHILY.xattr.user.b": "2"}), None),
        (info("auto/parent/file", mtime=5), b"p"),
        (info("sym", tarfile.SYMTYPE, linkname="d/new-before-opq",
              pax_headers={"SCHILY.xattr.user.no": "x", "SCHILY.xattr.trusted.yes": "y"}), None),
    ]
    tree = tree_from_tar_layers(_layers(tmp_path, lower, upper))
    assert sorted(p for p in tree if p.startswith("d/") or p == "d") == ["d", "d/new-before-opq"]
    assert tree["d"].mode == 0o750  # opaque keeps the directory itself
    assert tree["f2d"].kind == "dir" and tree["f2d"].mode == 0o711
    assert tree["d2f"].kind == "file" and "d2f/child" not in tree
    group = {p for p, e in tree.items() if e.link_group == "link-to-shared"}
    assert group == {"shared", "link-to-shared", "other-link"}
    assert tree["merge"].mode == 0o755 and tree["merge"].xattrs == {"user.a": b"1", "user.b": b"2"}
    parent = tree["auto"]
    assert (parent.kind, parent.mode, parent.uid, parent.gid, parent.mtime_ns) == ("dir", 0o755, 0, 0, 0)
    assert tree["auto/parent/file"].mtime_ns == 5 * 10**9
    assert tree["sym"].mode == 0o777 and tree["sym"].xattrs == {"trusted.yes": b"y"}


def test_rewrite_breaks_hardlink_and_pax_mtime(tmp_path: Path) -> None:
    lower = [(info("a"), b"one"), (info("b", tarfile.LNKTYPE, linkname="a"), None)]
    upper = [(info("a", pax_headers={"mtime": "1234.5"}), b"two")]
    tree = tree_from_tar_layers(_layers(tmp_path, lower, upper, compress="gzip"))
    assert tree["a"].link_group == "a" and tree["a"].nlink == 1
    assert tree["b"].link_group == "b" and tree["b"].nlink == 1
    assert tree["a"].mtime_ns == 1_234_500_000_000
    assert tree["b"].size == 3


def test_zstd_multiframe_layer(tmp_path: Path) -> None:
    members = [(info(f"f{i}"), os.urandom(3000)) for i in range(4)]
    tree = tree_from_tar_layers(_layers(tmp_path, members, compress="zstd"))
    assert sorted(tree) == ["f0", "f1", "f2", "f3"]


def test_model_errors(tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError, match="escape"):
        tree_from_tar_layers(_layers(tmp_path, [(info("../x"), b"1")]))
    with pytest.raises(BadInputError, match="missing-target"):
        tree_from_tar_layers(_layers(tmp_path, [(info("l", tarfile.LNKTYPE, linkname="missing-target"), None)]))
    with pytest.raises(UnsupportedError, match="sparse"):
        tree_from_tar_layers(_layers(tmp_path, [(info("s", pax_headers={"GNU.sparse.major": "1"}), b"")]))


def test_tree_from_directory(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "lost+found").mkdir(parents=True)
    (root / "dir").mkdir()
    (root / "dir" / "lost+found").mkdir()  # only the root-level one is skipped
    (root / "dir" / "file").write_bytes(b"hello")
    os.link(root / "dir" / "file", root / "a-link")
    os.symlink("dir/file", root / "sym")
    os.mkfifo(root / "fifo", 0o600)
    os.chmod(root / "fifo", 0o600)
    os.utime(root / "dir" / "file", ns=(0, 1_500_000_000_123))
    try:
        os.setxattr(root / "dir" / "file", "user.k", b"\x00\xff")
        has_xattr = True
    except OSError:
        has_xattr = False
    tree = tree_from_directory(root)
    assert sorted(tree) == ["a-link", "dir", "dir/file", "dir/lost+found", "fifo", "sym"]
    f = tree["dir/file"]
    assert f.kind == "file" and f.size == 5
    assert f.sha256 == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert f.link_group == "a-link" and tree["a-link"].link_group == "a-link" and f.nlink == 2
    assert f.mtime_ns == 1_500_000_000_123
    assert tree["sym"].link_target == "dir/file" and tree["sym"].size == len("dir/file")
    assert tree["fifo"].kind == "fifo" and tree["fifo"].mode == 0o600
    if has_xattr:
        assert f.xattrs == {"user.k": b"\x00\xff"}
