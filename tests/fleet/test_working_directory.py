"""`obdconv fleet` run from, and keeping its files in, a directory full of planted modules: Redis,
the worker (Celery prefork; it imports its task modules "from the working directory" unless told
otherwise), Flower (which also executes ./flowerconfig.py by default) and the verify step all run
there, and none of them imports a planted module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline.hostile import imported, make_hostile_directory

CONSOLE_SCRIPT = str(Path(sys.executable).parent / "obdconv")


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.timeout(240)
def test_fleet_imports_nothing_from_the_working_directory(tmp_path: Path) -> None:
    cwd = make_hostile_directory(tmp_path / "fleet", tmp_path / "markers")
    result = subprocess.run([CONSOLE_SCRIPT, "fleet", "--workers", "1", "--concurrency", "2", "--layers", "2",
                             "--dir", str(cwd)], cwd=cwd, capture_output=True, text=True, timeout=200)
    assert imported(tmp_path / "markers") == {}
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 difference(s)" in result.stdout
