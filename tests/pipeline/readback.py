"""Read a converted image back from an OCI layout and compare its filesystem with the source layers.

Native: every layer blob -> formats.blob.open_layer_blob -> LSMTStack -> flatten to a raw image.
Turbo: every turboOCIv1.tar.gz -> ext4.fs.meta opened as a warp file whose target is the ORIGINAL
blob (gzip through GzipRandomReader + gzip.meta) -> LSMTStack -> flatten.
Then `e2fsck -fn` must be clean and `ext4.reader.tree_from_ext4` must equal the independent tar
model `oci.tree.tree_from_tar_layers` of the source layers.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from obdconv.ext4.reader import tree_from_ext4
from obdconv.formats.blob import open_layer_blob
from obdconv.formats.gzindex import GzipRandomReader
from obdconv.formats.lsmt import LSMTStack
from obdconv.formats.source import FileSource
from obdconv.oci.tree import tree_from_tar_layers
from obdconv.tree import diff_trees

TURBO_TARGET = "containerd.io/snapshot/overlaybd/turbo-oci/target-digest"


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.partition(":")[2]


def manifest(layout: Path, digest: str) -> dict[str, Any]:
    return json.loads(blob_path(layout, digest).read_bytes())


def tag_digest(layout: Path, tag: str) -> str:
    for e in json.loads((layout / "index.json").read_text())["manifests"]:
        if e.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return e["digest"]
    raise KeyError(tag)


def turbo_members(blob: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob)), mode="r:") as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}  # type: ignore[union-attr]


def flatten(layout: Path, manifest_digest: str, image: Path, source_layout: Path | None = None) -> None:
    """Flatten the converted image's layer stack into the raw image `image`."""
    source_layout = source_layout or layout
    m = manifest(layout, manifest_digest)
    layers = []
    for desc in m["layers"]:
        ann = desc.get("annotations", {})
        path = blob_path(layout, desc["digest"])
        if TURBO_TARGET in ann:
            members = turbo_members(path.read_bytes())
            target_path = blob_path(layout, ann[TURBO_TARGET])
            assert target_path.exists(), "turbo target blob missing from the output repository"
            target: Any = FileSource(target_path)
            if "gzip.meta" in members:
                target = GzipRandomReader(str(target_path), members["gzip.meta"])
            layers.append(open_layer_blob(members["ext4.fs.meta"], target=target))
        else:
            layers.append(open_layer_blob(str(path)))
    LSMTStack(layers).flatten_to(image)


def e2fsck(image: Path) -> str:
    """'' when clean, else e2fsck's output."""
    r = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    return "" if r.returncode == 0 else r.stdout + r.stderr


def check_tree(image: Path, source_layer_paths: list[Path]) -> list[str]:
    expected = tree_from_tar_layers(source_layer_paths)
    actual = tree_from_ext4(image)
    return diff_trees(expected, actual, ignore={"lost+found"})


def source_layer_paths(layout: Path, source_manifest_digest: str) -> list[Path]:
    return [blob_path(layout, d["digest"]) for d in manifest(layout, source_manifest_digest)["layers"]]
