"""Input-controlled depth never recurses: trees thousands of directories deep (paths far beyond
PATH_MAX) through the tar model and the directory walk, and JSON nested thousands deep."""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from obdconv.errors import BadInputError
from obdconv.oci.manifest import go_json, parse_json
from obdconv.oci.tree import tree_from_directory, tree_from_tar_layers

DEPTH = 3000  # "d/" * 3000: 6000-byte paths, well past PATH_MAX (4096) and Python's recursion limit


def _chain(depth: int) -> list[str]:
    return ["/".join(["d"] * (i + 1)) for i in range(depth)]


def _tar(members: list[tuple[str, bytes, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o755
            info.mtime = 1_700_000_000
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _layers(tmp_path: Path, *tars: bytes) -> list[Path]:
    out = []
    for i, data in enumerate(tars):
        p = tmp_path / f"l{i}.tar"
        p.write_bytes(data)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def deep_layer() -> bytes:
    dirs = _chain(DEPTH)
    return _tar([(p, tarfile.DIRTYPE, None) for p in dirs] + [(dirs[-1] + "/leaf", tarfile.REGTYPE, b"x")])


def test_model_applies_a_3000_deep_tree(tmp_path: Path, deep_layer: bytes) -> None:
    tree = tree_from_tar_layers(_layers(tmp_path, deep_layer))
    assert len(tree) == DEPTH + 1
    leaf = "/".join(["d"] * DEPTH) + "/leaf"
    assert len(leaf.encode()) > 4096 and tree[leaf].kind == "file"


@pytest.mark.parametrize("upper", [
    [(".wh.d", tarfile.REGTYPE, b"")],  # whiteout of the whole tree
    [("d/.wh..wh..opq", tarfile.REGTYPE, b""), ("d/new", tarfile.REGTYPE, b"n")],  # opaque over it
], ids=["whiteout", "opaque"])
def test_model_deletes_a_3000_deep_tree(tmp_path: Path, deep_layer: bytes,
                                        upper: list[tuple[str, bytes, bytes | None]]) -> None:
    tree = tree_from_tar_layers(_layers(tmp_path, deep_layer, _tar(upper)))
    assert sorted(tree) == ([] if upper[0][0] == ".wh.d" else ["d", "d/new"])


def test_model_implied_parents_of_one_deep_leaf(tmp_path: Path) -> None:
    leaf = "/".join(["p"] * DEPTH) + "/f"
    tree = tree_from_tar_layers(_layers(tmp_path, _tar([(leaf, tarfile.REGTYPE, b"y")])))
    assert len(tree) == DEPTH + 1
    assert tree["p/p"].mode == 0o755 and tree["p/p"].mtime_ns == 0


def _remove_tree(root: Path) -> None:
    """rm -r without recursion or long paths: one directory fd, down into the first subdirectory
    left, back up with ".." (GNU rm takes O(depth^2) on a chain; shutil.rmtree recurses)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    names: list[str] = []
    try:
        while True:
            sub = None
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        sub = entry.name
                        break
                    os.unlink(entry.name, dir_fd=fd)
            if sub is not None:
                nxt = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                names.append(sub)
            elif names:
                nxt = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            else:
                break
            os.close(fd)
            fd = nxt
            if sub is None:
                os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(root)


@pytest.fixture
def deep_dir() -> Iterator[Path]:
    """An empty directory OUTSIDE pytest's temporary tree, emptied at the end: shutil.rmtree
    recurses per level, so a deep tree left under the shared basetemp would crash every later
    pytest session's cleanup of old temporary directories."""
    shm = Path("/dev/shm")  # tmpfs: a deep chain takes ~0.1 s there, ~2 s on a journaled disk
    root = Path(tempfile.mkdtemp(prefix="obdconv-deep-test-", dir=shm if shm.is_dir() else None))
    try:
        yield root
    finally:
        _remove_tree(root)


def _make_deep_directory(root: Path, depth: int) -> None:
    """`root`/d/d/... `depth` levels and a file at the bottom, made with directory fds (a path
    string that long could not be passed to the kernel)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", 0o750, dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
        os.write(leaf, b"bottom")
        os.close(leaf)
        os.symlink("leaf", "link", dir_fd=fd)
    finally:
        os.close(fd)


def test_directory_walk_of_a_3000_deep_tree(deep_dir: Path) -> None:
    root = deep_dir
    _make_deep_directory(root, DEPTH)
    tree = tree_from_directory(root)
    bottom = "/".join(["d"] * DEPTH)
    assert len(tree) == DEPTH + 2
    assert tree[bottom + "/leaf"].sha256 == hashlib.sha256(b"bottom").hexdigest()
    assert tree[bottom + "/leaf"].mode == 0o640 and tree[bottom + "/leaf"].size == 6
    assert tree[bottom + "/link"].link_target == "leaf"
    assert tree[bottom].mode == 0o750 and tree[bottom].kind == "dir"


def test_directory_walk_keeps_open_files_constant(deep_dir: Path) -> None:
    """One directory fd at a time: a tree deeper than the open-file limit still reads."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    root = deep_dir
    _make_deep_directory(root, 400)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(128, hard), hard))
    try:
        tree = tree_from_directory(root)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(tree) == 402


def test_deeply_nested_json_is_bad_input_not_a_crash() -> None:
    with pytest.raises(BadInputError, match="nested too deeply"):
        parse_json("[" * 100_000 + "]" * 100_000, "config")


def test_go_json_encodes_any_depth() -> None:
    doc: list = []
    cur = doc
    for _ in range(5000):
        nxt: list = [1]
        cur.append(nxt)
        cur = nxt
    out = go_json({"a": doc, "b": {"c": [True, None, "x<y"]}})
    assert out.startswith(b'{"a":[[1,[1,') and out.endswith(b']]],"b":{"c":[true,null,"x\\u003cy"]}}')
    assert out.count(b"[") == 5001 + 1
    assert go_json({"k": [1, {"z": 2, "a": []}], "e": {}}) == json.dumps(
        {"k": [1, {"z": 2, "a": []}], "e": {}}, separators=(",", ":")).encode()
