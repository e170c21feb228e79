"""`e2fsck -fn` on a flattened image, and telling the reference mkfs's known lost+found quirk from
real problems."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from obdconv.errors import UnsupportedError
from obdconv.verify.report import FsckResult

# The reference toolchain's mkfs leaves the HTREE index flag on lost+found (inode 11); e2fsck reports
# exactly these lines for it. Anything else is a real problem.
_FSCK_QUIRK_LINES = (
    re.compile(r"^Problem in HTREE directory inode 11: block #\d+ not referenced$"),
    re.compile(r"^Invalid HTREE directory inode 11 \(/lost\+found\)\.\s+Clear HTree index\? no$"),
)
_FSCK_NOISE = (
    re.compile(r"^e2fsck \d"),
    re.compile(r"^Pass \d[A-Z]?: "),
    re.compile(r"^.*: \d+/\d+ files \(.*\), \d+/\d+ blocks$"),
    re.compile(r"^.*: \*+ WARNING: Filesystem still has errors \*+$"),
)


def classify_fsck_output(exit_code: int, output: str) -> FsckResult:
    """Turn `e2fsck -fn` output into a result: clean, only the known reference quirk, or errors."""
    problems = [line.strip() for line in output.splitlines()
                if line.strip() and not any(p.match(line.strip()) for p in _FSCK_NOISE)]
    if exit_code == 0 and not problems:
        return FsckResult("clean", 0, [])
    # Exit 4 = errors left uncorrected (-n); anything else (8 = operational error, ...) is never a quirk.
    if exit_code == 4 and problems and all(any(q.match(p) for q in _FSCK_QUIRK_LINES) for p in problems) \
            and any(_FSCK_QUIRK_LINES[1].match(p) for p in problems):
        return FsckResult("known-quirk", exit_code, problems)
    return FsckResult("errors", exit_code, problems or [f"e2fsck exited {exit_code} with no message"])


def run_fsck(image_path: str | Path) -> FsckResult:
    """`e2fsck -fn` (force a full check, change nothing) on a raw image."""
    if shutil.which("e2fsck") is None:
        raise UnsupportedError("e2fsck not found: install e2fsprogs to verify filesystems")
    proc = subprocess.run(["e2fsck", "-fn", str(image_path)], capture_output=True, text=True,
                          errors="replace")
    return classify_fsck_output(proc.returncode, proc.stdout + proc.stderr)
