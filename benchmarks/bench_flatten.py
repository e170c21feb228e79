"""`--flatten` against the layered output of the same many-layer image, measured in the same run.

The image (built here, deterministic, into an OCI layout): `--layers` gzip layers (default 24), each
adding `--files` files of `--file-kib` KiB (half random, half text: compressible about 2x), and from
the third layer on also replacing a quarter of the files of two layers below and deleting (whiteout)
a tenth of the files of the layer below that. So the layered image carries every replaced and
deleted byte; the flattened one must carry only the final filesystem.

Prints, per output: blob bytes (layered: the sum of its layer blobs) and the flattened/layered
ratio; conversion wall and CPU seconds, median of `--rounds` alternating runs, and the
flattened/layered ratios. By default the runner converts in this process (`--workers 1`), so the
CPU time is all of it; with a process pool (`--workers N`, N != 1) only wall time is printed (the
pool's processes are children of multiprocessing's fork server, not of this process). Timings on a
shared machine are noisy: the CPU-time ratio is the steadier figure.

Usage: python benchmarks/bench_flatten.py [--layers 24] [--files 24] [--file-kib 256] [--rounds 2] [--workers 1]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

MTIME = 1_700_000_000


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def _blob(blobs: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return "sha256:" + digest


def _payload(rng: random.Random, size: int) -> bytes:
    half = size // 2
    words = b"".join(rng.choice((b"alpha ", b"beta ", b"gamma ", b"delta\n")) for _ in range((size - half) // 6 + 1))
    return rng.randbytes(half) + words[:size - half]


def build_image(root: Path, layers: int, files: int, file_kib: int) -> tuple[str, int]:
    """An OCI layout at `root` with one image tagged "src"; returns (tag, total source blob bytes)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    rng = random.Random(20240301)
    descriptors, diff_ids, total = [], [], 0
    for n in range(layers):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), MTIME, 0o644
                tar.addfile(info, io.BytesIO(data))

            dirinfo = tarfile.TarInfo(f"l{n}")
            dirinfo.type, dirinfo.mtime, dirinfo.mode = tarfile.DIRTYPE, MTIME, 0o755
            tar.addfile(dirinfo)
            for f in range(files):
                add(f"l{n}/f{f}", _payload(rng, file_kib * 1024))
            if n >= 2:
                for f in range(0, files, 4):  # replace a quarter of layer n-2's files
                    add(f"l{n - 2}/f{f}", _payload(rng, file_kib * 1024))
            if n >= 3:
                for f in range(1, files, 10):  # delete a tenth of layer n-3's files
                    add(f"l{n - 3}/.wh.f{f}", b"")
        raw = buf.getvalue()
        blob = gzip.compress(raw, compresslevel=1, mtime=0)
        total += len(blob)
        descriptors.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _blob(blobs, blob),
                            "size": len(blob)})
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": _blob(blobs, config), "size": len(config)},
                           "layers": descriptors}).encode()
    index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                "digest": _blob(blobs, manifest), "size": len(manifest),
                                                "annotations": {"org.opencontainers.image.ref.name": "src"}}]}
    (root / "index.json").write_text(json.dumps(index))
    return "src", total


def convert(layout: Path, tag: str, out: str, flatten: bool, workdir: Path, workers: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, output layer bytes)."""
    from obdconv.pipeline.runner import RunnerOptions
    from obdconv.pipeline.runner import convert as run
    from obdconv.request import ConversionRequest

    request = ConversionRequest(repository=f"oci:{layout}", input_tag=tag, overlaybd_tag=out, flatten=flatten,
                                workdir=str(workdir))
    cpu, wall = _cpu(), time.perf_counter()
    result = run(request, options=RunnerOptions(workers=workers))
    wall, cpu = time.perf_counter() - wall, _cpu() - cpu
    manifest_digest = result.output("native").root_digest
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest.partition(":")[2]).read_bytes())
    return wall, cpu, sum(d["size"] for d in manifest["layers"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--files", type=int, default=24)
    ap.add_argument("--file-kib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="runner processes (1: in this process, CPU measured)")
    args = ap.parse_args()
    if args.layers < 20:
        print("note: the issue asks for >= 20 layers", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="obdconv-bench-flatten-") as tmp:
        work = Path(tmp)
        layout = work / "layout"
        tag, source_bytes = build_image(layout, args.layers, args.files, args.file_kib)
        print(f"image: {args.layers} layers, {source_bytes / 2**20:.1f} MiB of gzip blobs "
              f"({args.files} x {args.file_kib} KiB new files per layer; a quarter replaced two layers up, "
              "a tenth deleted three layers up)")
        runs: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
        for r in range(args.rounds):
            for flat in (False, True):  # alternate, so drifting machine load hits both alike
                name = f"{'flat' if flat else 'layered'}-{r}"
                runs[flat].append(convert(layout, tag, name, flat, work / name, args.workers))
        sizes = {flat: runs[flat][0][2] for flat in runs}
        assert all(x[2] == sizes[flat] for flat in runs for x in runs[flat]), "output size changed between runs"
        wall = {flat: statistics.median(x[0] for x in runs[flat]) for flat in runs}
        cpu = {flat: statistics.median(x[1] for x in runs[flat]) for flat in runs}
        measured = args.workers == 1

        def cpu_text(flat: bool) -> str:
            return f", {cpu[flat]:6.2f} s CPU" if measured else ""

        print(f"layered:   {sizes[False] / 2**20:8.1f} MiB in {args.layers} layer blobs; "
              f"{wall[False]:6.2f} s wall{cpu_text(False)}")
        print(f"flattened: {sizes[True] / 2**20:8.1f} MiB in 1 layer blob;  {wall[True]:6.2f} s wall{cpu_text(True)}")
        print(f"ratio flattened/layered: size {sizes[True] / sizes[False]:.3f}, wall {wall[True] / wall[False]:.2f}"
              + (f", CPU {cpu[True] / cpu[False]:.2f}" if measured else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
