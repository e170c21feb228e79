"""A first layer that writes nothing (an empty layer, only whiteouts) is a valid image, and an error
found while applying the first layer (a hardlink to nothing) surfaces as itself, in both engine paths.

Each case runs in a fresh interpreter: the C path's capture buffer is allocated by the first block
it records in a process, and the defect (`cannot use unpack() on NULL` when a capture recorded
nothing) only showed while none had been recorded yet, i.e. in a new worker process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from obdconv.ext4 import fast

REPO = Path(__file__).resolve().parents[2]

# The child builds the layers, assembles the device, runs e2fsck -fn on it and lists its root.
CHILD = r"""
import json, subprocess, sys
from pathlib import Path
from obdconv.entries import EntryType, LayerEntry
from obdconv.errors import ObdconvError
from obdconv.ext4 import fast
from obdconv.ext4.reader import tree_from_ext4
from tests.ext4.helpers import Layer, assemble, build, fsck

spec, tmp = json.loads(sys.argv[1]), Path(sys.argv[2])
layers = [Layer([LayerEntry(p, EntryType[t], **kw) for p, t, kw in entries], b"") for entries in spec]
try:
    build(tmp / "meta.img", layers).close()
except ObdconvError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e), "fast": fast.FAST is not None}))
    sys.exit(0)
assemble(tmp / "device.img", layers)
check = fsck(tmp / "device.img")
paths = sorted(tree_from_ext4(tmp / "device.img"))
print(json.dumps({"fsck": check.returncode, "fsck_out": check.stdout + check.stderr, "paths": paths,
                  "fast": fast.FAST is not None}))
"""

CASES: dict[str, list[list[tuple[str, str, dict[str, object]]]]] = {
    "single-empty-layer": [[]],
    "empty-first-layer": [[], [("etc", "DIR", {}), ("etc/a", "FILE", {})]],
    "only-whiteouts-first": [[("gone", "WHITEOUT", {}), ("usr", "OPAQUE", {})],
                             [("b", "FILE", {})]],
}


def run_child(spec: object, tmp: Path, engine: str) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OBDCONV_EXT4_NO_FAST", None)
    if engine == "ctypes":
        env["OBDCONV_EXT4_NO_FAST"] = "1"
    proc = subprocess.run([sys.executable, "-P", "-c", CHILD, json.dumps(spec), str(tmp)], capture_output=True,
                          text=True, env=env, cwd=tmp, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["fast"] == (engine == "C")
    return result


ENGINES = [pytest.param("C", marks=pytest.mark.skipif(fast.FAST is None, reason="C fast path not built")),
           "ctypes"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_first_layer_writing_nothing_builds_a_valid_filesystem(case: str, engine: str, tmp_path: Path) -> None:
    result = run_child(CASES[case], tmp_path, engine)
    assert "error" not in result, result
    assert result["fsck"] == 0, result["fsck_out"]
    expected = {"single-empty-layer": [], "empty-first-layer": ["etc", "etc/a"], "only-whiteouts-first": ["b", "usr"]}
    # (an opaque marker implies its directory, as in overlayfs)
    assert [p for p in result["paths"] if p not in ("", "lost+found")] == expected[case]  # type: ignore[union-attr]


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_first_hardlink_is_bad_input(engine: str, tmp_path: Path) -> None:
    result = run_child([[("x", "HARDLINK", {"link_target": "missing"})]], tmp_path, engine)
    assert result["error"] == "BadInputError", result
    assert "hardlink target 'missing' does not exist" in str(result["message"])
