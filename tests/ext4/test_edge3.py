"""Our metadata pass over a real 3-layer image (umoci-built, shared fixture `oci/edge3` tag `source`):
the assembled device must pass e2fsck, mount, and show the tar layers' tree."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from obdconv.ext4.reader import tree_from_ext4
from obdconv.oci.tree import tree_from_directory, tree_from_tar_layers
from obdconv.tree import diff_trees
from tests.conftest import requires_root
from tests.ext4.helpers import Layer, assemble, build, fsck, mounted, scan


def source_layers(fixtures_dir: Path) -> list[Path]:
    root = fixtures_dir / "oci" / "edge3"
    index = json.loads((root / "index.json").read_text())
    desc = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == "source")
    blob = lambda d: root / "blobs" / d.split(":")[0] / d.split(":")[1]  # noqa: E731
    manifest = json.loads(blob(desc["digest"]).read_text())
    return [blob(layer["digest"]) for layer in manifest["layers"]]


@pytest.fixture(scope="module")
def edge3(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    tmp = tmp_path_factory.mktemp("edge3")
    blobs = source_layers(fixtures_dir)
    tars = []
    for i, b in enumerate(blobs):
        tar = tmp / f"layer{i}.tar"
        tar.write_bytes(gzip.decompress(b.read_bytes()))
        tars.append(tar)
    layers = [Layer(*scan(t)) for t in tars]
    build(tmp / "meta.img", layers)
    assemble(tmp / "device.img", layers)
    return tars, tmp / "device.img"


def test_edge3_fsck_and_userspace_tree(edge3: tuple[list[Path], Path]) -> None:
    tars, device = edge3
    result = fsck(device)
    assert result.returncode == 0, result.stdout
    assert diff_trees(tree_from_tar_layers(tars), tree_from_ext4(device)) == []


@requires_root
def test_edge3_kernel_mount(edge3: tuple[list[Path], Path]) -> None:
    tars, device = edge3
    with mounted(device) as mnt:
        actual = tree_from_directory(mnt)
    assert diff_trees(tree_from_tar_layers(tars), actual) == []
    assert len(actual) > 10
