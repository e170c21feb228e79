"""The filesystem comparison: flatten the layer stack, e2fsck it, read it back (userspace or
mounted) and compare it with the source layers applied in order, expecting exactly the documented
differences of `obdconv.faithful` (reported, never failed)."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from obdconv.errors import BadInputError, ObdconvError
from obdconv.ext4.reader import tree_from_ext4
from obdconv.faithful import LOST_FOUND, LOST_FOUND_ADDED, Difference, summarize
from obdconv.formats.lsmt import LSMTFile, LSMTStack
from obdconv.oci.tree import tree_from_directory, tree_from_tar_layers
from obdconv.tree import Tree, diff_trees
from obdconv.verify.fsck import run_fsck
from obdconv.verify.layers import SourceLayer
from obdconv.verify.report import ERROR, PlatformReport

log = logging.getLogger(__name__)


@contextmanager
def mounted(image: Path, mountpoint: Path) -> Iterator[Path]:
    """`mount -o loop,ro`; always unmounted (the loop device is auto-cleared with it)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "ext4", "-o", "loop,ro,noload", str(image), str(mountpoint)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BadInputError(f"mount -o loop,ro {image} failed: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            # Busy (e.g. a scanner still has a file open): detach lazily so nothing stays mounted.
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def read_tree(image: Path, mount: bool, workdir: Path) -> Tree:
    """The converted filesystem's tree, /lost+found included (see `mkfs_lost_found`)."""
    if mount:
        with mounted(image, workdir / "mnt") as root:
            return tree_from_directory(root, skip_lost_found=False)
    return tree_from_ext4(image, skip_lost_found=False)


def mkfs_lost_found(expected: Tree, actual: Tree, differences: list[Difference]) -> Tree:
    """`actual` without mkfs's /lost+found when the source has none (a documented difference);
    unchanged when the source has one (then it is compared like any directory) or when anything
    is in it (what it holds must then be explained like any other path)."""
    found = actual.get(LOST_FOUND)
    if LOST_FOUND in expected or found is None or found.kind != "dir":
        return actual
    prefix = LOST_FOUND + "/"
    if any(p.startswith(prefix) for p in actual):
        return actual
    differences.append(Difference(LOST_FOUND_ADDED, LOST_FOUND))
    return {p: e for p, e in actual.items() if p != LOST_FOUND}


def compare_filesystem(layers: list[LSMTFile], source_layers: list[SourceLayer], report: PlatformReport,
                       workdir: Path, mount: bool) -> None:
    image = workdir / "flat.img"
    t0 = time.monotonic()
    try:
        LSMTStack(layers).flatten_to(image)
    except (ObdconvError, OSError) as e:
        report.add(ERROR, "filesystem", f"cannot read the layer stack: {e}")
        return
    t1 = time.monotonic()
    report.fsck = run_fsck(image)
    t2 = time.monotonic()
    try:
        differences: list[Difference] = []
        try:
            expected = tree_from_tar_layers([s.path for s in source_layers if s.path is not None], differences)
        except ObdconvError as e:
            report.add(ERROR, "source", f"cannot read the source layers: {e}")
            return
        try:
            actual = mkfs_lost_found(expected, read_tree(image, mount, workdir), differences)
        except (ObdconvError, OSError) as e:
            report.add(ERROR, "filesystem", f"cannot read the converted filesystem: {e}")
            return
    finally:
        image.unlink(missing_ok=True)
    log.info("%s: flatten %.1f s, e2fsck %.1f s, trees %.1f s", report.platform, t1 - t0, t2 - t1,
             time.monotonic() - t2)
    report.differences = summarize(differences)
    report.tree_diff = diff_trees(expected, actual)
    report.entries_compared = len(set(expected) | set(actual))
    report.filesystem_compared = True
