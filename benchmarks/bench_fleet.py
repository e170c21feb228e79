"""Fleet throughput and scaling: images/minute and the time of one many-layer image, with one
and with two workers (each a separate process with one pool slot), on this machine.

    .venv/bin/python benchmarks/bench_fleet.py [--images 6] [--layers 3] [--many-layers 12] [--mib 4]
    .venv/bin/python benchmarks/bench_fleet.py --workers 1,2,3 --json   # what capacity_model.py --validate takes

Each configuration gets a fresh fleet (Redis, SQLite, its own spool), so nothing is reused
between runs; images are `oci:` layouts (no registry in the way, no dedup). The baseline is the
one-worker fleet measured in the same run; the ratios are the scaling (ideal 2.0 on 2 free cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config.settings import load_settings
from obdconv.client import submit, wait
from obdconv.request import ConversionRequest
from workers.app import create_app
from workers.localfleet import LocalFleet
from workers.sample_image import build_sample_image


def build_images(layout: Path, images: int, layers: int, many_layers: int, file_bytes: int) -> None:
    for n in range(images):
        build_sample_image(layout, f"img{n}", layers=layers, file_bytes=file_bytes, seed=1000 + n)
    build_sample_image(layout, "many", layers=many_layers, file_bytes=file_bytes, seed=999)


def run(workers: int, source: Path, images: int, scratch: Path) -> tuple[float, float]:
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
        started = time.monotonic()
        result = wait(submit(ConversionRequest(f"oci:{layout}", input_tag="many", overlaybd_tag="many-obd"), app=app),
                      900, app=app, poll=0.05)
        if result["state"] != "SUCCESS":
            raise SystemExit(f"conversion failed: {result}")
        return batch, time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--many-layers", type=int, default=12)
    parser.add_argument("--mib", type=int, default=4, help="random MiB per layer (plus ~as much text)")
    parser.add_argument("--workers", default="1,2", help="fleet sizes to measure, the first is the baseline")
    parser.add_argument("--json", action="store_true", help="also print {workers: [batch s, many-layer s]}")
    args = parser.parse_args()
    sizes = [int(w) for w in args.workers.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        source = scratch / "source"
        build_images(source, args.images, args.layers, args.many_layers, args.mib << 20)
        results = {w: run(w, source, args.images, scratch) for w in sizes}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
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


if __name__ == "__main__":
    main()
