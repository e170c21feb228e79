"""obdconv against the machine's floor, measured in the same run (issue #14).

For each benchmark image (default: `big`, the 3 GB image with one 2.8 GB layer from
build_big_image.py, and `small`, the many-small-files image from build_image.py):

1. The bare steps, each alone in one thread of this process, on the same layer blobs: read +
   inflate with isal (what prepare uses), sha256 of the blob and of the tar, LZ4 of the tar in
   4 KiB blocks (python-lz4, one call per block), CRC32C and sha256 of that LZ4 output (standing in
   for the output blob), and read + inflate with zlib-ng (what turboOCI's gzip index uses). Each is
   timed in wall and in CPU seconds of its thread.
2. The floors, per format (cores = the CPUs this process may run on):
     native = max(largest layer's read + isal inflate, sum of every bare step / cores)
     turbo  = max(largest layer's read + zlib inflate, sum of (zlib inflate + both sha256s) / cores)
3. `obdconv convert` (the local runner, default settings) of the image from an OCI layout into the
   same layout, one format at a time: wall time, the CPU seconds of every process it ran, peak RSS
   of all of them together, and the runner's per-stage seconds (summed over tasks).
4. With --stages, the stages once more, one after the other in this process (prepare of each
   layer, the metadata pass, build, send), for the CPU seconds of each stage.

Prints, per image and format, obdconv's time next to the floor and their ratio (targets: native
<= 1.3x, turbo <= 1.15x; peak RSS <= 1 GiB) in wall time, and the same in CPU seconds (obdconv's
CPU against the bare steps' CPU): on a machine shared with other work the wall ratio moves with the
load, the CPU ratio much less. The load average is printed before and after. With --repeat N the
conversions run N times (the bare steps before each) and medians are printed.

Usage: .venv/bin/python benchmarks/bench_floor.py [--images big,small] [--formats native,turbo]
                                                  [--repeat N] [--stages] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c
import lz4.block
from isal import isal_zlib
from zlib_ng import zlib_ng

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import build_big_image  # noqa: E402  (benchmarks/ is not a package)
import build_image  # noqa: E402

READ_CHUNK = 1 << 20
BLOCK = 4096
TARGETS = {"native": 1.3, "turbo": 1.15}
TARGET_RSS = 1 << 30


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------------------------- bare steps


class Clock:
    """Wall and thread-CPU seconds accumulated over the timed sections of one step."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._w, self._c = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.thread_time() - self._c


def _chunks(path: Path, clock: Clock | None = None) -> Iterator[bytes]:
    timed = clock or contextlib.nullcontext()
    with open(path, "rb") as f:
        while True:
            with timed:
                chunk = f.read(READ_CHUNK)
            if not chunk:
                return
            yield chunk


def _inflated(path: Path, make: Callable[[], Any], clock: Clock | None = None) -> Iterator[bytes]:
    """The layer's tar, piece by piece; `clock` (if given) times the reads and the inflate."""
    timed = clock or contextlib.nullcontext()
    d = make()
    for chunk in _chunks(path, clock):
        while chunk:
            with timed:
                out = d.decompress(chunk)
            if out:
                yield out
            chunk = d.unused_data if d.eof else b""
            if d.eof:
                d = make()


def bare_layer(path: Path, turbo: bool) -> dict[str, dict[str, float]]:
    """Each bare step over one layer blob: {step: {"wall": s, "cpu": s}}."""
    steps: dict[str, Clock] = {name: Clock() for name in
                               ("read_inflate_isal", "sha256_blob", "sha256_tar", "lz4_4k", "crc32c", "sha256_out")}
    for _ in _inflated(path, lambda: isal_zlib.decompressobj(31), steps["read_inflate_isal"]):
        pass
    h = hashlib.sha256()
    for chunk in _chunks(path):
        with steps["sha256_blob"]:
            h.update(chunk)
    tar_hash, out_hash = hashlib.sha256(), hashlib.sha256()
    out_bytes = 0
    carry = b""
    compress = lz4.block.compress
    for piece in _inflated(path, lambda: isal_zlib.decompressobj(31)):
        with steps["sha256_tar"]:
            tar_hash.update(piece)
        data = carry + piece if carry else piece
        whole = len(data) - len(data) % BLOCK
        view = memoryview(data)
        with steps["lz4_4k"]:
            blocks = [compress(view[i:i + BLOCK], store_size=False) for i in range(0, whole, BLOCK)]
        carry = data[whole:]
        packed = b"".join(blocks)
        with steps["crc32c"]:
            crc32c.crc32c(packed)
        with steps["sha256_out"]:
            out_hash.update(packed)
        out_bytes += len(packed)
    if turbo:
        steps["read_inflate_zlib"] = Clock()
        for _ in _inflated(path, lambda: zlib_ng.decompressobj(31), steps["read_inflate_zlib"]):
            pass
    result = {k: {"wall": c.wall, "cpu": c.cpu} for k, c in steps.items()}
    result["lz4_out"] = {"bytes": out_bytes}
    return result


def disk_write(directory: Path, size: int) -> float:
    """Seconds to write `size` bytes to a new file in `directory` and fsync it: what storing a
    native output blob durably costs on this disk (not part of the CPU floor)."""
    block = bytes(4 << 20)
    path = directory / "disk-probe"
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = size
        while left > 0:
            left -= f.write(block[:min(left, len(block))])
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


NATIVE_STEPS = ("read_inflate_isal", "sha256_blob", "sha256_tar", "lz4_4k", "crc32c", "sha256_out")
TURBO_STEPS = ("read_inflate_zlib", "sha256_blob", "sha256_tar")


def floors(layers: list[dict[str, dict[str, float]]], n_cores: int) -> dict[str, dict[str, float]]:
    """{format: {"wall": floor s, "cpu": bare CPU s, "sequential": s, "parallel": s}} (floors in wall time)."""
    out: dict[str, dict[str, float]] = {}
    for fmt, steps, serial in (("native", NATIVE_STEPS, "read_inflate_isal"), ("turbo", TURBO_STEPS, "read_inflate_zlib")):
        if any(serial not in layer for layer in layers):
            continue
        sequential = max(layer[serial]["wall"] for layer in layers)
        total_wall = sum(layer[s]["wall"] for layer in layers for s in steps)
        total_cpu = sum(layer[s]["cpu"] for layer in layers for s in steps)
        out[fmt] = {"wall": max(sequential, total_wall / n_cores), "sequential": sequential,
                    "parallel": total_wall / n_cores, "cpu": total_cpu}
    return out


# ---------------------------------------------------------------------------------------------- obdconv


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def layout_copy(layout: Path, dest: Path) -> Path:
    """The layout with hard-linked blobs (conversions add blobs and rewrite index.json only)."""
    shutil.copytree(layout, dest, copy_function=_link_or_copy)
    index = dest / "index.json"
    data = index.read_bytes()
    index.unlink()
    index.write_bytes(data)
    return dest


class ProcessTree:
    """Peak RSS of a process and all its descendants together, and the CPU seconds each used,
    sampled every `interval` s from /proc (children lists, statm and stat only: psutil's
    children() scans every process of the machine, which costs more than this sampling should).
    A process's CPU is its last sample's: a worker's final < `interval` s may be missed (the
    runner's pool workers are children of multiprocessing's fork server, which is never waited
    for, so rusage of children does not see them)."""

    PAGE = os.sysconf("SC_PAGE_SIZE")
    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.cpu: dict[int, float] = {}
        self.role: dict[int, str] = {}
        self.peak_by_role: dict[str, int] = {}  # the largest single process of each role
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_s(self) -> float:
        return sum(self.cpu.values())

    def cpu_by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, cpu in self.cpu.items():
            role = self.role.get(pid, "other")
            out[role] = out.get(role, 0.0) + cpu
        return out

    def _role(self, pid: int) -> str:
        """What a process of the tree is: the runner itself, its pool workers (children of
        multiprocessing's fork server), the fork server, or multiprocessing's resource tracker."""
        if pid == self.pid:
            return "runner"
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            return "other"
        if b"forkserver" in cmd:
            return "forkserver"  # the server and its children share its command line until exec
        if b"resource_tracker" in cmd:
            return "resource tracker"
        return "other"

    def _tree(self, pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            try:
                for tid in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{tid}/children") as f:
                        children = [int(c) for c in f.read().split()]
                    for c in children:
                        if c not in self.role:  # the fork server's children are the pool workers
                            self.role[c] = "pool workers" if self.role.get(p) == "forkserver" else self._role(c)
                    todo.extend(children)
            except OSError:
                continue
        return out

    def sample(self) -> int:
        total = 0
        for p in self._tree(self.pid):
            try:
                with open(f"/proc/{p}/statm") as f:
                    rss = int(f.read().split()[1]) * self.PAGE
                total += rss
                role = self.role.get(p, "other")
                self.peak_by_role[role] = max(self.peak_by_role.get(role, 0), rss)
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                self.cpu[p] = (int(fields[11]) + int(fields[12])) / self.TICK  # utime + stime
            except (OSError, IndexError, ValueError):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> ProcessTree:
        self.role[self.pid] = "runner"
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def convert(layout: Path, tag: str, fmt: str, workdir: Path, python: str | None = None) -> dict[str, Any]:
    """`obdconv convert` in a child process, as a user runs it: wall time, CPU seconds of it and of
    every process it started, peak RSS of them together (see `ProcessTree`). `python` runs another
    obdconv install (e.g. a checkout of an older version) for a before/after comparison."""
    cmd = [python or sys.executable, "-m", "obdconv", "convert", "-r", f"oci:{layout}", "-i", tag, "--oci", "--json",
           "-d", str(workdir), "--overlaybd" if fmt == "native" else "--turboOCI", f"{tag}-{fmt}"]
    # As an installed obdconv runs: with its bytecode cached (a session may have turned that off).
    # Another install is run with the environment as it is (its tree is not ours to write to).
    env = dict(os.environ) if python else {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    # `python -m` puts the working directory first on sys.path: another install must not run from
    # this checkout (it would import this obdconv), so it runs from its work directory's parent.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=workdir.parent if python else ROOT, env=env)
    with ProcessTree(proc.pid) as tree:
        out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"obdconv convert failed ({proc.returncode}): {' '.join(cmd)}")
    tree.cpu[proc.pid] = _children_cpu() - cpu0  # exact for the process itself (waited for)
    result = json.loads(out)
    output = next(o for o in result["outputs"] if o["format"] == fmt)
    return {"format": fmt, "wall": wall, "cpu": tree.cpu_s, "peak_rss": tree.peak, "cpu_by_process": tree.cpu_by_role(),
            "peak_rss_by_process": tree.peak_by_role,
            "stages": {k: v for k, v in result["timings"].items() if k != "total"}, "digest": output["root_digest"]}


def stage_cpu(layout: Path, tag: str, fmt: str, workdir: Path) -> dict[str, float]:
    """CPU seconds of each stage, run one after the other in this process."""
    from obdconv.pipeline.assemble import build_layer, native_head_room, send_built
    from obdconv.pipeline.metadata import MetadataPass
    from obdconv.pipeline.plan import resolve_image
    from obdconv.pipeline.prepare import prepare_layer
    from obdconv.registry import open_repository
    from obdconv.request import ConversionProfile

    repo = open_repository(f"oci:{layout}")
    plan = resolve_image(repo, tag, [])
    m = next(iter(plan.manifests.values()))
    profile = ConversionProfile(format=fmt)
    out: dict[str, float] = {}

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        c = time.process_time()
        result = fn()
        out[stage] = out.get(stage, 0.0) + time.process_time() - c
        return result

    def head_room(i: int) -> int:  # as the runner leaves it (inplace.py)
        return native_head_room([profile], True, repo, m.chain_ids, i)

    prepared = [timed("prepare", lambda d=d, i=i: prepare_layer(repo, d, workdir / "spool", native=fmt == "native",
                                                                turbo=fmt == "turbo", head_room=head_room(i),
                                                                early_writeback=True))
                for i, d in enumerate(m.layers)]
    with MetadataPass(64, m.chain_ids, workdir / "meta") as metadata_pass:
        applied = [timed("metadata", lambda p=p: metadata_pass.apply(p)) for p in prepared]
    for i, (p, a) in enumerate(zip(prepared, applied, strict=True)):
        built = timed("build", lambda p=p, a=a, i=i: build_layer(p, a, profile, m.chain_ids[i],
                                                                 m.chain_ids[i - 1] if i else "", workdir / "built"))
        pending = timed("send", lambda b=built: send_built(b, repo))
        pending.cancel()
    return out


# ---------------------------------------------------------------------------------------------- main


def image_summary(name: str) -> dict[str, Any]:
    if name == "big":
        return build_big_image.build()
    if name == "small":
        return build_image.build(build_image.DEFAULT_CACHE, 1 << 30)
    raise SystemExit(f"unknown image {name!r} (big or small)")


def fmt_steps(layers: list[dict[str, dict[str, float]]]) -> str:
    names = [k for k in dict.fromkeys(k for layer in layers for k in layer) if k != "lz4_out"]
    return ", ".join(f"{k} {sum(layer.get(k, {}).get('cpu', 0.0) for layer in layers):.2f}" for k in names)


def report(name: str, runs: list[dict[str, Any]], floor: list[dict[str, dict[str, float]]]) -> None:
    for fmt in dict.fromkeys(r["format"] for r in runs):
        mine = [r for r in runs if r["format"] == fmt]
        f_wall = statistics.median(f[fmt]["wall"] for f in floor)
        f_cpu = statistics.median(f[fmt]["cpu"] for f in floor)
        wall = statistics.median(r["wall"] for r in mine)
        cpu = statistics.median(r["cpu"] for r in mine)
        ratio = statistics.median(r["wall"] / r["floor"]["wall"] for r in mine)
        cpu_ratio = statistics.median(r["cpu"] / r["floor"]["cpu"] for r in mine)
        rss = max(r["peak_rss"] for r in mine)
        stages = {k: statistics.median(r["stages"].get(k, 0.0) for r in mine) for k in mine[0]["stages"]}
        verdict = "OK" if ratio <= TARGETS[fmt] and rss <= TARGET_RSS else "MISSES TARGET"
        print(f"{name} {fmt} (median of {len(mine)}): obdconv {wall:.2f} s vs floor {f_wall:.2f} s: "
              f"{ratio:.2f}x (target <= {TARGETS[fmt]}x); CPU {cpu:.2f} s vs bare {f_cpu:.2f} s: {cpu_ratio:.2f}x; "
              f"peak RSS {rss / 2**20:.0f} MiB: {verdict}")
        print("    runner stages (s, summed over tasks): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
        by_process = {k: statistics.median(r["cpu_by_process"].get(k, 0.0) for r in mine)
                      for k in mine[0]["cpu_by_process"]}
        print("    CPU by process (s): " + ", ".join(f"{k} {v:.2f}" for k, v in by_process.items() if v))
        if "stage_cpu" in mine[0]:
            print("    stage CPU (s, in-process): " + ", ".join(f"{k} {v:.2f}" for k, v in mine[0]["stage_cpu"].items()))
        digests = {r["digest"] for r in mine}
        print(f"    output {fmt} digest: {', '.join(sorted(digests))}" + ("" if len(digests) == 1 else "  DIFFERS"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="big,small", help="comma list of big, small")
    ap.add_argument("--formats", default="native,turbo", help="comma list of native, turbo")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--stages", action="store_true", help="also the CPU of each stage, run in this process")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--python", default=None,
                    help="the Python of another obdconv install to measure instead of this checkout's")
    ap.add_argument("--workdir", default=None,
                    help="where the layout copies and work directories go (default: the system temp dir; on "
                         "another filesystem than benchmarks/.cache the source blobs are copied, not linked)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    n_cores = cores()
    results: dict[str, Any] = {"cores": n_cores, "images": {}}
    print(f"cores: {n_cores}; load average at start: {load_average()}")
    for name in [i.strip() for i in args.images.split(",") if i.strip()]:
        summary = image_summary(name)
        layout = Path(summary["layout"])
        blobs = [layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1] for layer in summary["layers"]]
        print(f"{name}: {len(blobs)} layers, {summary['uncompressed_bytes'] / 2**30:.2f} GiB tar, "
              f"{summary['compressed_bytes'] / 2**20:.0f} MiB gzip, {summary['members']} entries; largest layer "
              f"{max(x['uncompressed_size'] for x in summary['layers']) / 2**30:.2f} GiB")
        runs: list[dict[str, Any]] = []
        floor_runs: list[dict[str, dict[str, float]]] = []
        with tempfile.TemporaryDirectory(prefix="obdconv-floor-", dir=args.workdir) as tmp:
            for k in range(max(1, args.repeat)):
                bare = [bare_layer(b, "turbo" in formats) for b in blobs]
                floor = floors(bare, n_cores)
                floor_runs.append(floor)
                out_bytes = sum(layer["lz4_out"]["bytes"] for layer in bare)
                disk = disk_write(Path(tmp), out_bytes)
                print(f"  disk: writing + fsync of {out_bytes / 2**20:.0f} MiB (about the native output) takes "
                      f"{disk:.2f} s here, outside the CPU floor; an OCI layout fsyncs every blob it stores")
                print(f"  bare steps, CPU s over all layers: {fmt_steps(bare)}; floors: "
                      + ", ".join(f"{f} {v['wall']:.2f} s (sequential {v['sequential']:.2f}, parallel "
                                  f"{v['parallel']:.2f})" for f, v in floor.items()))
                for fmt in formats:
                    work = Path(tmp) / f"{fmt}-{k}"
                    conv = convert(layout_copy(layout, work / "image"), summary["tag"], fmt, work / "work", args.python)
                    conv["floor"] = floor[fmt]
                    if args.stages and k == 0 and not args.python:  # stages run this checkout's code
                        conv["stage_cpu"] = stage_cpu(work / "image", summary["tag"], fmt, work / "stages")
                    shutil.rmtree(work, ignore_errors=True)
                    runs.append(conv)
                    print(f"  {fmt}: {conv['wall']:.2f} s ({conv['wall'] / floor[fmt]['wall']:.2f}x floor), "
                          f"CPU {conv['cpu']:.2f} s ({conv['cpu'] / floor[fmt]['cpu']:.2f}x bare), peak RSS "
                          f"{conv['peak_rss'] / 2**20:.0f} MiB; load {load_average()}")
        report(name, runs, floor_runs)
        results["images"][name] = {"runs": runs, "floors": floor_runs}
    print(f"load average at end: {load_average()}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
