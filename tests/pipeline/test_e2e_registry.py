"""End to end against a real docker-registry on 127.0.0.1, through the `obdconv convert` CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from obdconv.errors import IntegrityError, NetworkError
from obdconv.pipeline.runner import RunnerOptions, convert
from obdconv.registry import RegistryOptions, open_repository
from obdconv.request import ConversionRequest, RegistryAccess
from tests.pipeline.edge import edge_layers
from tests.pipeline.images import Layout
from tests.pipeline.readback import check_tree, e2fsck, flatten, manifest, source_layer_paths
from tests.services.base import free_port
from tests.services.registry import RegistryService

pytestmark = pytest.mark.services
TURBO_TARGET = "containerd.io/snapshot/overlaybd/turbo-oci/target-digest"
PLAIN = RegistryOptions(plain=True)


def push_layout_image(layout: Path, tag: str, repo_name: str) -> str:
    """Copy one tagged image (manifest, config, layers) from a layout into the registry."""
    src = open_repository(f"oci:{layout}")
    dst = open_repository(repo_name, PLAIN)
    m = src.get_manifest(tag)
    doc = json.loads(m.data)
    for desc in [doc["config"], *doc["layers"]]:
        with src.open_blob(desc["digest"]) as f:
            dst.push_blob(f, desc["digest"], desc["size"])
    dst.put_manifest(m.data, m.media_type, tag)
    return m.digest


def mirror(repo_name: str, digest: str, layout: Path) -> None:
    """Pull a manifest, its blobs and any turbo target blobs into a layout (for the readback)."""
    repo = open_repository(repo_name, PLAIN)
    lay = Layout(layout)
    m = repo.get_manifest(digest)
    lay.blob(m.data)
    doc = json.loads(m.data)
    wanted = [doc["config"]["digest"]] + [d["digest"] for d in doc["layers"]]
    wanted += [d["annotations"][TURBO_TARGET] for d in doc["layers"] if TURBO_TARGET in d.get("annotations", {})]
    for d in wanted:
        lay.blob(repo.read_blob(d))


def repo_state(registry: RegistryService, name: str) -> tuple[list[str], list[str]]:
    """The repository's tags and every file the registry stores (blobs, links, revisions), minus
    upload sessions."""
    repo = open_repository(f"{registry.host}/{name}", PLAIN)
    files = sorted(str(p.relative_to(registry.storage_dir)) for p in registry.storage_dir.rglob("*")
                   if p.is_file() and "_uploads" not in p.parts)
    return sorted(repo.list_tags()), files


def test_cli_converts_native_and_turbo_in_registry(pipeline_registry: RegistryService, tmp_path: Path) -> None:
    lay = Layout(tmp_path / "src")
    lay.image(edge_layers(("gzip", "none", "gzip", "gzip"), docker=True), tag="v1")
    name = f"{pipeline_registry.host}/edge"
    src_digest = push_layout_image(lay.root, "v1", name)
    proc = subprocess.run(
        [sys.executable, "-m", "obdconv", "convert", "-r", name, "-i", "v1", "--overlaybd", "v1-obd",
         "--turboOCI", "v1-turbo", "--plain", "--json", "-d", str(tmp_path / "work"), "--workers", "2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    outputs = {o["format"]: o for o in result["outputs"]}
    repo = open_repository(name, PLAIN)
    assert {"v1", "v1-obd", "v1-turbo"} <= set(repo.list_tags())
    for fmt, tag in (("native", "v1-obd"), ("turbo", "v1-turbo")):
        assert repo.head_manifest(tag) == outputs[fmt]["root_digest"]
        out_layout = tmp_path / f"out-{fmt}"
        mirror(name, outputs[fmt]["root_digest"], out_layout)
        image = tmp_path / f"{fmt}.img"
        flatten(out_layout, outputs[fmt]["root_digest"], image, lay.root)
        assert e2fsck(image) == ""
        assert check_tree(image, source_layer_paths(lay.root, src_digest)) == []
        assert manifest(out_layout, outputs[fmt]["root_digest"])["mediaType"] == (
            "application/vnd.docker.distribution.manifest.v2+json")

    # --no-upload leaves the registry unchanged
    before = repo_state(pipeline_registry, "edge")
    proc = subprocess.run(
        [sys.executable, "-m", "obdconv", "convert", "-r", name, "-i", "v1", "--overlaybd", "other",
         "--turboOCI", "other-t", "--plain", "--no-upload", "-d", str(tmp_path / "work2"), "--workers", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "not uploaded" in proc.stdout
    assert repo_state(pipeline_registry, "edge") == before


def test_corrupt_registry_blob_fails_and_pushes_nothing(pipeline_registry: RegistryService, tmp_path: Path) -> None:
    lay = Layout(tmp_path / "src")
    lay.image(edge_layers(("gzip", "gzip", "gzip", "gzip"), docker=False), tag="v1")
    name = f"{pipeline_registry.host}/corrupt"
    src_digest = push_layout_image(lay.root, "v1", name)
    victim = json.loads(open_repository(name, PLAIN).get_manifest(src_digest).data)["layers"][0]["digest"]
    path = pipeline_registry.blob_data_path(victim)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x55
    path.write_bytes(bytes(data))
    before = repo_state(pipeline_registry, "corrupt")
    request = ConversionRequest(repository=name, input_tag="v1", overlaybd_tag="obd", turbo_tag="t",
                                workdir=str(tmp_path / "work"), access=RegistryAccess(plain=True))
    with pytest.raises(IntegrityError):
        convert(request, options=RunnerOptions(workers=1))
    assert repo_state(pipeline_registry, "corrupt") == before


def test_unreachable_registry_fails_fast(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    request = ConversionRequest(repository=f"127.0.0.1:{port}/nothing", input_tag="v1", overlaybd_tag="o",
                                workdir=str(tmp_path / "work"), access=RegistryAccess(plain=True))
    start = time.monotonic()
    with pytest.raises(NetworkError):
        convert(request, options=RunnerOptions(workers=1))
    assert time.monotonic() - start < 15
    proc = subprocess.run([sys.executable, "-m", "obdconv", "convert", "-r", f"127.0.0.1:{port}/nothing", "-i", "x",
                           "-o", "y", "--plain", "-d", str(tmp_path / "w")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == NetworkError.exit_code, proc.stderr
