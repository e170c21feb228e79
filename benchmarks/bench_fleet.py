"""Fleet throughput and scaling, on this machine. Three sections (`--sections`, default throughput):

  throughput  images/minute and the time of one many-layer image with one and with two workers
              (each a separate process with one pool slot); the first fleet size is the baseline.
  ten         one image of 10 equal layers on one worker and on two, each worker pinned to its own
              CPU (`sched_setaffinity` on the worker's processes and threads, as if each were a
              one-core machine): the speed-up of adding a worker (issue #14's target: >= 1.7x).
  big         the 3 GB benchmark image (build_big_image.py, scaled by --big-scale), dominated by one
              layer, on one worker that may use every CPU: the cores it keeps busy (the worker's CPU
              seconds over the conversion's wall time; a worker prepares one layer on all its
              cores, issue #14), with one prepare thread as the same run's baseline.

    .venv/bin/python benchmarks/bench_fleet.py [--images 6] [--layers 3] [--many-layers 12] [--mib 4]
    .venv/bin/python benchmarks/bench_fleet.py --workers 1,2,3 --json   # what capacity_model.py --validate takes
    .venv/bin/python benchmarks/bench_fleet.py --sections ten,big [--ten-mib 32] [--repeat 5] [--big-scale 0.25]

Each configuration gets a fresh fleet (Redis, SQLite, its own spool), so nothing is reused
between runs; images are `oci:` layouts (no registry in the way, no dedup). The ratios are the
scaling (ideal 2.0 on 2 free cores). The load average is printed with each section: on a shared
machine the other work takes CPU the workers would use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from config.settings import load_settings
from obdconv.client import submit, wait
from obdconv.request import ConversionRequest
from workers.app import create_app
from workers.localfleet import LocalFleet
from workers.sample_image import build_sample_image

TICK = os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` and of the processes below it on `cpus` (threads and processes made
    later inherit it)."""
    for p in tree(pid):
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                os.sched_setaffinity(int(tid), cpus)
        except OSError:
            continue


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        for q in tree(p):
            try:
                with open(f"/proc/{q}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / TICK
            except (OSError, IndexError, ValueError):
                continue
    return total


def worker_pids(fleet: LocalFleet) -> list[int]:
    return [c.proc.pid for c in fleet.children if c.name.startswith("worker")]


def convert(app: object, layout: Path, tag: str) -> float:
    started = time.monotonic()
    result = wait(submit(ConversionRequest(f"oci:{layout}", input_tag=tag, overlaybd_tag=f"{tag}-obd"), app=app),
                  900, app=app, poll=0.05)
    if result["state"] != "SUCCESS":
        raise SystemExit(f"conversion failed: {result}")
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------- throughput


def throughput(workers: int, source: Path, images: int, scratch: Path) -> tuple[float, float]:
    """(seconds for `images` images submitted at once, seconds for the many-layer image)."""
    directory = scratch / f"fleet-{workers}"
    layout = directory / "images"
    shutil.copytree(source, layout)
    with LocalFleet(directory, workers=workers, concurrency=1, flower=False) as fleet:
        app = create_app(load_settings(env=fleet.env()))
        started = time.monotonic()
        ids = [submit(ConversionRequest(f"oci:{layout}", input_tag=f"img{n}", overlaybd_tag=f"img{n}-obd"), app=app)
               for n in range(images)]
        for request_id in ids:
            result = wait(request_id, 900, app=app, poll=0.05)
            if result["state"] != "SUCCESS":
                raise SystemExit(f"conversion failed: {result}")
        batch = time.monotonic() - started
        return batch, convert(app, layout, "many")


def section_throughput(args: argparse.Namespace, scratch: Path) -> None:
    source = scratch / "source"
    for n in range(args.images):
        build_sample_image(source, f"img{n}", layers=args.layers, file_bytes=args.mib << 20, seed=1000 + n)
    build_sample_image(source, "many", layers=args.many_layers, file_bytes=args.mib << 20, seed=999)
    sizes = [int(w) for w in args.workers.split(",")]
    results = {w: throughput(w, source, args.images, scratch) for w in sizes}
    print(f"images: {args.images} x {args.layers} layers; many-layer image: {args.many_layers} layers; "
          f"{args.mib} MiB random + text per layer")
    b1, m1 = results[sizes[0]]
    for w in sizes:
        b, m = results[w]
        print(f"{w} worker{'s' if w > 1 else ' '}: {60 * args.images / b:7.1f} images/min ({b:6.2f} s); "
              f"many-layer image {m:6.2f} s; scaling vs {sizes[0]}: throughput x{b1 / b:.2f}, "
              f"many-layer image x{m1 / m:.2f}")
    if args.json:
        print(json.dumps({w: [round(b, 2), round(m, 2)] for w, (b, m) in results.items()}))


# ---------------------------------------------------------------------------------------------- ten layers


def ten_layers(workers: int, source: Path, scratch: Path) -> tuple[float, float]:
    """(seconds, worker CPU seconds) of the 10-layer image on `workers` workers, worker i pinned to CPU i."""
    directory = scratch / f"ten-{workers}"
    layout = directory / "images"
    shutil.copytree(source, layout)
    cpus = sorted(os.sched_getaffinity(0))
    with LocalFleet(directory, workers=workers, concurrency=1, flower=False) as fleet:
        for i, pid in enumerate(worker_pids(fleet)):
            pin(pid, {cpus[i % len(cpus)]})
        app = create_app(load_settings(env=fleet.env()))
        convert(app, layout, "warmup")  # imports, connections, first task of each worker
        cpu0 = cpu_seconds(worker_pids(fleet))
        seconds = convert(app, layout, "ten")
        return seconds, cpu_seconds(worker_pids(fleet)) - cpu0


def section_ten(args: argparse.Namespace, scratch: Path) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        print("ten: skipped (needs 2 CPUs to pin two workers apart)")
        return
    source = scratch / "ten-source"
    build_sample_image(source, "ten", layers=10, file_bytes=args.ten_mib << 20, seed=10)
    build_sample_image(source, "warmup", layers=2, file_bytes=1 << 20, seed=11)
    print(f"ten: 10 layers of {args.ten_mib} MiB random + {args.ten_mib} MiB text, each worker pinned to one CPU; "
          f"load {load_average()}")
    speedups = []
    for run in range(args.repeat):
        one, one_cpu = ten_layers(1, source, scratch / f"run{run}")
        two, two_cpu = ten_layers(2, source, scratch / f"run{run}")
        speedups.append(one / two)
        print(f"  1 worker : {one:6.2f} s (workers' CPU {one_cpu:6.2f} s)")
        print(f"  2 workers: {two:6.2f} s (workers' CPU {two_cpu:6.2f} s)")
        print(f"  speed-up x{one / two:.2f} (target >= 1.7); load {load_average()}")
    if args.repeat > 1:
        print(f"  median speed-up of {args.repeat} runs x{statistics.median(speedups):.2f} "
              f"(min x{min(speedups):.2f}, max x{max(speedups):.2f})")


# ---------------------------------------------------------------------------------------------- one big layer


def section_big(args: argparse.Namespace, scratch: Path) -> None:
    """The 3 GB-class benchmark image (build_big_image.py) scaled by --big-scale: one dominant
    layer with realistic content, so its prepare is most of the conversion."""
    import build_big_image

    summary = build_big_image.build(scale=args.big_scale)
    directory = scratch / "big"
    layout = directory / "images"
    shutil.copytree(summary["layout"], layout)
    source = scratch / "big-warmup"
    build_sample_image(source, "warmup", layers=1, file_bytes=1 << 20, seed=13)
    shutil.copytree(source / "blobs", layout / "blobs", dirs_exist_ok=True)
    tag_index = json.loads((source / "index.json").read_text())["manifests"]
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    index["manifests"] += tag_index
    index_path.write_text(json.dumps(index))
    n_cpus = len(os.sched_getaffinity(0))
    largest = max(x["uncompressed_size"] for x in summary["layers"])
    print(f"big: the benchmark image at scale {args.big_scale} (largest layer {largest / 2**20:.0f} MiB of "
          f"{summary['uncompressed_bytes'] / 2**20:.0f} MiB) on one worker with {n_cpus} CPUs; load {load_average()}")
    # The same with one prepare thread (OBDCONV_PREPARE_THREADS=1, the workers inherit it): the
    # baseline of the same run.
    for threads in ("", "1"):
        if threads:
            os.environ["OBDCONV_PREPARE_THREADS"] = threads
        try:
            with LocalFleet(directory / f"fleet{threads or 'all'}", workers=1, concurrency=1, flower=False) as fleet:
                app = create_app(load_settings(env=fleet.env()))
                convert(app, layout, "warmup")
                cpu0 = cpu_seconds(worker_pids(fleet))
                seconds = convert(app, layout, summary["tag"])
                cpu = cpu_seconds(worker_pids(fleet)) - cpu0
        finally:
            os.environ.pop("OBDCONV_PREPARE_THREADS", None)
        what = "one prepare thread" if threads else "prepare threads on every CPU"
        print(f"  {what:28s}: {seconds:6.2f} s, the worker's CPU {cpu:6.2f} s: {cpu / seconds:.2f} of {n_cpus} "
              f"cores busy on average (the whole conversion); load {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="throughput", help="comma list of throughput, ten, big")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--many-layers", type=int, default=12)
    parser.add_argument("--mib", type=int, default=4, help="random MiB per layer (plus ~as much text)")
    parser.add_argument("--workers", default="1,2", help="throughput: fleet sizes to measure, the first is the baseline")
    parser.add_argument("--json", action="store_true", help="throughput: also print {workers: [batch s, many-layer s]}")
    parser.add_argument("--ten-mib", type=int, default=32, help="random MiB per layer of the 10-layer image")
    parser.add_argument("--repeat", type=int, default=1, help="ten: runs of 1 and 2 workers (the median is printed)")
    parser.add_argument("--big-scale", type=float, default=0.25,
                        help="scale of the 3 GB benchmark image for the big section (1 = the whole image)")
    args = parser.parse_args()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    scratch = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        if "throughput" in sections:
            section_throughput(args, scratch)
        if "ten" in sections:
            section_ten(args, scratch)
        if "big" in sections:
            section_big(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
