"""`obdconv fleet`: the README's main command starts a whole local fleet, converts and verifies a
sample image, and stops every process it started."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services.base import port_open

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.timeout(240)
def test_fleet_command_converts_and_verifies_then_stops(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "obdconv", "fleet", "--workers", "2", "--dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=200, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "native: sample-obd sha256:" in result.stdout
    assert "0 difference(s)" in result.stdout
    for name in ("worker1", "worker2", "flower", "redis"):
        assert (tmp_path / f"{name}.log").is_file()
    redis_port = int(re.search(r"OBDCONV_BROKER_URL=redis://127\.0\.0\.1:(\d+)/0", result.stdout)[1])  # type: ignore[index]
    flower_port = int(re.search(r"flower: http://[^@]+@127\.0\.0\.1:(\d+)/", result.stdout)[1])  # type: ignore[index]
    assert not port_open(redis_port) and not port_open(flower_port)
