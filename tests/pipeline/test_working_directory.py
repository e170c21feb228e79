"""`obdconv convert`/`verify`/`inspect` run from a directory full of planted modules (json.py,
concurrent.py, zstandard.py, peewee.py, an obdconv/ package...) import none of them, in the main
process or in any process the run starts (forkserver, pool workers, resource tracker), and the
conversion is correct."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.pipeline.hostile import imported, make_hostile_directory
from tests.pipeline.images import Layout, directory, file, layer
from tests.pipeline.readback import check_tree, flatten, source_layer_paths, tag_digest

CONSOLE_SCRIPT = str(Path(sys.executable).parent / "obdconv")


def _image(root: Path, middle: str) -> Layout:
    lay = Layout(root)
    lay.image([layer([directory("etc"), file("etc/a", b"a" * 10000)]), layer([file("b", b"b" * 5000)], kind=middle),
               layer([file("c", b"c")])], tag="t")
    return lay


def _check(lay: Layout, tmp_path: Path, tag: str) -> None:
    image = tmp_path / f"{tag}.img"
    flatten(lay.root, tag_digest(lay.root, tag), image, lay.root)
    assert check_tree(image, source_layer_paths(lay.root, tag_digest(lay.root, "t"))) == []


def test_console_script_imports_nothing_from_the_working_directory(tmp_path: Path) -> None:
    lay = _image(tmp_path / "src", "none")
    cwd = make_hostile_directory(tmp_path / "cwd", tmp_path / "markers")
    commands = {
        "convert": [CONSOLE_SCRIPT, "convert", "-r", f"oci:{lay.root}", "-i", "t", "--overlaybd", "obd",
                    "--turboOCI", "turbo", "-d", str(tmp_path / "work"), "--workers", "2"],
        "verify": [CONSOLE_SCRIPT, "verify", f"oci:{lay.root}:obd", "--source", f"oci:{lay.root}:t"],
    }
    for name, argv in commands.items():
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
        assert imported(tmp_path / "markers") == {}, name
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
    for tag in ("obd", "turbo"):
        _check(lay, tmp_path, tag)
    blob = next(p for p in (lay.root / "blobs" / "sha256").iterdir() if p.stat().st_size > 4096)
    proc = subprocess.run([CONSOLE_SCRIPT, "inspect", str(blob)], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert imported(tmp_path / "markers") == {}
    assert proc.returncode == 0, proc.stderr


def test_python_m_obdconv_imports_nothing_from_the_working_directory(tmp_path: Path) -> None:
    """`python -m obdconv` (without -P) puts the working directory first on sys.path; obdconv drops
    it before importing anything (a directory holding its own obdconv/ package is Python's rule)."""
    lay = _image(tmp_path / "src", "zstd")
    cwd = make_hostile_directory(tmp_path / "cwd", tmp_path / "markers", packages=False)
    proc = subprocess.run([sys.executable, "-m", "obdconv", "convert", "-r", f"oci:{lay.root}", "-i", "t",
                           "--overlaybd", "obd", "-d", str(tmp_path / "work"), "--workers", "2"],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert imported(tmp_path / "markers") == {}
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check(lay, tmp_path, "obd")
