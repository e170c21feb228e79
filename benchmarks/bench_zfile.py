"""ZFile compress/decompress throughput at 4 KiB blocks vs the bare codec calls, same data, same run.

Data (default 64 MiB): real binaries from /usr/lib, text (the overlaybd spec plus generated words)
and random bytes, interleaved in 1 MiB pieces, roughly 40/40/20.

Contestants, per codec and direction:
  bare per-block     the Python binding called on each 4 KiB block in a plain loop, one bytes object
                     per block, no CRC, no framing (python-lz4 / python-zstandard). THE BASELINE.
  bare sys-lib       (lz4 both ways, zstd decompress) the system library ZFile calls, per block through
                     cffi into one reused buffer: the codec's own cost with the least Python overhead,
                     a stricter reference shown for information.
  ZFile ...          BlockCompressor.compress_packed (what ZFileWriter uses) and .compress (one bytes
                     per block); ZFileReader.pread / .preadinto in 1 MiB reads. These include the
                     CRC32C of every block (computed when writing, checked when reading).

Method, so that the ratio means something on a shared, loaded machine:
  * Two clocks per run: this thread's CPU time (time.thread_time: user + system time of the calling
    thread, so time the scheduler gives to other processes is not counted) and wall time. The CPU
    ratio is the figure to quote for single-thread rows; thread-pool rows are judged on wall time
    (their other threads' CPU is not in thread_time, so their CPU ratio is not meaningful).
  * Fine-grained interleaving: the data is cut into 8 MiB chunks; for every chunk each contestant
    runs once, in an order rotated per chunk, and its times are added to its totals for the round.
    Load from other processes therefore lands on all contestants alike within a few tens of ms.
  * `--rounds` rounds (default 7). Per round, ratio = baseline time / contestant time (paired: same
    round, same load). Printed: best-round wall MB/s, the MEDIAN of the per-round ratios and their
    min..max spread. Target: median CPU ratio >= 0.80 against `bare per-block`.
  * `--threads N` adds ZFile rows with a thread pool, whose gain depends on whether a second core
    is actually free at the time.

    .venv/bin/python benchmarks/bench_zfile.py [--mib 64] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import cffi
import lz4.block
import zstandard

from obdconv.formats import zfile

BS = 4096
PIECE = 1 << 20
CHUNK = 8 * PIECE
BASELINE = "bare per-block"

Work = Callable[[int, int], object]  # (offset, length) of the data chunk -> anything


def realistic_data(total: int) -> bytes:
    rnd = random.Random(42)
    binaries = bytearray()
    for path in sorted(Path("/usr/lib/x86_64-linux-gnu").glob("*.so*")):
        if len(binaries) >= 32 * PIECE:
            break
        try:
            if path.is_file() and not path.is_symlink():
                binaries += path.read_bytes()[: 4 * PIECE]
        except OSError:
            continue
    spec = Path("/work/shared/spec/overlaybd-format.md")
    words = [bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz_", k=rnd.randint(2, 10))) for _ in range(3000)]
    text = bytearray(spec.read_bytes() if spec.exists() else b"")
    while len(text) < 16 * PIECE:
        text += b" ".join(rnd.choices(words, k=20000)) + b"\n"
    random_bytes = random.Random(7).randbytes(16 * PIECE)
    out = bytearray()
    k = 0
    while len(out) < total:
        kind = k % 5
        if kind in (0, 3) and binaries:
            off = (k * PIECE) % max(len(binaries) - PIECE, 1)
            out += binaries[off : off + PIECE]
        elif kind in (1, 4):
            off = (k * PIECE // 3) % (len(text) - PIECE)
            out += text[off : off + PIECE]
        else:
            off = (k * PIECE // 7) % (len(random_bytes) - PIECE)
            out += random_bytes[off : off + PIECE]
        k += 1
    return bytes(out[:total])


def race(total: int, rounds: int, contestants: dict[str, Work]) -> dict[str, list[tuple[float, float]]]:
    """Per-round (cpu, wall) time of each contestant, interleaved chunk by chunk (see the docstring)."""
    names = list(contestants)
    times = {name: [(0.0, 0.0)] * rounds for name in names}
    turn = 0
    for r in range(rounds):
        for off in range(0, total, CHUNK):
            length = min(CHUNK, total - off)
            turn += 1
            for name in names[turn % len(names):] + names[: turn % len(names)]:
                c, w = time.thread_time(), time.perf_counter()
                contestants[name](off, length)
                c, w = time.thread_time() - c, time.perf_counter() - w
                cpu, wall = times[name][r]
                times[name][r] = (cpu + c, wall + w)
    return times


def report(title: str, total: int, times: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """Print each contestant's figures; returns name -> (median CPU ratio, median wall ratio)."""
    print(title)
    print(f"  {'':28s} best wall   CPU ratio: median (min..max)   wall ratio: median")
    base = times[BASELINE]
    medians = {}
    for name, ts in times.items():
        cpu = [b[0] / t[0] for b, t in zip(base, ts, strict=True)]
        wall = [b[1] / t[1] for b, t in zip(base, ts, strict=True)]
        medians[name] = (statistics.median(cpu), statistics.median(wall))
        cpu_text = f"{medians[name][0]:5.2f} ({min(cpu):4.2f}..{max(cpu):4.2f})" if " t=" not in name or \
            name.endswith("t=1") else "  (threads: see wall)"
        print(f"  {name:28s} {total / min(t[1] for t in ts) / 1e6:7.0f} MB/s   {cpu_text:22s}"
              f"           {medians[name][1]:5.2f}")
    return medians


class SysLZ4:
    """The system liblz4 per block into one reused buffer (the codec ZFile's LZ4 path calls)."""

    def __init__(self) -> None:
        self.ffi = cffi.FFI()
        self.ffi.cdef("int LZ4_compress_default(const char* src, char* dst, int srcSize, int dstCapacity);"
                      "int LZ4_decompress_safe(const char* src, char* dst, int srcSize, int dstCapacity);")
        self.lib = self.ffi.dlopen("liblz4.so.1")
        self.out = bytearray(2 * BS)

    def compress(self, data: bytes, off: int, length: int) -> None:
        src, dst, comp = self.ffi.from_buffer(data), self.ffi.from_buffer(self.out), self.lib.LZ4_compress_default
        for o in range(off, off + length, BS):
            comp(src + o, dst, BS, len(self.out))

    def decompress(self, pieces: list[bytes], first: int, last: int) -> None:
        dst, dec = self.ffi.from_buffer(self.out), self.lib.LZ4_decompress_safe
        for p in pieces[first:last]:
            dec(p, dst, len(p), BS)


class SysZstd:
    def __init__(self) -> None:
        self.ffi = cffi.FFI()
        self.ffi.cdef("void* ZSTD_createDCtx(void);"
                      "size_t ZSTD_decompressDCtx(void*, void*, size_t, const void*, size_t);")
        self.lib = self.ffi.dlopen("libzstd.so.1")
        self.dctx = self.lib.ZSTD_createDCtx()
        self.out = bytearray(BS)

    def decompress(self, pieces: list[bytes], first: int, last: int) -> None:
        dst, dec, dctx = self.ffi.from_buffer(self.out), self.lib.ZSTD_decompressDCtx, self.dctx
        for p in pieces[first:last]:
            dec(dctx, dst, BS, p, len(p))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="extra ZFile rows with this many threads (1: none)")
    args = ap.parse_args()
    data = realistic_data(args.mib * PIECE)
    n = len(data)
    mv = memoryview(data)
    print(f"data: {n / PIECE:.0f} MiB, block {BS}, {args.rounds} rounds interleaved per {CHUNK >> 20} MiB chunk, "
          f"cpus {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f}")
    sys_lz4, sys_zstd = SysLZ4(), SysZstd()
    zc = zstandard.ZstdCompressor(level=3)
    zd = zstandard.ZstdDecompressor()
    bare: dict[str, tuple[Callable[[memoryview], bytes], Callable[[bytes], bytes]]] = {
        "lz4": (lambda b: lz4.block.compress(b, store_size=False),
                lambda c: lz4.block.decompress(c, uncompressed_size=BS)),
        "zstd": (zc.compress, zd.decompress),
    }
    thread_counts = [1] + ([args.threads] if args.threads > 1 else [])
    summary: list[str] = []
    for algo, (comp, decomp) in bare.items():
        def bare_compress(off: int, length: int, comp: Callable[[memoryview], bytes] = comp) -> object:
            return [comp(mv[o : o + BS]) for o in range(off, off + length, BS)]

        fns: dict[str, Work] = {BASELINE: bare_compress}
        if algo == "lz4":
            fns["bare sys-lib (cffi)"] = lambda off, length: sys_lz4.compress(data, off, length)
        for th in thread_counts:
            bc = zfile.BlockCompressor(algo, BS, threads=th)
            fns[f"ZFile compress_packed t={th}"] = lambda off, length, bc=bc: bc.compress_packed(mv[off : off + length])
        bc1 = zfile.BlockCompressor(algo, BS, threads=1)
        fns["ZFile compress (list) t=1"] = lambda off, length, bc1=bc1: bc1.compress(mv[off : off + length])
        med = report(f"{algo} compress:", n, race(n, args.rounds, fns))
        summary.append(f"{algo} compress {med['ZFile compress_packed t=1'][0]:.2f}")
        blob = zfile.compress_zfile(data, algo, BS)
        print(f"  compressed size {len(blob) / n:.3f} of input")

        reader = zfile.ZFileReader(blob, threads=1)
        assert reader.pread(0, n) == data
        pieces = [blob[reader.offsets[i] : reader.offsets[i + 1] - zfile.CRC_SIZE] for i in range(reader.block_count)]

        def bare_decompress(off: int, length: int, pieces: list[bytes] = pieces,
                            decomp: Callable[[bytes], bytes] = decomp) -> object:
            return [decomp(p) for p in pieces[off // BS : (off + length) // BS]]

        fns = {BASELINE: bare_decompress}
        sys_dec = sys_lz4.decompress if algo == "lz4" else sys_zstd.decompress
        fns["bare sys-lib (cffi)"] = lambda off, length, p=pieces, d=sys_dec: d(p, off // BS, (off + length) // BS)
        for th in thread_counts:
            r = zfile.ZFileReader(blob, threads=th)
            # 1 MiB reads, as consumers read (per mapping, flatten)
            fns[f"ZFile pread 1MiB t={th}"] = lambda off, length, r=r: [
                r.pread(o, PIECE) for o in range(off, off + length, PIECE)]
        buf = bytearray(PIECE)
        fns["ZFile preadinto 1MiB t=1"] = lambda off, length, r=reader, buf=buf: [
            r.preadinto(o, buf) for o in range(off, off + length, PIECE)]
        fns["ZFile pread 8MiB t=1"] = lambda off, length, r=reader: r.pread(off, length)
        med = report(f"{algo} decompress (ZFile checks every block CRC):", n, race(n, args.rounds, fns))
        summary.append(f"{algo} decompress {med['ZFile pread 1MiB t=1'][0]:.2f}")
    print("summary (median CPU ratio, 1 thread, vs bare per-block; target >= 0.80): " + ", ".join(summary))


if __name__ == "__main__":
    main()
