"""A full --dir for `obdconv convert`, after the prepared layers fit: a tmpfs just larger than the
spool the conversion needs, so a later stage (the metadata image or the built layer) runs out.
(A full disk while preparing is tests/pipeline/test_bad_input.py; the fleet's spool is
tests/faults/test_fleet_faults.py.)"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from obdconv.errors import ObdconvError
from tests.conftest import requires_root
from tests.faults import storage
from tests.faults.conftest import root_digest, run_cli
from tests.fleet.conftest import push_layout
from tests.services.registry import RegistryService
from workers.sample_image import build_sample_image

pytestmark = [pytest.mark.services, requires_root]

REPO = "faults/disk-full"


@pytest.fixture
def small_dir(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def resize(mount: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def used_bytes(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def test_full_dir_after_the_spool_names_it_pushes_nothing_and_a_later_run_succeeds(
        registry: RegistryService, small_dir: Path, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    build_sample_image(layout, "img", layers=1, file_bytes=3 << 20, seed=64)
    push_layout(layout, "img", f"{registry.host}/{REPO}:src")
    work = small_dir / "work"

    def convert(tag: str, *extra: str) -> tuple[int, object, str]:
        return run_cli("convert", "-r", f"{registry.host}/{REPO}", "-i", "src", "--overlaybd", tag, "--plain",
                       "--json", "--workers", "1", "-d", str(work), *extra)

    code, result, err = convert("measured", "--reserve")  # how much the prepared layer takes
    assert code == 0, err
    spool = used_bytes(work / "spool")
    subprocess.run(["rm", "-rf", str(work)], check=True)

    resize(small_dir, spool + (256 << 10))
    code, _, err = convert("obd")
    assert code == ObdconvError.exit_code, err
    assert "No space left on device" in err and str(work) in err, err
    assert [p for p in work.rglob("*") if not p.is_dir()] == []  # (empty directories: #13 defect 8)
    assert storage.tag_target(registry, REPO, "obd") is None
    assert storage.dangling_references(registry, REPO) == [] and storage.open_uploads(registry, REPO) == []

    resize(small_dir, 64 << 20)
    code, again, err = convert("obd")
    assert code == 0, err
    assert root_digest(again) == root_digest(result)
    assert storage.tag_history(registry, REPO, "obd") == [root_digest(result)]
