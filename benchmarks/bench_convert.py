"""End-to-end conversion benchmark of a realistic multi-layer image, against a baseline of the same run.

1. Builds (or reuses) the benchmark image (benchmarks/build_image.py: Debian bookworm minbase + pip
   package layers, >= 1 GiB uncompressed, tens of thousands of files), cached in benchmarks/.cache/.
2. Starts a local docker-registry on 127.0.0.1 (tests/services/registry.py) and pushes the image with skopeo.
3. Baseline, on the same layer blobs: stream-decompress + sha256 + LZ4-compress in 4 KiB blocks, with the
   same decompressor the pipeline uses, one process per layer over a pool as big as the pipeline's
   (os.cpu_count(), the runner's default): same layers, same machine, same run, same parallelism.
   It is measured again right before each conversion, so both see the same load from other work.
4. Runs the pipeline's local runner (`obdconv.pipeline.runner.convert`) for native (and turbo), timing each
   stage and the total, sampling peak RSS of this process plus all its children (psutil).
5. Prints seconds per stage (summed over tasks, so they add up to more than the wall time), total,
   baseline, ratio (target <= 1.5x) and peak RSS (target < 1 GiB); and CPU seconds of the converter
   (+ of the registry, which serves and stores the blobs) against the baseline's CPU seconds: on a
   shared machine wall ratios move with other load, the CPU ratio much less.

With `--repeat N` each format's (baseline, conversion) pair runs N times and a last line gives the
median of the ratios and of each stage: on a machine shared with other work one run can be far off.

Usage: python benchmarks/bench_convert.py [--formats native,turbo] [--repeat N] [--skip-convert] [--verify] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lz4.block
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import build_image  # noqa: E402  (benchmarks/ is not a package)

BLOCK = 4096
READ_CHUNK = 1 << 20
TARGET_RATIO = 1.5
TARGET_RSS = 1 << 30


# ---------------------------------------------------------------------------------------------- RSS


class PeakRSS:
    """Samples RSS of this process + all descendants every `interval` s; `.peak` in bytes.
    `exclude` pids (the registry we started) are not the converter's memory and are left out.

    Also `.cpu_s`: CPU seconds (user + system) the converter's processes used while sampled, from
    the last sample of each process (a pool worker's final < `interval` s is missed). CPU time
    hardly depends on what else runs on the machine, unlike wall time: on a shared machine it is
    the steadier measure of how much work a run does."""

    def __init__(self, interval: float = 0.05, exclude: frozenset[int] = frozenset()) -> None:
        self.interval = interval
        self.exclude = exclude
        self.peak = 0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._running = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_s(self) -> float:
        return sum(v - self._cpu_start.get(pid, 0.0) for pid, v in self._cpu_last.items())

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            if p.pid in self.exclude:
                continue
            try:
                total += p.memory_info().rss
                cpu = p.cpu_times()
                self._cpu_last[p.pid] = cpu.user + cpu.system
                if not self._running:  # the sample before the run: its baseline
                    self._cpu_start[p.pid] = self._cpu_last[p.pid]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = self._sample()
        self._running = True
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def process_cpu_s(pid: int) -> float:
    cpu = psutil.Process(pid).cpu_times()
    return cpu.user + cpu.system


# ---------------------------------------------------------------------------------------------- baseline


def _decompressor(head: bytes) -> Callable[[bytes], bytes]:
    """The pipeline's own streaming decompressor (same library, same speed) for a fair baseline."""
    from obdconv.oci.decompress import Decompressor, sniff

    d = Decompressor(sniff(head))
    return d.feed


def baseline_layer(path: str) -> tuple[float, int, str]:
    """Decompress + sha256 + LZ4 in 4 KiB blocks over one layer blob. Returns (seconds, raw bytes, diff_id)."""
    t0 = time.perf_counter()
    h = hashlib.sha256()
    carry = b""
    raw = 0
    with open(path, "rb") as f:
        first = f.read(READ_CHUNK)
        feed = _decompressor(first)
        chunk = first
        while chunk:
            out = feed(chunk)
            if out:
                h.update(out)
                raw += len(out)
                data = memoryview(carry + out) if carry else memoryview(out)
                whole = len(data) - len(data) % BLOCK
                for i in range(0, whole, BLOCK):
                    lz4.block.compress(data[i:i + BLOCK], store_size=False)
                carry = bytes(data[whole:])
            chunk = f.read(READ_CHUNK)
    if carry:
        lz4.block.compress(carry, store_size=False)
    return time.perf_counter() - t0, raw, "sha256:" + h.hexdigest()


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_baseline(paths: list[Path], workers: int) -> dict[str, Any]:
    """All layers over a pool of `workers` processes (the pipeline's pool has as many), so both
    sides have the same parallelism; the biggest layer bounds the baseline's wall time as it
    bounds the pipeline's. `cpu_s`: CPU seconds of the pool (its workers are reaped at shutdown)."""
    t0 = time.perf_counter()
    cpu0 = _children_cpu_s()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(baseline_layer, [str(p) for p in paths]))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cpu_s": _children_cpu_s() - cpu0, "cpu_sum_s": sum(r[0] for r in results),
            "raw_bytes": sum(r[1] for r in results), "diff_ids": [r[2] for r in results], "workers": workers}


# ---------------------------------------------------------------------------------------------- registry


@contextmanager
def local_registry(workdir: Path) -> Iterator[Any]:
    from tests.services.registry import start_registry

    service = start_registry(workdir / "registry")
    try:
        yield service
    finally:
        service.stop()


def push_image(layout: Path, tag: str, dest: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
                    f"docker://{dest}"], check=True)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- conversion


def run_conversion(repository: str, input_tag: str, fmt: str, workdir: Path) -> dict[str, Any]:
    """One conversion through the local runner; returns total seconds and the runner's stage timings."""
    from obdconv.pipeline import runner
    from obdconv.request import ConversionRequest, RegistryAccess

    out_tag = f"{input_tag}-{fmt}"
    request = ConversionRequest(
        repository=repository, input_tag=input_tag, oci=True,
        overlaybd_tag=out_tag if fmt == "native" else "", turbo_tag=out_tag if fmt == "turbo" else "",
        workdir=str(workdir / f"conv-{fmt}"), access=RegistryAccess(plain=True))
    t0 = time.perf_counter()
    result = runner.convert(request)
    total = time.perf_counter() - t0
    return {"format": fmt, "output_tag": out_tag, "total_s": total, "stages": _stage_times(result)}


def _stage_times(result: Any) -> dict[str, float]:
    """Stage seconds as the runner reports them (`timings`/`stage_seconds` mapping, on the result or
    on each per-profile result); empty when the runner reports none."""
    candidates = [result]
    if isinstance(result, (list, tuple)):
        candidates = list(result)
    elif isinstance(result, dict):
        candidates = [result, *result.values()]
    out: dict[str, float] = {}
    for c in candidates:
        for attr in ("timings", "stage_seconds", "stages"):
            t = c.get(attr) if isinstance(c, dict) else getattr(c, attr, None)
            if isinstance(t, dict):
                for k, v in t.items():
                    if isinstance(v, (int, float)):
                        out[k] = out.get(k, 0.0) + float(v)
    return out


def run_verify(registry_host: str, input_tag: str, fmt: str) -> dict[str, Any]:
    from obdconv.registry.options import RegistryOptions
    from obdconv.verify import verify_reference

    t0 = time.perf_counter()
    report = verify_reference(f"{registry_host}/bench:{input_tag}-{fmt}", f"{registry_host}/bench:{input_tag}",
                              RegistryOptions(plain=True))
    return {"ok": report.ok, "seconds": time.perf_counter() - t0,
            "summary": report.format_text(max_diff_lines=20).splitlines()[:40]}


# ---------------------------------------------------------------------------------------------- main


def print_medians(conversions: list[dict[str, Any]]) -> None:
    """One line per format: medians over its repeated runs (wall and CPU ratios, stage seconds)."""
    for fmt in dict.fromkeys(c["format"] for c in conversions):
        runs = [c for c in conversions if c["format"] == fmt]
        stages = {k: statistics.median(r["stages"].get(k, 0.0) for r in runs)
                  for k in runs[0]["stages"] if k != "total"}
        print(f"{fmt}: median of {len(runs)}: ratio {statistics.median(r['ratio'] for r in runs):.2f}x "
              f"(total {statistics.median(r['total_s'] for r in runs):.2f} s vs baseline "
              f"{statistics.median(r['baseline_s'] for r in runs):.2f} s), CPU ratio "
              f"{statistics.median(r['cpu_ratio'] for r in runs):.2f}x (converter "
              f"{statistics.median(r['cpu_s'] for r in runs):.2f} s + registry "
              f"{statistics.median(r['registry_cpu_s'] for r in runs):.2f} s vs baseline "
              f"{statistics.median(r['baseline_cpu_s'] for r in runs):.2f} s); peak RSS "
              f"{max(r['peak_rss_bytes'] for r in runs) / 2**20:.0f} MiB; stages: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="native,turbo", help="comma list of native, turbo")
    ap.add_argument("--skip-convert", action="store_true", help="image + registry + baseline only")
    ap.add_argument("--verify", action="store_true", help="also run `obdconv verify` on each result (slow)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="baseline processes")
    ap.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    ap.add_argument("--repeat", type=int, default=1, help="conversions per format (medians printed when > 1)")
    args = ap.parse_args()
    # SIGTERM (e.g. a timeout) must still run the `finally` that stops the registry we started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    summary = build_image.build(build_image.DEFAULT_CACHE, 1 << 30)
    layout = Path(summary["layout"])
    blobs = [layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1] for layer in summary["layers"]]
    results: dict[str, Any] = {
        "image": {k: summary[k] for k in ("rootfs_origin", "uncompressed_bytes", "compressed_bytes", "members")}
                 | {"layers": len(blobs)}}
    print(f"image: {len(blobs)} layers, {summary['uncompressed_bytes'] / 2**30:.2f} GiB uncompressed, "
          f"{summary['compressed_bytes'] / 2**20:.0f} MiB gzip, {summary['members']} tar entries; "
          f"rootfs: {summary['rootfs_origin']}")

    base = run_baseline(blobs, args.workers)
    expected = [layer["diff_id"] for layer in summary["layers"]]
    if base["diff_ids"] != expected:
        print("error: baseline diff_ids differ from the image's", file=sys.stderr)
        return 1
    results["baseline"] = base
    print(f"baseline (decompress + sha256 + LZ4 4 KiB, {base['workers']} procs): {base['wall_s']:.2f} s wall, "
          f"{base['cpu_sum_s']:.2f} s summed over layers, {base['raw_bytes'] / base['wall_s'] / 2**20:.0f} MiB/s")

    with tempfile.TemporaryDirectory(prefix="obdconv-bench-") as tmp, local_registry(Path(tmp)) as reg:
        push_s = push_image(layout, summary["tag"], f"{reg.host}/bench:src")
        results["push_source_s"] = push_s
        print(f"pushed source image to {reg.host}/bench:src in {push_s:.2f} s")
        if args.skip_convert:
            print("conversion skipped (--skip-convert)")
        else:
            results["conversions"] = []
            runs = [f.strip() for f in args.formats.split(",") if f.strip()] * max(1, args.repeat)
            for fmt in runs:
                # The machine is shared: measure the baseline right before each conversion, so the
                # ratio compares runs made under the same load.
                near = run_baseline(blobs, args.workers)
                registry_cpu0 = process_cpu_s(reg.process.pid)
                with PeakRSS(exclude=frozenset({reg.process.pid})) as rss:
                    conv = run_conversion(f"{reg.host}/bench", "src", fmt, Path(tmp))
                conv["peak_rss_bytes"] = rss.peak
                conv["baseline_s"] = near["wall_s"]
                conv["ratio"] = conv["total_s"] / near["wall_s"]
                conv["cpu_s"] = rss.cpu_s
                conv["registry_cpu_s"] = process_cpu_s(reg.process.pid) - registry_cpu0
                conv["baseline_cpu_s"] = near["cpu_s"]
                conv["cpu_ratio"] = conv["cpu_s"] / near["cpu_s"]
                results["conversions"].append(conv)
                stages = ", ".join(f"{k} {v:.2f} s" for k, v in conv["stages"].items() if k != "total") \
                    or "no stage timings reported"
                verdict = "OK" if conv["ratio"] <= TARGET_RATIO and rss.peak < TARGET_RSS else "MISSES TARGET"
                print(f"{fmt}: total {conv['total_s']:.2f} s ({stages}); ratio to baseline ({near['wall_s']:.2f} s) {conv['ratio']:.2f}x "
                      f"(target <= {TARGET_RATIO}x); peak RSS {rss.peak / 2**20:.0f} MiB (target < 1024 MiB): {verdict}")
                print(f"{fmt}: CPU {conv['cpu_s']:.2f} s (+ registry {conv['registry_cpu_s']:.2f} s) vs baseline CPU "
                      f"{near['cpu_s']:.2f} s: {conv['cpu_ratio']:.2f}x the work (wall ratios swing with other load "
                      "on the machine; this one does not)")
                if args.verify:
                    v = run_verify(reg.host, "src", fmt)
                    conv["verify"] = v
                    print(f"{fmt}: verify {'OK' if v['ok'] else 'FAILED'} in {v['seconds']:.1f} s")
                    if not v["ok"]:
                        print("\n".join("    " + line for line in v["summary"]))
            if args.repeat > 1:
                print_medians(results["conversions"])
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
