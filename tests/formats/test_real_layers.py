"""Reading real reference-tool output: flatten to a sparse raw image; its ext4 tree must equal the
source layer's tree (modelled independently from the tar by obdconv.oci.tree)."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from obdconv.ext4.reader import tree_from_ext4
from obdconv.formats.blob import open_layer_blob
from obdconv.formats.gzindex import GzipIndexBuilder, GzipRandomReader
from obdconv.formats.lsmt import LSMTStack
from obdconv.oci.tree import tree_from_directory, tree_from_tar_layers
from obdconv.tree import diff_trees

from ..conftest import requires_root

IGNORE = {"lost+found"}


def _e2fsck_only_known_quirk(image: Path) -> None:
    """e2fsck -fn may complain only about the reference mkfs's lost+found HTREE flag (README)."""
    res = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    problems = [line for line in res.stdout.splitlines() if "Problem" in line or "Invalid" in line]
    assert all("inode 11" in line for line in problems), res.stdout
    assert res.returncode in (0, 4), res.stdout + res.stderr


def _blob_path(layout: Path, digest: str) -> Path:
    algo, hexd = digest.split(":")
    return layout / "blobs" / algo / hexd


def _manifest(layout: Path, tag: str) -> dict:  # type: ignore[type-arg]
    index = json.loads((layout / "index.json").read_text())
    (desc,) = [m for m in index["manifests"]
               if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    return json.loads(_blob_path(layout, desc["digest"]).read_text())  # type: ignore[no-any-return]


def test_reference_layer_blob(ref_layer_dir: Path, tmp_path: Path) -> None:
    layer = open_layer_blob(ref_layer_dir / "overlaybd.commit.zfile.tar")
    # values stated by the fixture README (made by the reference tools)
    assert (len(layer.mappings), layer.index_padding) == (515, 253)
    assert layer.virtual_size == 64 << 30
    assert layer.uuid == "1B1E3F50-C815-FD19-CED3-D36687784B7A"
    image = tmp_path / "ref.img"
    LSMTStack([layer]).flatten_to(image)
    assert image.stat().st_size == 64 << 30
    _e2fsck_only_known_quirk(image)
    expected = tree_from_tar_layers([ref_layer_dir / "layer.tar"])
    assert diff_trees(expected, tree_from_ext4(image), ignore=IGNORE) == []


def test_turbo_fs_meta_with_target(ref_layer_dir: Path, tmp_path: Path) -> None:
    layer = open_layer_blob(ref_layer_dir / "turbo-ext4.fs.meta", target=ref_layer_dir / "layer.tar")
    tags = {m.tag for m in layer.mappings}
    assert tags == {0, 1} and layer.index_padding == 0
    image = tmp_path / "turbo.img"
    LSMTStack([layer]).flatten_to(image)
    expected = tree_from_tar_layers([ref_layer_dir / "layer.tar"])
    assert diff_trees(expected, tree_from_ext4(image), ignore=IGNORE) == []


def test_hello_world_converted(fixtures_dir: Path, tmp_path: Path) -> None:
    layout = fixtures_dir / "oci" / "hello-world"
    converted = _manifest(layout, "amd64-converted")
    source = _manifest(layout, "amd64")
    layers = [open_layer_blob(_blob_path(layout, d["digest"])) for d in converted["layers"]]
    image = tmp_path / "hello.img"
    LSMTStack(layers).flatten_to(image)  # (e2fsck runs in test_reference_layer_blob: ~6 s each here)
    expected = tree_from_tar_layers([_blob_path(layout, d["digest"]) for d in source["layers"]])
    assert "hello" in expected
    assert diff_trees(expected, tree_from_ext4(image), ignore=IGNORE) == []


@requires_root
def test_reference_layer_loop_mount(ref_layer_dir: Path, tmp_path: Path) -> None:
    """The flattened image is what the kernel mounts; compare through a real read-only mount."""
    image = tmp_path / "ref.img"
    LSMTStack([open_layer_blob(ref_layer_dir / "overlaybd.commit.zfile.tar")]).flatten_to(image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop,ro,noload", str(image), str(mnt)], check=True)
    try:
        actual = tree_from_directory(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    expected = tree_from_tar_layers([ref_layer_dir / "layer.tar"])
    assert diff_trees(expected, actual, ignore=IGNORE) == []


def test_stack_of_edge3_overlaybd(fixtures_dir: Path, tmp_path: Path) -> None:
    layout = fixtures_dir / "oci" / "edge3"
    if not layout.is_dir():
        pytest.skip("edge3 fixture missing")
    converted = _manifest(layout, "overlaybd")
    source = _manifest(layout, "source")
    layers = [open_layer_blob(_blob_path(layout, d["digest"])) for d in converted["layers"]]
    assert len(layers) >= 3
    image = tmp_path / "edge3.img"
    LSMTStack(layers).flatten_to(image)
    expected = tree_from_tar_layers([_blob_path(layout, d["digest"]) for d in source["layers"]])
    assert diff_trees(expected, tree_from_ext4(image), ignore=IGNORE) == []


def test_edge3_turbo_stack_through_gzip_index(fixtures_dir: Path, tmp_path: Path) -> None:
    """turboOCI: each layer's fs.meta reads file data from its original gzip layer through
    gzip.meta. Our builder must reproduce the reference gzip.meta, and the stacked warp layers
    must flatten to the source tree."""
    layout = fixtures_dir / "oci" / "edge3"
    if not layout.is_dir():
        pytest.skip("edge3 fixture missing")
    layers = []
    for desc in _manifest(layout, "turbo")["layers"]:
        target_digest = desc["annotations"]["containerd.io/snapshot/overlaybd/turbo-oci/target-digest"]
        target = _blob_path(layout, target_digest).read_bytes()
        with tarfile.open(_blob_path(layout, desc["digest"])) as tf:
            fs_meta = tf.extractfile("ext4.fs.meta").read()  # type: ignore[union-attr]
            ref_meta = tf.extractfile("gzip.meta").read()  # type: ignore[union-attr]
        builder = GzipIndexBuilder()
        builder.feed(target)
        assert builder.finish(len(target)) == ref_meta
        layers.append(open_layer_blob(fs_meta, target=GzipRandomReader(target, ref_meta)))
    image = tmp_path / "turbo3.img"
    LSMTStack(layers).flatten_to(image)
    source = _manifest(layout, "source")
    expected = tree_from_tar_layers([_blob_path(layout, d["digest"]) for d in source["layers"]])
    assert diff_trees(expected, tree_from_ext4(image), ignore=IGNORE) == []
