"""End to end into OCI image layouts: convert, read back, compare with the source layers."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from obdconv.errors import IntegrityError, UnsupportedError
from obdconv.pipeline.runner import ConversionResult, RunnerOptions, convert
from obdconv.request import ConversionRequest
from obdconv.tree import diff_trees
from tests.conftest import requires_root
from tests.pipeline.edge import edge_layers
from tests.pipeline.images import Layout, copy_layout
from tests.pipeline.readback import (
    blob_path,
    check_tree,
    e2fsck,
    flatten,
    manifest,
    source_layer_paths,
    tag_digest,
    turbo_members,
)

NATIVE = "containerd.io/snapshot/overlaybd/version"


def run(layout: Path, tag: str, tmp: Path, *, native: str = "obd", turbo: str = "", workers: int = 1,
        **kw: object) -> ConversionResult:
    request = ConversionRequest(repository=f"oci:{layout}", input_tag=tag, overlaybd_tag=native, turbo_tag=turbo,
                                workdir=str(tmp / "work"), **kw)  # type: ignore[arg-type]
    return convert(request, options=RunnerOptions(workers=workers))


def check_converted(layout: Path, converted_digest: str, source_digest: str, image: Path,
                    out_layout: Path | None = None) -> None:
    flatten(out_layout or layout, converted_digest, image, layout)
    assert e2fsck(image) == ""
    assert check_tree(image, source_layer_paths(layout, source_digest)) == []


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def edge_layout(tmp_path: Path) -> Path:
    lay = Layout(tmp_path / "src")
    lay.image(edge_layers(("gzip", "zstd", "none", "gzip"), docker=False), tag="oci-mixed")
    lay.image(edge_layers(("gzip", "none", "gzip", "none"), docker=True), tag="docker")
    return lay.root


def test_edge_image_native_oci_mixed_compression(edge_layout: Path, tmp_path: Path) -> None:
    result = run(edge_layout, "oci-mixed", tmp_path, oci=True)
    assert ConversionResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    out = result.output("native")
    m = manifest(edge_layout, out.root_digest)
    assert m["mediaType"] == "application/vnd.oci.image.manifest.v1+json" and len(m["layers"]) == 4
    for d in m["layers"]:
        assert d["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
        assert d["annotations"]["containerd.io/snapshot/overlaybd/blob-digest"] == d["digest"]
        assert d["annotations"]["containerd.io/snapshot/overlaybd/blob-size"] == str(d["size"])
    config = json.loads(blob_path(edge_layout, m["config"]["digest"]).read_bytes())
    assert config["rootfs"]["diff_ids"] == [d["digest"] for d in m["layers"]]
    assert tag_digest(edge_layout, "obd") == out.root_digest
    check_converted(edge_layout, out.root_digest, tag_digest(edge_layout, "oci-mixed"), tmp_path / "n.img")


def test_edge_image_docker_native_and_turbo_share_one_prepare(edge_layout: Path, tmp_path: Path) -> None:
    events: list[str] = []
    request = ConversionRequest(repository=f"oci:{edge_layout}", input_tag="docker", overlaybd_tag="obd",
                                turbo_tag="turbo", workdir=str(tmp_path / "work"), oci=False)  # Docker types
    result = convert(request, options=RunnerOptions(workers=1),
                     progress=lambda e: events.append(e.stage) if e.finished and e.stage == "prepare" else None)
    assert events.count("prepare") == 4  # one prepare per layer serves both formats
    src = tag_digest(edge_layout, "docker")
    native, turbo = result.output("native"), result.output("turbo")
    docker_manifest = "application/vnd.docker.distribution.manifest.v2+json"
    assert native.root_media_type == turbo.root_media_type == docker_manifest
    check_converted(edge_layout, native.root_digest, src, tmp_path / "n.img")
    check_converted(edge_layout, turbo.root_digest, src, tmp_path / "t.img")
    m = manifest(edge_layout, turbo.root_digest)
    src_layers = manifest(edge_layout, src)["layers"]
    for d, s in zip(m["layers"], src_layers, strict=True):
        ann = d["annotations"]
        assert d["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"
        assert ann[NATIVE] == "0.1.0-turbo.ociv1"
        assert ann["containerd.io/snapshot/overlaybd/turbo-oci/target-digest"] == s["digest"]
        gz = s["mediaType"].endswith("gzip")
        assert ann["containerd.io/snapshot/overlaybd/turbo-oci/target-media-type"] == (
            "application/vnd.docker.image.rootfs.diff.tar" + (".gzip" if gz else ""))
        members = turbo_members(blob_path(edge_layout, d["digest"]).read_bytes())
        assert set(members) == {"ext4.fs.meta", ".turbo.ociv1"} | ({"gzip.meta"} if gz else set())
        assert members[".turbo.ociv1"] == b""
    # turbo diff_ids are the sha256 of the uncompressed archive
    config = json.loads(blob_path(edge_layout, m["config"]["digest"]).read_bytes())
    assert config["rootfs"]["diff_ids"] == [
        "sha256:" + hashlib.sha256(gzip.decompress(blob_path(edge_layout, d["digest"]).read_bytes())).hexdigest()
        for d in m["layers"]]


def test_turbo_refuses_zstd_layers(edge_layout: Path, tmp_path: Path) -> None:
    before = tree_hash(edge_layout)
    with pytest.raises(UnsupportedError, match="zstd"):
        run(edge_layout, "oci-mixed", tmp_path, native="", turbo="t")
    assert tree_hash(edge_layout) == before


def test_deterministic_across_runs_and_process_pool(edge_layout: Path, tmp_path: Path) -> None:
    first = run(edge_layout, "docker", tmp_path / "a", turbo="turbo")
    second = run(edge_layout, "docker", tmp_path / "b", native="obd2", turbo="turbo2", workers=2)
    for fmt in ("native", "turbo"):
        a, b = first.output(fmt), second.output(fmt)
        assert a.root_digest == b.root_digest
        assert a.layers == b.layers


def test_no_upload_pushes_nothing_and_dump_manifest(edge_layout: Path, tmp_path: Path) -> None:
    before = tree_hash(edge_layout)
    result = run(edge_layout, "docker", tmp_path, turbo="turbo", no_upload=True, dump_manifest=True)
    assert tree_hash(edge_layout) == before
    assert not result.uploaded
    dumped = list((tmp_path / "work").rglob("manifest.json"))
    assert len(dumped) == 2
    for path in dumped:
        data = path.read_bytes()
        fmt = path.parent.parent.name
        assert "sha256:" + hashlib.sha256(data).hexdigest() == result.output(fmt).root_digest
        assert (path.parent / "config.json").exists()


def test_corrupt_blob_fails_with_integrity_error_and_pushes_nothing(edge_layout: Path, tmp_path: Path) -> None:
    src = tag_digest(edge_layout, "docker")
    victim = blob_path(edge_layout, manifest(edge_layout, src)["layers"][1]["digest"])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    before = tree_hash(edge_layout)
    with pytest.raises(IntegrityError):
        run(edge_layout, "docker", tmp_path, turbo="turbo")
    # every layer must be prepared before anything is assembled: nothing at all was written
    assert tree_hash(edge_layout) == before
    spool = tmp_path / "work" / "spool"
    assert not spool.exists() or not list(spool.iterdir())  # nothing half-prepared left behind


def test_hello_world_index_all_platforms(fixtures_dir: Path, tmp_path: Path) -> None:
    lay = copy_layout(fixtures_dir / "oci" / "hello-world", tmp_path / "hw")
    result = run(lay, "docker-list", tmp_path, turbo="turbo", referrer=True, workers=2)
    src_index_digest = tag_digest(lay, "docker-list")
    src_index = manifest(lay, src_index_digest)
    for fmt, artifact in (("native", "native"), ("turbo", "turbo")):
        out = result.output(fmt)
        index = manifest(lay, out.root_digest)
        assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"  # --referrer forces --oci
        assert index["artifactType"] == f"application/vnd.containerd.overlaybd.{artifact}.v1+json"
        assert index["subject"]["digest"] == src_index_digest
        assert len(index["manifests"]) == 9
        assert [e["platform"] for e in index["manifests"]] == [e["platform"] for e in src_index["manifests"]]
        for entry, src_entry in zip(index["manifests"], src_index["manifests"], strict=True):
            m = manifest(lay, entry["digest"])
            assert m["subject"]["digest"] == src_entry["digest"]
            img = tmp_path / f"{fmt}.img"
            check_converted(lay, entry["digest"], src_entry["digest"], img)
            img.unlink()
    # only the roots got tags
    tags = {e.get("annotations", {}).get("org.opencontainers.image.ref.name")
            for e in json.loads((lay / "index.json").read_text())["manifests"]}
    assert {"obd", "turbo"} <= tags


def test_output_repository_gets_turbo_targets(edge_layout: Path, tmp_path: Path) -> None:
    out = Layout(tmp_path / "out").root
    result = run(edge_layout, "docker", tmp_path, turbo="turbo", output_repository=f"oci:{out}")
    src = tag_digest(edge_layout, "docker")
    for fmt in ("native", "turbo"):
        check_converted(edge_layout, result.output(fmt).root_digest, src, tmp_path / f"{fmt}.img", out_layout=out)
    for d in manifest(out, result.output("turbo").root_digest)["layers"]:
        assert blob_path(out, d["annotations"]["containerd.io/snapshot/overlaybd/turbo-oci/target-digest"]).exists()


@requires_root
def test_loop_mount_matches_source(edge_layout: Path, tmp_path: Path) -> None:
    from obdconv.oci.tree import tree_from_directory, tree_from_tar_layers

    result = run(edge_layout, "docker", tmp_path, turbo="turbo")
    src = tag_digest(edge_layout, "docker")
    expected = tree_from_tar_layers(source_layer_paths(edge_layout, src))
    for fmt in ("native", "turbo"):
        image = tmp_path / f"{fmt}.img"
        flatten(edge_layout, result.output(fmt).root_digest, image)
        mnt = tmp_path / f"mnt-{fmt}"
        mnt.mkdir()
        subprocess.run(["mount", "-o", "loop,ro", "-t", "ext4", str(image), str(mnt)], check=True)
        try:
            actual = tree_from_directory(mnt)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        assert diff_trees(expected, actual, ignore={"lost+found"}) == []


def test_nested_index_attestation_and_zero_layer_manifest(tmp_path: Path) -> None:
    from tests.pipeline.images import file, layer

    lay = Layout(tmp_path / "src")
    amd = {**lay.image([layer([file("a", b"amd")])], docker=True),
           "platform": {"os": "linux", "architecture": "amd64"}, "annotations": {"keep": "me"}}
    arm = {**lay.image([layer([file("b", b"arm")], "none", True)], docker=True, arch="arm64"),
           "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}
    empty = {**lay.image([], docker=True, arch="s390x"), "platform": {"os": "linux", "architecture": "s390x"}}
    att = {**lay.image([layer([file("sbom", b"{}")])]), "platform": {"os": "unknown", "architecture": "unknown"},
           "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                           "vnd.docker.reference.digest": amd["digest"]}}
    nested = {**lay.index([arm, empty], docker=True), "annotations": {"nested": "yes"}}
    lay.index([amd, att, nested], tag="multi")
    result = run(lay.root, "multi", tmp_path, oci=False)
    out = result.output("native")
    root = manifest(lay.root, out.root_digest)
    assert root["mediaType"] == "application/vnd.oci.image.index.v1+json"  # source type kept with --oci=false
    assert [e.get("annotations") for e in root["manifests"]] == [{"keep": "me"}, {"nested": "yes"}]
    assert root["manifests"][0]["platform"] == amd["platform"]
    inner = manifest(lay.root, root["manifests"][1]["digest"])
    assert root["manifests"][1]["mediaType"] == inner["mediaType"] == (
        "application/vnd.docker.distribution.manifest.list.v2+json")
    assert [e["platform"] for e in inner["manifests"]] == [arm["platform"], empty["platform"]]
    assert manifest(lay.root, inner["manifests"][1]["digest"])["layers"] == []  # zero layers stay zero
    assert att["digest"] not in out.manifests
    tags = {e.get("annotations", {}).get("org.opencontainers.image.ref.name"): e["digest"]
            for e in json.loads((lay.root / "index.json").read_text())["manifests"]}
    assert tags["obd"] == out.root_digest  # only the root is tagged
    assert root["manifests"][1]["digest"] not in [d for t, d in tags.items() if t]  # nested: by digest
    for src, converted in ((amd, root["manifests"][0]), (arm, inner["manifests"][0])):
        check_converted(lay.root, converted["digest"], src["digest"], tmp_path / "x.img")


def test_edge3_fixture_source(fixtures_dir: Path, tmp_path: Path) -> None:
    """The reference's 3-layer edge-case image (umoci-built): our conversion gives its tree."""
    lay = copy_layout(fixtures_dir / "oci" / "edge3", tmp_path / "e3")
    result = run(lay, "source", tmp_path, turbo="turbo")
    src = tag_digest(lay, "source")
    for fmt in ("native", "turbo"):
        check_converted(lay, result.output(fmt).root_digest, src, tmp_path / f"{fmt}.img")
