"""Deep directory trees: does the work grow like the input, or faster? (issue #13, defect 4)

For a chain of N nested directories (d/d/.../d, a file at the bottom) and for 4N, measures CPU time
of each step on its own:

  read      tarfile iterating the layer's members (the baseline: parsing the input at all)
  model     obdconv.oci.tree.tree_from_tar_layers (verify's model of the source)
  apply     the ext4 metadata pass of the chain, then of a layer whiteouting its top directory
  ext4 read obdconv.ext4.reader.tree_from_ext4 of the converted image
  mount     obdconv.oci.tree.tree_from_directory through a loop mount (root only)

A chain of N directories is Theta(N^2) bytes of paths (entry i's path has i components), so even
the baseline grows ~16x from N to 4N. What matters is each step's ratio to the baseline measured
at the same depth: it stays about the same when the step is linear in its input, and grows ~4x per
4x depth when it does depth-times-more work per entry (the defect: the model was O(N^3)).

    .venv/bin/python benchmarks/bench_deep.py [--depth 750] [--runs 3]
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from obdconv.entries import EntryType, LayerEntry
from obdconv.ext4 import Ext4Builder
from obdconv.ext4.reader import tree_from_ext4
from obdconv.oci.tarscan import scan_tar
from obdconv.oci.tree import tree_from_directory, tree_from_tar_layers


def chain_tar(depth: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        path = ""
        for _ in range(depth):
            path = f"{path}/d" if path else "d"
            info = tarfile.TarInfo(path)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            t.addfile(info)
        leaf = tarfile.TarInfo(path + "/leaf")
        leaf.size = 4
        t.addfile(leaf, io.BytesIO(b"leaf"))
    return buf.getvalue()


def cpu(fn: Callable[[], object], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def measure(depth: int, runs: int, tmp: Path) -> dict[str, float]:
    tar_path = tmp / f"chain-{depth}.tar"
    tar_path.write_bytes(chain_tar(depth))
    image = tmp / f"chain-{depth}.img"

    def read() -> None:
        with tarfile.open(tar_path) as t:
            for _ in t:
                pass

    def apply() -> None:
        with open(tar_path, "rb") as f:
            entries = scan_tar(f).entries
        image.unlink(missing_ok=True)
        with Ext4Builder(image, 64 << 30, uuid.UUID(int=1)) as b:
            b.mkfs()
            b.apply(entries)
            b.apply([LayerEntry("d", EntryType.WHITEOUT), LayerEntry("again", EntryType.FILE)])

    out = {"read": cpu(read, runs), "model": cpu(lambda: tree_from_tar_layers([tar_path]), runs)}
    out["apply"] = cpu(apply, runs)
    # The image as left by the last apply has only "again": read back the chain before the whiteout.
    image.unlink(missing_ok=True)
    with open(tar_path, "rb") as f:
        entries = scan_tar(f).entries
    with Ext4Builder(image, 64 << 30, uuid.UUID(int=1)) as b:
        b.mkfs()
        b.apply(entries)
    out["ext4 read"] = cpu(lambda: tree_from_ext4(image), runs)
    if os.geteuid() == 0:
        mnt = tmp / f"mnt-{depth}"
        mnt.mkdir()
        subprocess.run(["mount", "-o", "loop,ro,noload", str(image), str(mnt)], check=True)
        try:
            out["mount"] = cpu(lambda: tree_from_directory(mnt), runs)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    image.unlink(missing_ok=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=750)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-deep-") as d:
        small = measure(args.depth, args.runs, Path(d))
        large = measure(4 * args.depth, args.runs, Path(d))
    print(f"CPU seconds (best of {args.runs}); x = ratio to 'read' at the same depth")
    print(f"{'step':10} {'N=' + str(args.depth):>16} {'4N=' + str(4 * args.depth):>16} {'4N/N':>7} "
          f"{'x at N':>7} {'x at 4N':>8} {'growth of x':>12}")
    for step in small:
        a, b = small[step], large[step]
        xa, xb = a / small["read"], b / large["read"]
        print(f"{step:10} {a:16.4f} {b:16.4f} {b / a:7.1f} {xa:7.2f} {xb:8.2f} {xb / xa:12.2f}")
    print("paths grow 16x from N to 4N (Theta(N^2) bytes); a step linear in its input keeps "
          "'growth of x' near 1, one doing depth-times-more work per entry shows ~4")


if __name__ == "__main__":
    main()
