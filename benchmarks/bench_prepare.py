"""Per-layer stage benchmark of the pipeline: prepare and assemble against a baseline, one process.

For each layer of the cached benchmark image (benchmarks/build_image.py; or any OCI layout given
with --layout/--tag), in ONE process:
  baseline  read the blob + inflate (isal) + sha256 + LZ4 in 4 KiB blocks (the irreducible work);
  prepare   obdconv.pipeline.prepare.prepare_layer(native=True) (adds the tar scan, data area,
            spool writes and the digest check of the blob);
  assemble  obdconv.pipeline.assemble.assemble_layer without upload (hashes the blob it would send)
            using metadata from one in-order metadata pass (timed separately);
  prepare/py  (with --python-scanner) prepare again with the tar scanner's C fast path off (what
            OBDCONV_TARSCAN_NO_FAST=1 gives): the "before" figure of the fast path, in the same run.
Prints MiB/s of the uncompressed tar for each and the ratios to the baseline, in wall time and in CPU
time of this process (on a shared machine the CPU ratio moves much less with other load). With
--repeat N each layer's baseline and prepare runs are timed N times and the fastest run counts.

Usage: python benchmarks/bench_prepare.py [--layout PATH --tag TAG] [--layers N] [--repeat N] [--python-scanner]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import lz4.block
from isal import isal_zlib

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from obdconv.oci import tarscan  # noqa: E402
from obdconv.pipeline.assemble import assemble_layer  # noqa: E402
from obdconv.pipeline.metadata import MetadataPass  # noqa: E402
from obdconv.pipeline.plan import resolve_image  # noqa: E402
from obdconv.pipeline.prepare import prepare_layer  # noqa: E402
from obdconv.registry import open_repository  # noqa: E402
from obdconv.request import ConversionProfile  # noqa: E402

CHUNK = 1 << 20
BLOCK = 4096
T = TypeVar("T")


def timed(fn: Callable[[], T], repeat: int) -> tuple[float, float, T]:
    """(wall s, CPU s, result) of the fastest (by wall time) of `repeat` runs of `fn`."""
    best: tuple[float, float, T] | None = None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        run = (time.perf_counter() - wall, time.process_time() - cpu, result)
        if best is None or run[0] < best[0]:
            best = run
    assert best is not None
    return best


def baseline(path: Path) -> int:
    inflater = isal_zlib.decompressobj(31)
    h = hashlib.sha256()
    pending = b""
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            data = inflater.decompress(chunk)
            h.update(data)
            size += len(data)
            buf = pending + data
            whole = len(buf) - len(buf) % BLOCK
            for off in range(0, whole, BLOCK):
                lz4.block.compress(buf[off:off + BLOCK], store_size=False)
            pending = buf[whole:]
    return size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default=str(HERE / ".cache" / "image"))
    ap.add_argument("--tag", default="bench")
    ap.add_argument("--layers", type=int, default=0, help="only the first N layers (0 = all)")
    ap.add_argument("--repeat", type=int, default=1, help="time baseline and prepare N times, keep the fastest")
    ap.add_argument("--python-scanner", action="store_true",
                    help="also time prepare with the tar scanner's C fast path off")
    args = ap.parse_args()
    layout = Path(args.layout)
    if not (layout / "index.json").exists():
        print(f"no OCI layout at {layout}: run benchmarks/build_image.py first or pass --layout", file=sys.stderr)
        return 1
    repo = open_repository(f"oci:{layout}")
    plan = resolve_image(repo, args.tag)
    m = next(iter(plan.manifests.values()))
    layers = m.layers[: args.layers or None]
    profile = ConversionProfile()
    totals = {"baseline": 0.0, "prepare": 0.0, "metadata": 0.0, "assemble": 0.0}
    cpu = {"baseline": 0.0, "prepare": 0.0}
    if args.python_scanner:
        totals["prepare_py"] = cpu["prepare_py"] = 0.0
    raw_total = 0
    fast_scanner = tarscan.FAST
    with tempfile.TemporaryDirectory(prefix="obdconv-bench-prepare-") as tmp:
        prepared = []

        def prepare(layer: dict[str, object], spool: Path) -> object:
            shutil.rmtree(spool, ignore_errors=True)  # a repeat must not reuse the layer's spool
            return prepare_layer(repo, layer, spool, native=True, turbo=False)

        for layer in layers:
            blob = layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
            base_s, base_cpu, raw = timed(lambda blob=blob: baseline(blob), args.repeat)
            spool = Path(tmp) / "spool" / layer["digest"][7:19]
            prep_s, prep_cpu, p = timed(lambda layer=layer, spool=spool: prepare(layer, spool), args.repeat)
            prepared.append(p)
            raw_total += raw
            totals["baseline"] += base_s
            totals["prepare"] += prep_s
            cpu["baseline"] += base_cpu
            cpu["prepare"] += prep_cpu
            line = (f"layer {layer['digest'][7:19]} {raw / 2**20:8.1f} MiB tar: baseline {raw / base_s / 2**20:6.1f} "
                    f"MiB/s, prepare {raw / prep_s / 2**20:6.1f} MiB/s, ratio {prep_s / base_s:.2f}x "
                    f"(CPU {prep_cpu / base_cpu:.2f}x)")
            if args.python_scanner:
                tarscan.FAST = None
                try:
                    py_s, py_cpu, _ = timed(lambda layer=layer: prepare(layer, Path(tmp) / "spool-py"), args.repeat)
                finally:
                    tarscan.FAST = fast_scanner
                totals["prepare_py"] += py_s
                cpu["prepare_py"] += py_cpu
                line += f"; python scanner ratio {py_s / base_s:.2f}x (CPU {py_cpu / base_cpu:.2f}x)"
            print(line)
        t = time.perf_counter()
        with MetadataPass(profile.vsize_gb, m.chain_ids, Path(tmp) / "meta") as metadata_pass:
            metadata = [metadata_pass.apply(p) for p in prepared]
        totals["metadata"] = time.perf_counter() - t
        for i, (p, md) in enumerate(zip(prepared, metadata, strict=True)):
            t = time.perf_counter()
            assemble_layer(p, md, profile, m.chain_ids[i], m.chain_ids[i - 1] if i else "", repo, upload=False)
            totals["assemble"] += time.perf_counter() - t
    mib = raw_total / 2**20
    print(f"total {mib:.1f} MiB tar: " + ", ".join(f"{k} {v:.2f} s ({mib / v:.0f} MiB/s)" for k, v in totals.items()))
    print(f"CPU: baseline {cpu['baseline']:.2f} s, prepare {cpu['prepare']:.2f} s = "
          f"{cpu['prepare'] / cpu['baseline']:.2f}x" + (
              f"; python scanner {cpu['prepare_py']:.2f} s = {cpu['prepare_py'] / cpu['baseline']:.2f}x"
              if args.python_scanner else ""))
    if args.python_scanner:
        print(f"prepare with the python scanner / baseline = {totals['prepare_py'] / totals['baseline']:.2f}x")
    print(f"prepare / baseline = {totals['prepare'] / totals['baseline']:.2f}x; "
          f"(prepare + metadata + assemble) / baseline = "
          f"{(totals['prepare'] + totals['metadata'] + totals['assemble']) / totals['baseline']:.2f}x")
    print(json.dumps({k: round(v, 3) for k, v in totals.items()} | {f"cpu_{k}": round(v, 3) for k, v in cpu.items()}
                     | {"tar_mib": round(mib, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
