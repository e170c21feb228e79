"""Benchmark: the ext4 metadata pass (files/s, metadata bytes) against a data-path baseline.

Synthesises one layer of N files (default 50,000) in a realistic tree (nested dirs, file sizes
log-normal around 2 KiB, capped at 4 MiB, some symlinks and hard links, xattrs on a few), then:
  * metadata pass: Ext4Builder.mkfs() once (not timed), apply() of the layer (timed): files/s;
  * metadata segment: blocks and bytes, and the compact serialised size;
  * baseline, same run, same bytes: gzip inflate of the layer's file bytes + LZ4 compression in
    4 KiB blocks (what the prepare stage does with the data).
Prints the ratio metadata pass / baseline (target <= 10 %) and files/s (target >= 20k).

Usage: .venv/bin/python benchmarks/bench_metadata.py [--files N] [--dir-size N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import lz4.block

from obdconv.entries import EntryType, LayerEntry
from obdconv.ext4 import Ext4Builder
from obdconv.ext4.reader import tree_from_ext4


def synth_layer(n_files: int, seed: int = 7) -> list[LayerEntry]:
    rnd = random.Random(seed)
    entries: list[LayerEntry] = []
    dirs = [""]
    for i in range(max(1, n_files // 100)):  # ~100 entries per directory, nested up to 4 deep
        parent = rnd.choice(dirs[-50:] if len(dirs) > 50 else dirs)
        if parent.count("/") >= 3:
            parent = ""
        path = f"{parent}/dir{i:05d}" if parent else f"usr/dir{i:05d}"
        entries.append(LayerEntry(path, EntryType.DIR, 0o755, mtime_ns=1_700_000_000_000_000_000))
        dirs.append(path)
    # Files grouped by directory, directories in tar (walk) order, as real layer tars list them.
    per_dir: dict[str, list[int]] = {d: [] for d in dirs[1:]}
    for i in range(n_files):
        per_dir[rnd.choice(dirs[1:])].append(i)
    offset = 0
    for d, numbers in per_dir.items():
        for i in numbers:
            roll = rnd.random()
            path = f"{d}/file-{i:06d}.{rnd.choice(['so', 'py', 'h', 'txt', 'pyc'])}"
            if roll < 0.03:
                entries.append(LayerEntry(path, EntryType.SYMLINK, 0o777, link_target=f"../lib/target-{i}.so"))
            elif roll < 0.04 and entries[-1].type is EntryType.FILE:
                entries.append(LayerEntry(path, EntryType.HARDLINK, 0o644, link_target=entries[-1].path))
            else:
                size = min(int(rnd.lognormvariate(7.6, 1.6)), 4 << 20)
                xattrs = [("security.capability", bytes(20))] if roll > 0.995 else []
                entries.append(LayerEntry(path, EntryType.FILE, 0o644, mtime_ns=1_700_000_000_000_000_000 + i,
                                          size=size, xattrs=xattrs, data_offset=offset))
                offset += (size + 4095) & ~4095
    return entries


def synth_bytes(total: int, seed: int = 7) -> bytes:
    """Moderately compressible bytes (like binaries and text): random runs mixed with repeats."""
    rnd = random.Random(seed)
    words = [rnd.randbytes(rnd.randrange(4, 24)) for _ in range(2000)]
    out = bytearray()
    while len(out) < total:
        out += rnd.randbytes(256) if rnd.random() < 0.3 else b"".join(rnd.choices(words, k=32))
    return bytes(out[:total])


def baseline_seconds(data: bytes) -> tuple[float, float]:
    """(wall, cpu) seconds of gzip inflate + LZ4 per 4 KiB block."""
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)
    blob = gz.compress(data) + gz.flush()
    t, c = time.perf_counter(), time.process_time()
    inflated = zlib.decompressobj(31).decompress(blob)
    view = memoryview(inflated)
    for off in range(0, len(inflated), 4096):
        lz4.block.compress(view[off:off + 4096], store_size=False)
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--big-dir", type=int, default=100_000, help="entries in the one-directory test (0 = skip)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        entries = synth_layer(args.files)
        n_files = sum(e.type is EntryType.FILE for e in entries)
        data_bytes = sum(e.size for e in entries if e.type is EntryType.FILE)
        b = Ext4Builder(Path(tmp) / "meta.img", 64 << 30, uuid.UUID(int=1))
        b.mkfs()
        t, c = time.perf_counter(), time.process_time()
        meta = b.apply(entries)
        meta_s, meta_cpu = time.perf_counter() - t, time.process_time() - c
        t = time.perf_counter()
        wire = meta.to_bytes()
        wire_s = time.perf_counter() - t
        base_s, base_cpu = baseline_seconds(synth_bytes(data_bytes))
        t = time.perf_counter()
        tree = tree_from_ext4(Path(tmp) / "meta.img")
        read_s = time.perf_counter() - t
        print(f"layer: {len(entries)} entries ({n_files} files), {data_bytes / 1e6:.1f} MB of file data")
        print(f"metadata pass: {meta_s:.2f} s wall = {len(entries) / meta_s:,.0f} entries/s; "
              f"{meta_cpu:.2f} s CPU = {len(entries) / meta_cpu:,.0f} entries/s (target >= 20,000)")
        print(f"metadata segment: {len(meta.blocks)} blocks = {len(meta.blocks) * 4096 / 1e6:.1f} MB; "
              f"serialised {len(wire) / 1e6:.2f} MB in {wire_s:.2f} s")
        print(f"baseline gzip inflate + LZ4 4 KiB blocks of the same bytes: {base_s:.2f} s wall, {base_cpu:.2f} s CPU")
        print(f"ratio metadata/baseline: {meta_s / base_s:.1%} wall, {meta_cpu / base_cpu:.1%} CPU (target <= 10%)")
        print(f"reader: tree_from_ext4 of the layer's image: {len(tree)} paths in {read_s:.2f} s")
        if args.big_dir:
            b2 = Ext4Builder(Path(tmp) / "bigdir.img", 64 << 30, uuid.UUID(int=2))
            b2.mkfs()
            big = [LayerEntry("d", EntryType.DIR)] + [
                LayerEntry(f"d/some-package-file-name-{i:07d}", EntryType.FILE, size=100) for i in range(args.big_dir)
            ]
            t, c = time.perf_counter(), time.process_time()
            b2.apply(big)
            s, cpu = time.perf_counter() - t, time.process_time() - c
            print(f"one directory with {args.big_dir} files: {s:.2f} s wall, {cpu:.2f} s CPU "
                  f"= {args.big_dir / cpu:,.0f} files/s (CPU)")


if __name__ == "__main__":
    main()
