"""`obdconv fleet`: the README's main command starts a whole local fleet, converts and verifies a
sample image, and stops every process it started."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
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
    # Converted by the fleet into an OCI layout: OCI media types there, as `obdconv convert` writes them.
    tags = {e["annotations"]["org.opencontainers.image.ref.name"]: e
            for e in json.loads((tmp_path / "images" / "index.json").read_text())["manifests"]}
    assert tags["sample-obd"]["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    # Each native layer blob was finished in the spool file its worker prepared (inplace.py): one
    # inode, not a copy.
    blobs = tmp_path / "images" / "blobs" / "sha256"
    manifest = json.loads((blobs / tags["sample-obd"]["digest"].split(":")[1]).read_text())
    spool_files = {os.stat(p).st_ino for p in (tmp_path / "spool").rglob("blocks.bin")}
    assert manifest["layers"] and {os.stat(blobs / d["digest"].split(":")[1]).st_ino
                                   for d in manifest["layers"]} <= spool_files
    if shutil.which("skopeo"):  # installed by scripts/setup.sh; it skips Docker-typed entries of a layout
        subprocess.run(["skopeo", "inspect", f"oci:{tmp_path / 'images'}:sample-obd"], check=True,
                       capture_output=True, timeout=60)
    for name in ("worker1", "worker2", "flower", "redis"):
        assert (tmp_path / f"{name}.log").is_file()
    redis_port = int(re.search(r"OBDCONV_BROKER_URL=redis://127\.0\.0\.1:(\d+)/0", result.stdout)[1])  # type: ignore[index]
    flower_port = int(re.search(r"flower: http://[^@]+@127\.0\.0\.1:(\d+)/", result.stdout)[1])  # type: ignore[index]
    assert not port_open(redis_port) and not port_open(flower_port)


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.timeout(240)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_fleet_keep_running_leaves_no_process_when_stopped(signum: int, tmp_path: Path) -> None:
    """SIGTERM (systemd, docker stop) to `obdconv fleet --keep-running`: Redis, the worker and Flower
    are stopped before it exits with 143. SIGKILL (no cleanup can run): the kernel tells each child
    that its parent died, and they all stop by themselves."""

    proc = subprocess.Popen([sys.executable, "-P", "-m", "obdconv", "fleet", "--workers", "1", "--layers", "1",
                             "--dir", str(tmp_path), "--keep-running"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        while not lines or lines[-1] != "fleet running; Ctrl-C stops it\n":
            line = proc.stdout.readline()
            assert line, "".join(lines) + (proc.stderr.read() if proc.stderr else "")
            lines.append(line)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 4, children  # redis, worker (+ its pool), flower
        os.kill(proc.pid, signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (128 + signal.SIGTERM if signum == signal.SIGTERM else -signal.SIGKILL), err[-3000:]
    deadline = time.monotonic() + 20  # a worker's warm shutdown
    while time.monotonic() < deadline and any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE
                                              for c in children if psutil.pid_exists(c.pid)):
        time.sleep(0.1)
    text = "".join(lines)
    redis_port = int(re.search(r"OBDCONV_BROKER_URL=redis://127\.0\.0\.1:(\d+)/0", text)[1])  # type: ignore[index]
    flower_port = int(re.search(r"flower: http://[^@]+@127\.0\.0\.1:(\d+)/", text)[1])  # type: ignore[index]
    assert not port_open(redis_port) and not port_open(flower_port)
    left = []
    for c in children:
        try:
            if c.status() != psutil.STATUS_ZOMBIE:
                left.append(c)
        except psutil.NoSuchProcess:
            pass
    assert left == []
