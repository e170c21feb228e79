"""Converting one new layer on top of converted ones (a dedup hit on the leading layers): the time
against converting the whole image, measured in the same run.

Platform teams' images mostly share base layers, so this is the fleet's common case. The image is
the cached benchmark image (benchmarks/build_image.py) plus one small layer on top, in a local
docker-registry with a SQLite dedup store: first the benchmark image is converted (every layer
recorded), then the image with the extra layer (only that layer is prepared; the metadata pass
starts from the converted parents, read back from the registry).

Prints, per format: seconds of the full conversion, of the partial one, and their ratio (lower is
better; the partial conversion still reads the converted parents' metadata back).

Usage: python benchmarks/bench_partial.py [--formats native,turbo]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_convert  # noqa: E402  (benchmarks/ is not a package)
import build_image  # noqa: E402

EXTRA_TAG = "bench-plus-one"


def add_layer(src: Path, dst: Path, tag: str) -> None:
    """Copy the OCI layout `src` to `dst`, whose only image (tagged `tag`) is src's first image plus
    one small gzip layer."""
    shutil.copytree(src, dst)
    blobs = dst / "blobs" / "sha256"
    index = json.loads((dst / "index.json").read_text())
    desc = index["manifests"][0]
    manifest = json.loads((blobs / desc["digest"].partition(":")[2]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].partition(":")[2]).read_text())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = b"a new layer on top\n" * 1000
        info = tarfile.TarInfo("app/added.txt")
        info.size, info.mtime = len(data), 1
        tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    blob = gzip.compress(raw, mtime=0)
    blob_hex = hashlib.sha256(blob).hexdigest()
    (blobs / blob_hex).write_bytes(blob)
    manifest["layers"].append({"mediaType": build_image.MT_LAYER_GZIP, "digest": "sha256:" + blob_hex,
                               "size": len(blob)})
    config["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(raw).hexdigest())
    config_digest, config_size = build_image.put_json_blob(blobs, config)
    manifest["config"] = {**manifest["config"], "digest": config_digest, "size": config_size}
    manifest_digest, manifest_size = build_image.put_json_blob(blobs, manifest)
    index["manifests"] = [{**desc, "digest": manifest_digest, "size": manifest_size,
                           "annotations": {"org.opencontainers.image.ref.name": tag}}]
    (dst / "index.json").write_text(json.dumps(index))


def convert(repository: str, tag: str, fmt: str, workdir: Path, db: Path) -> tuple[float, dict[str, float]]:
    from obdconv.pipeline import runner
    from obdconv.request import ConversionRequest, RegistryAccess

    out = f"{tag}-{fmt}"
    request = ConversionRequest(repository=repository, input_tag=tag, oci=True,
                                overlaybd_tag=out if fmt == "native" else "", turbo_tag=out if fmt == "turbo" else "",
                                workdir=str(workdir), access=RegistryAccess(plain=True), db_type="sqlite")
    t0 = time.perf_counter()
    result = runner.convert(request, options=runner.RunnerOptions(db_str=str(db)))
    return time.perf_counter() - t0, result.timings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="native,turbo")
    args = ap.parse_args()
    summary = build_image.build(build_image.DEFAULT_CACHE, 1 << 30)  # cached after the first run
    layout = Path(summary["layout"])
    tag = summary["tag"]
    with tempfile.TemporaryDirectory(prefix="obdconv-bench-partial-") as tmp:
        work = Path(tmp)
        add_layer(layout, work / "layout", EXTRA_TAG)
        with bench_convert.local_registry(work) as reg:
            repository = f"{reg.host}/bench"
            bench_convert.push_image(layout, tag, f"{repository}:src")
            bench_convert.push_image(work / "layout", EXTRA_TAG, f"{repository}:src-plus-one")
            for fmt in args.formats.split(","):
                db = work / f"dedup-{fmt}.sqlite"
                full, _ = convert(repository, "src", fmt, work / f"full-{fmt}", db)
                partial, stages = convert(repository, "src-plus-one", fmt, work / f"partial-{fmt}", db)
                print(f"{fmt}: whole image {full:.2f} s; one new layer on top of the converted ones {partial:.2f} s "
                      f"(parents read back {stages.get('parents', 0.0):.2f} s, metadata {stages.get('metadata', 0.0):.2f} s)"
                      f"; ratio {partial / full:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
