"""What checking a prepared spool before reuse costs, against preparing the layer (issue #13, defect 7).

Builds a gzip layer (--size-mib of files, half random, half compressible) in an OCI layout, then:

  prepare   prepare_layer, native + turbo (download from the layout, inflate, scan, compress blocks)
  check     check_prepared on the result: sha256 of the small files, CRC32C of every block (best of N)

and prints both in seconds (wall, page cache warm) and the check as a fraction of prepare.

    .venv/bin/python benchmarks/bench_spoolcheck.py [--size-mib 256] [--runs 3]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import tarfile
import tempfile
import time
from pathlib import Path

from obdconv.pipeline.prepare import check_prepared, prepare_layer
from obdconv.registry import open_repository


def layer_tar(size: int, seed: int = 3) -> bytes:
    rng = random.Random(seed)
    buf = io.BytesIO()
    text = b"".join(rng.choices([b"alpha ", b"beta ", b"gamma ", b"delta\n"], k=1 << 16))
    written = i = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        while written < size:
            n = min(int(2 ** rng.uniform(8, 21)), size - written)
            data = rng.randbytes(n) if i % 2 else (text * (n // len(text) + 1))[:n]
            info = tarfile.TarInfo(f"d{i % 97}/f{i}")
            info.size = n
            t.addfile(info, io.BytesIO(data))
            written += n
            i += 1
    return buf.getvalue()


def write_layout(root: Path, blob: bytes, tar: bytes) -> dict[str, object]:
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    digest = hashlib.sha256(blob).hexdigest()
    (root / "blobs" / "sha256" / digest).write_bytes(blob)
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": []}))
    return {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": f"sha256:{digest}",
            "size": len(blob)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tar = layer_tar(args.size_mib << 20)
    blob = gzip.compress(tar, compresslevel=1, mtime=0)
    with tempfile.TemporaryDirectory(prefix="bench-spoolcheck-") as d:
        desc = write_layout(Path(d) / "layout", blob, tar)
        repo = open_repository(f"oci:{Path(d) / 'layout'}")
        t = time.perf_counter()
        prepared = prepare_layer(repo, desc, Path(d) / "spool", native=True, turbo=True)
        prepare_s = time.perf_counter() - t
        best = float("inf")
        for _ in range(args.runs):
            t = time.perf_counter()
            assert check_prepared(prepared) is None
            best = min(best, time.perf_counter() - t)
    print(f"layer: {len(tar) >> 20} MiB tar, {len(blob) >> 20} MiB gzip, {prepared.block_count} blocks "
          f"({prepared.compressed_size >> 20} MiB compressed)")
    print(f"prepare {prepare_s:8.3f} s   (baseline)")
    print(f"check   {best:8.3f} s   = {best / prepare_s:.3f} of prepare "
          f"({prepared.compressed_size / best / 1e9:.2f} GB/s of blocks)")


if __name__ == "__main__":
    main()
