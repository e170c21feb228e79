"""The smaller checks of verify, each on real input: e2fsck classification on images made by
mkfs.ext4/debugfs, and LSMT uuid chaining on the reference's layers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from obdconv.verify import PlatformReport, check_uuid_chain, classify_fsck_output, run_fsck
from tests.verify import layout_edit as le


def _mkfs(path: Path) -> Path:
    subprocess.run(["truncate", "-s", "32M", str(path)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True, capture_output=True)
    return path


def test_fsck_clean_filesystem(tmp_path: Path) -> None:
    result = run_fsck(_mkfs(tmp_path / "clean.img"))
    assert result.status == "clean" and result.ok and result.problems == []


def test_fsck_real_error_fails(tmp_path: Path) -> None:
    img = _mkfs(tmp_path / "bad.img")
    subprocess.run(["debugfs", "-w", "-R", "set_inode_field <2> links_count 9", str(img)],
                   check=True, capture_output=True)
    result = run_fsck(img)
    assert result.status == "errors" and not result.ok
    assert result.exit_code == 4
    assert any("Inode 2 ref count is 9" in p for p in result.problems), result.problems


def test_fsck_other_htree_damage_is_not_the_quirk(tmp_path: Path) -> None:
    """An index flag forced onto lost+found breaks more than the reference's quirk does (invalid
    root node etc.): that must fail, only the exact reference message is tolerated."""
    img = _mkfs(tmp_path / "htree.img")
    subprocess.run(["debugfs", "-w", "-R", "set_inode_field lost+found flags 0x81000", str(img)],
                   check=True, capture_output=True)
    result = run_fsck(img)
    assert any("Invalid HTREE directory inode 11 (/lost+found)" in p for p in result.problems)
    assert result.status == "errors"


def test_fsck_quirk_plus_anything_else_is_an_error() -> None:
    quirk = ("Pass 2: Checking directory structure\n"
             "Problem in HTREE directory inode 11: block #2 not referenced\n"
             "Invalid HTREE directory inode 11 (/lost+found).  Clear HTree index? no\n")
    assert classify_fsck_output(4, quirk).status == "known-quirk"
    assert classify_fsck_output(4, quirk + "Inode 12 ref count is 2, should be 1.  Fix? no\n").status == "errors"
    assert classify_fsck_output(8, quirk).status == "errors"  # operational error is never a quirk


@pytest.fixture(scope="module")
def edge3_layers(fixtures_dir: Path) -> list:
    from obdconv.formats.blob import open_layer_blob
    from obdconv.formats.source import FileSource

    layout = fixtures_dir / "oci" / "edge3"
    manifest = le.read_manifest(layout, "overlaybd")
    return [open_layer_blob(FileSource(le.blob_path(layout, d["digest"]))) for d in manifest["layers"]]


def test_uuid_chain_of_reference_layers_is_consistent(edge3_layers: list) -> None:
    report = PlatformReport("linux/amd64", "", "")
    check_uuid_chain(edge3_layers, report)
    assert report.findings == []


def test_uuid_chain_break_is_a_warning_not_an_error(edge3_layers: list) -> None:
    report = PlatformReport("linux/amd64", "", "")
    check_uuid_chain([edge3_layers[0], edge3_layers[2]], report)  # layer 1 missing from the chain
    assert len(report.findings) == 1
    (f,) = report.findings
    assert f.severity == "warning" and "does not check it" in f.message and "layer 1 parent_uuid" in f.message
    assert report.errors == []
