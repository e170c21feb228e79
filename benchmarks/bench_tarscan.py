"""Tar scan throughput against plain reading, on a synthetic layer tar.

Builds a ~512 MiB tar with ~30k files (mixed sizes, PAX/GNU headers, dirs, symlinks) in a temp
directory, then times, best of N runs, everything reading the same file in 1 MiB chunks:

  read          f.readinto only (the floor)
  read+sha256   the baseline: what any layer download costs anyway (digest)
  scan          TarScanner without a data sink (turboOCI: entries and tar offsets only)
  scan+null     TarScanner writing the data area to /dev/null (native: pass-through cost)
  scan+file     TarScanner writing the data area to a temp file (page cache)
  sha+scan+file what prepare does: digest + scan + data area

and prints MB/s, files/s and each ratio to the read+sha256 baseline.

    .venv/bin/python benchmarks/bench_tarscan.py [--size-mib 512] [--files 30000] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from obdconv.oci.tarscan import TarScanner

CHUNK = 1 << 20


class _PoolReader:
    """`size` bytes cycling through a random pool from `start` (cheap content that is not all zeros)."""

    def __init__(self, pool: memoryview, start: int, size: int) -> None:
        self.pool, self.pos, self.left = pool, start, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        out = bytearray()
        while len(out) < n:
            take = min(n - len(out), len(self.pool) - self.pos)
            out += self.pool[self.pos : self.pos + take]
            self.pos = (self.pos + take) % len(self.pool)
        self.left -= n
        return bytes(out)


def build_tar(path: Path, total_bytes: int, files: int, seed: int = 1) -> int:
    """A layer-like tar: files in nested dirs, log-uniform sizes scaled to `total_bytes`."""
    rng = random.Random(seed)
    raw_sizes = [int(2 ** rng.uniform(0, 20)) for _ in range(files)]
    scale = total_bytes / sum(raw_sizes)
    sizes = [max(0, int(s * scale)) for s in raw_sizes]
    pool = rng.randbytes(4 << 20)
    pool_view = memoryview(pool)
    count = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in range(files // 100 + 1):
            ti = tarfile.TarInfo(f"usr/share/pkg{d:04d}")
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            tar.addfile(ti)
            count += 1
        for i, size in enumerate(sizes):
            name = f"usr/share/pkg{i // 100:04d}/file-{i:06d}" + ("-" + "x" * 120 if i % 97 == 0 else "")
            ti = tarfile.TarInfo(name)
            ti.size = size
            ti.mtime = 1_700_000_000 + i
            ti.mode = 0o644
            if i % 53 == 0:
                ti.pax_headers = {"SCHILY.xattr.user.i": str(i)}
            start = rng.randrange(0, len(pool) // 2)
            tar.addfile(ti, _PoolReader(pool_view, start, size))
            count += 1
            if i % 500 == 0:
                link = tarfile.TarInfo(f"usr/bin/link-{i}")
                link.type = tarfile.SYMTYPE
                link.linkname = f"../share/pkg{i // 100:04d}/file-{i:06d}"
                tar.addfile(link)
                count += 1
    return count


def read_chunks(path: Path, consume: Callable[[memoryview], None]) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            consume(view[:n])


def bench(name: str, fn: Callable[[], object], runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--files", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_tarscan.") as tmp:
        tar_path = Path(tmp) / "layer.tar"
        t0 = time.perf_counter()
        entries = build_tar(tar_path, args.size_mib << 20, args.files)
        size = tar_path.stat().st_size
        print(f"tar: {size / 2**20:.0f} MiB, {entries} entries, built in {time.perf_counter() - t0:.1f} s; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (ratios are what to compare)")

        def read_only() -> None:
            read_chunks(tar_path, lambda v: None)

        def read_sha() -> None:
            h = hashlib.sha256()
            read_chunks(tar_path, h.update)

        def scan(sink_factory: Callable[[], object] | None, with_sha: bool = False) -> Callable[[], None]:
            def run() -> None:
                sink = sink_factory() if sink_factory else None
                scanner = TarScanner(sink)  # type: ignore[arg-type]
                if with_sha:
                    h = hashlib.sha256()

                    def consume(v: memoryview) -> None:
                        h.update(v)
                        scanner.feed(v)

                    read_chunks(tar_path, consume)
                else:
                    read_chunks(tar_path, scanner.feed)
                found = scanner.finish()
                if sink is not None:
                    sink.close()  # type: ignore[attr-defined]
                assert len(found) == entries, (len(found), entries)

            return run

        area_path = Path(tmp) / "data.area"
        cases: list[tuple[str, Callable[[], object]]] = [
            ("read", read_only),
            ("read+sha256 (baseline)", read_sha),
            ("scan", scan(None)),
            ("scan+null", scan(lambda: open(os.devnull, "wb", buffering=0))),
            ("scan+file", scan(lambda: open(area_path, "wb", buffering=0))),
            ("scan+file (1 MiB buffer)", scan(lambda: open(area_path, "wb", buffering=CHUNK))),
            ("sha+scan+file", scan(lambda: open(area_path, "wb", buffering=0), with_sha=True)),
        ]
        read_sha()  # warm the page cache
        results = {name: bench(name, fn, args.runs) for name, fn in cases}
        baseline = results["read+sha256 (baseline)"]
        print(f"{'case':<28}{'seconds':>9}{'MB/s':>10}{'files/s':>12}{'vs baseline':>13}")
        for name, seconds in results.items():
            print(f"{name:<28}{seconds:>9.3f}{size / seconds / 1e6:>10.0f}{entries / seconds:>12.0f}"
                  f"{baseline / seconds:>12.2f}x")


if __name__ == "__main__":
    main()
