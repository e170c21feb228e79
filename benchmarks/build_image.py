"""Build the end-to-end benchmark image: a realistic multi-layer image, cached under benchmarks/.cache/.

Layers (each a gzip tar, OCI media types):
  1. a Debian bookworm rootfs from `debootstrap --variant=minbase` (fallback: a rootfs synthesised from
     this machine's /usr, /etc, /var/lib/dpkg when debootstrap fails; `image.json` records which was used);
  2..4. pip-installed package sets (`pip install --target usr/local/lib/python3.11/dist-packages`);
  5. a clean-up layer with whiteouts (like `RUN rm -rf /usr/share/doc ...` in a Dockerfile), so the image
     also exercises deletions.

The result is an OCI image layout at `benchmarks/.cache/image` tagged `bench`; `benchmarks/.cache/image.json`
summarises it (layers, uncompressed bytes, file counts, rootfs origin).

Deterministic and cached: every step writes into its own directory and is skipped when its `.done` marker
exists; tar members are sorted, mtimes clamped to SOURCE_DATE_EPOCH, owner names dropped, gzip written with
no name and mtime 0 (`pigz -n`), so re-packing the same trees gives the same blobs.

Usage: python benchmarks/build_image.py [--cache DIR] [--min-bytes N]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".cache"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SOURCE_DATE_EPOCH = 1_700_000_000  # 2023-11-14; clamps pip install times so blobs are reproducible
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"
TAG = "bench"

# Package sets, one layer each: chosen for size (numeric stack) and file count (ansible collections).
PIP_LAYERS: list[tuple[str, list[str]]] = [
    ("scipy-stack", ["numpy", "scipy", "pandas", "matplotlib", "scikit-learn"]),
    ("ansible", ["ansible"]),
    ("cloud-sdk", ["boto3", "botocore", "sympy", "pyarrow"]),
]

MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"


@dataclass
class LayerInfo:
    name: str
    digest: str
    size: int
    diff_id: str
    uncompressed_size: int
    members: int


def log(msg: str) -> None:
    print(f"[build_image {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def done(step_dir: Path) -> bool:
    return (step_dir / ".done").exists()


def mark_done(step_dir: Path) -> None:
    (step_dir / ".done").write_text("ok\n")


# ---------------------------------------------------------------------------------------------- rootfs


def build_debian_rootfs(work: Path) -> tuple[Path, str]:
    """Layer 1 tree. Returns (tree root, origin description)."""
    step = work / "debian"
    root = step / "rootfs"
    if done(step):
        return root, (step / "origin").read_text().strip()
    if step.exists():
        shutil.rmtree(step)
    root.mkdir(parents=True)
    cmd = ["debootstrap", "--variant=minbase", "bookworm", str(root), DEBIAN_MIRROR]
    log("running " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        origin = f"debootstrap --variant=minbase bookworm {DEBIAN_MIRROR}"
        # debootstrap leaves the host's resolv.conf/hostname copies and apt caches: drop the
        # host-specific files so the layer does not depend on this machine.
        for rel in ("etc/resolv.conf", "etc/hostname"):
            p = root / rel
            if p.is_file() or p.is_symlink():
                p.unlink()
    else:
        log(f"debootstrap failed ({proc.returncode}): {proc.stderr[-800:]}; synthesising from /usr")
        shutil.rmtree(root)
        root.mkdir()
        for top in ("usr", "etc", "var/lib/dpkg"):
            dst = root / top
            dst.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", f"/{top}", str(dst)], check=True)
        for name, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
            (root / name).symlink_to(target)
        origin = "synthesised from the build host's /usr, /etc, /var/lib/dpkg (debootstrap failed)"
    (step / "origin").write_text(origin + "\n")
    mark_done(step)
    return root, origin


def build_pip_tree(work: Path, name: str, packages: list[str]) -> Path:
    step = work / f"pip-{name}"
    root = step / "rootfs"
    if done(step):
        return root
    if step.exists():
        shutil.rmtree(step)
    target = root / SITE_PACKAGES
    target.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-input", "--quiet", "--target", str(target), *packages]
    log("running " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    mark_done(step)
    return root


def build_cleanup_tree(work: Path) -> Path:
    """Whiteouts of a few directories and a file from lower layers, plus a new file (a typical last layer)."""
    step = work / "cleanup"
    root = step / "rootfs"
    if done(step):
        return root
    if step.exists():
        shutil.rmtree(step)
    (root / "usr/share").mkdir(parents=True)
    (root / "usr/share/.wh.doc").touch()
    (root / "usr/share/.wh.man").touch()
    (root / "var/log").mkdir(parents=True)
    (root / "var/log/.wh..wh..opq").touch()
    (root / "etc").mkdir(parents=True)
    (root / "etc/bench-release").write_text("obdconv benchmark image\n")
    mark_done(step)
    return root


# ---------------------------------------------------------------------------------------------- packing


def walk_sorted(root: Path) -> Iterator[tuple[str, Path]]:
    """(archive name, path) for every path under root, parents before children, names sorted."""
    stack = [""]
    while stack:
        rel = stack.pop()
        d = root / rel if rel else root
        names = sorted(os.listdir(d))
        children: list[str] = []
        for n in names:
            r = f"{rel}/{n}" if rel else n
            p = root / r
            yield r, p
            if p.is_dir() and not p.is_symlink():
                children.append(r)
        stack.extend(reversed(children))


def _normalise(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    ti.mtime = min(int(ti.mtime), SOURCE_DATE_EPOCH)
    ti.uname = ti.gname = ""
    return ti


def pack_layer(name: str, root: Path, blobs: Path, layers_dir: Path) -> LayerInfo:
    """Tar `root` (PAX, sorted, hard links kept) through `pigz -n`; hash both streams on the way."""
    return pack_members(name, _tree_members(root), blobs, layers_dir, f" from {root}")


def _tree_members(root: Path) -> Iterator[tuple[tarfile.TarInfo, BinaryIO | None]]:
    # One TarFile for gettarinfo: it remembers inodes, which turns a file's second name into a hard link.
    infos = tarfile.open(fileobj=io.BytesIO(), mode="w")
    for arc, path in walk_sorted(root):
        if arc == ".done":
            continue
        found = infos.gettarinfo(str(path), arcname=arc)
        if found is None:  # sockets cannot be archived (an image never carries them)
            continue
        ti = _normalise(found)
        if ti.isreg():
            with open(path, "rb") as f:
                yield ti, f
        else:
            yield ti, None


def pack_members(name: str, members: Iterable[tuple[tarfile.TarInfo, Any]], blobs: Path, layers_dir: Path,
                 where: str = "") -> LayerInfo:
    """Tar `members` ((TarInfo, file object with the content or None), in order; PAX) through
    `pigz -n` into `blobs`, hashing both streams on the way; cached by `name` in `layers_dir`."""
    meta_path = layers_dir / f"{name}.json"
    if meta_path.exists():
        info = LayerInfo(**json.loads(meta_path.read_text()))
        if (blobs / info.digest.split(":", 1)[1]).exists():
            return info
    log(f"packing layer {name}{where}")
    tmp = blobs / f".{name}.tmp"
    raw_hash = hashlib.sha256()
    raw_size = 0
    count = 0
    with open(tmp, "wb") as out:
        pigz = subprocess.Popen(["pigz", "-n", "-6", "-c"], stdin=subprocess.PIPE, stdout=out)
        assert pigz.stdin is not None

        class HashingPipe:
            def write(self, b: bytes) -> int:
                nonlocal raw_size
                raw_hash.update(b)
                raw_size += len(b)
                return pigz.stdin.write(b)  # type: ignore[union-attr]

        with tarfile.open(fileobj=HashingPipe(), mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[arg-type]
            for ti, content in members:
                tar.addfile(ti, content)
                count += 1
        pigz.stdin.close()
        if pigz.wait() != 0:
            raise RuntimeError(f"pigz failed packing {name}")
    digest = "sha256:" + _file_sha256(tmp)
    tmp.rename(blobs / digest.split(":", 1)[1])
    info = LayerInfo(name, digest, (blobs / digest.split(":", 1)[1]).stat().st_size,
                     "sha256:" + raw_hash.hexdigest(), raw_size, count)
    meta_path.write_text(json.dumps(info.__dict__, indent=1))
    return info


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def put_json_blob(blobs: Path, obj: dict) -> tuple[str, int]:
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return "sha256:" + digest, len(data)


def write_layout(layout: Path, layers: list[LayerInfo], tag: str = TAG) -> dict:
    blobs = layout / "blobs" / "sha256"
    config = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                           f"PYTHONPATH=/{SITE_PACKAGES}"],
                   "Cmd": ["/bin/bash"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": f"layer {layer.name}"} for layer in layers],
    }
    config_digest, config_size = put_json_blob(blobs, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": MT_LAYER_GZIP, "digest": layer.digest, "size": layer.size} for layer in layers],
    }
    manifest_digest, manifest_size = put_json_blob(blobs, manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [{"mediaType": MT_MANIFEST, "digest": manifest_digest, "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": tag},
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    }
    (layout / "index.json").write_text(json.dumps(index, indent=1))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return {"manifest_digest": manifest_digest, "config_digest": config_digest}


def cached_summary(cache: Path) -> dict | None:
    """The summary of the image cached under `cache`, if it is whole; its paths are where the cache
    is now (a checkout may have moved since it was built)."""
    layout = cache / "image"
    summary_path = cache / "image.json"
    if not (summary_path.exists() and (layout / "index.json").exists()):
        return None
    summary = json.loads(summary_path.read_text())
    blobs = layout / "blobs" / "sha256"
    if not all((blobs / layer["digest"].split(":", 1)[1]).exists() for layer in summary["layers"]):
        return None
    summary["layout"] = str(layout)
    summary["ref"] = f"oci:{layout}:{summary['tag']}"
    log(f"cached image at {layout}")
    return summary


def build(cache: Path, min_bytes: int) -> dict:
    work = cache / "work"
    layout = cache / "image"
    blobs = layout / "blobs" / "sha256"
    layers_dir = cache / "layers"
    for d in (work, blobs, layers_dir):
        d.mkdir(parents=True, exist_ok=True)
    if (summary := cached_summary(cache)) is not None:
        return summary
    summary_path = cache / "image.json"
    rootfs, origin = build_debian_rootfs(work)
    trees: list[tuple[str, Path]] = [("debian", rootfs)]
    for name, packages in PIP_LAYERS:
        trees.append((name, build_pip_tree(work, name, packages)))
    trees.append(("cleanup", build_cleanup_tree(work)))
    layers = [pack_layer(name, root, blobs, layers_dir) for name, root in trees]
    ids = write_layout(layout, layers)
    total = sum(layer.uncompressed_size for layer in layers)
    files = sum(layer.members for layer in layers)
    summary = {"layout": str(layout), "ref": f"oci:{layout}:{TAG}", "tag": TAG, "rootfs_origin": origin,
               "uncompressed_bytes": total, "compressed_bytes": sum(layer.size for layer in layers),
               "members": files, "layers": [layer.__dict__ for layer in layers], **ids}
    if total < min_bytes:
        log(f"WARNING: image is {total / 2**30:.2f} GiB uncompressed, below the {min_bytes / 2**30:.2f} GiB target")
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--min-bytes", type=int, default=1 << 30)
    args = ap.parse_args()
    print_summary(build(args.cache, args.min_bytes))
    return 0


def print_summary(summary: dict[str, Any]) -> None:
    """What a build made: the image's figures, then a line per layer."""
    print(json.dumps({k: v for k, v in summary.items() if k != "layers"}, indent=1))
    for layer in summary["layers"]:
        print(f"  {layer['name']:12s} {layer['digest'][:19]} gz {layer['size'] / 2**20:8.1f} MiB  "
              f"tar {layer['uncompressed_size'] / 2**20:8.1f} MiB  {layer['members']:6d} entries")


if __name__ == "__main__":
    sys.exit(main())
