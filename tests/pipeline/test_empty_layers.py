"""Images whose first layer writes nothing convert through `obdconv convert` (a new process, so the
engine's capture state is fresh, as in a new worker) and read back as their source; a bad first
hardlink is reported as bad input, not as a crash."""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from obdconv.errors import BadInputError
from tests.conftest import requires_root
from tests.pipeline.images import LAYER_TYPES, Layer, Layout, directory, file, hardlink, layer, sha, whiteout
from tests.pipeline.readback import check_tree, e2fsck, flatten, source_layer_paths, tag_digest

OBDCONV = [sys.executable, "-P", "-m", "obdconv"]


def empty_gzip_tar(records: int) -> Layer:
    """gzip of a tar with no members: `records` 512-byte zero records (tarfile writes 20, GNU tar's
    minimal end-of-archive is 2)."""
    if records == 20:
        buf = io.BytesIO()
        tarfile.open(fileobj=buf, mode="w").close()
        tar = buf.getvalue()
    else:
        tar = bytes(512 * records)
    return Layer(gzip.compress(tar, mtime=0), sha(tar), LAYER_TYPES[(False, "gzip")])


CONTENT = [directory("etc"), file("etc/a", b"hello\n" * 1000)]
IMAGES: dict[str, list[Layer]] = {
    "empty-gzip-tar-first": [empty_gzip_tar(20), layer(CONTENT)],
    "minimal-empty-tar-first": [empty_gzip_tar(2), layer(CONTENT)],
    "single-empty-layer": [empty_gzip_tar(20)],
    "only-whiteouts-first": [layer([whiteout("gone"), whiteout("other")]), layer(CONTENT)],
}


def convert(src: Path, work: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OBDCONV, "convert", "-r", f"oci:{src}", "-i", "t", "-d", str(work), "--workers", "2",
                           *extra], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_first_layer_writing_nothing_converts(name: str, tmp_path: Path) -> None:
    lay = Layout(tmp_path / "src")
    lay.image(IMAGES[name], tag="t")
    proc = convert(lay.root, tmp_path / "work", "--overlaybd", "obd", "--turboOCI", "turbo")
    assert proc.returncode == 0, proc.stderr
    source = source_layer_paths(lay.root, tag_digest(lay.root, "t"))
    for tag in ("obd", "turbo"):
        image = tmp_path / f"{tag}.img"
        flatten(lay.root, tag_digest(lay.root, tag), image, lay.root)
        assert e2fsck(image) == ""
        assert check_tree(image, source) == []
        verify = subprocess.run([*OBDCONV, "verify", f"oci:{lay.root}:{tag}", "--source", f"oci:{lay.root}:t"],
                                capture_output=True, text=True, timeout=300)
        assert verify.returncode == 0, verify.stdout + verify.stderr


@requires_root
def test_empty_first_layer_mounts(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "src")
    lay.image(IMAGES["empty-gzip-tar-first"], tag="t")
    assert convert(lay.root, tmp_path / "work", "--overlaybd", "obd").returncode == 0
    verify = subprocess.run([*OBDCONV, "verify", "--mount", f"oci:{lay.root}:obd", "--source", f"oci:{lay.root}:t"],
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_bad_first_hardlink_is_bad_input(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "src")
    lay.image([layer([hardlink("x", "missing")]), layer(CONTENT)], tag="t")
    proc = convert(lay.root, tmp_path / "work", "--overlaybd", "obd")
    assert proc.returncode == BadInputError.exit_code, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("obdconv: error: ") and "hardlink target 'missing' does not exist" in last, proc.stderr
