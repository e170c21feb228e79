"""`obdconv verify` against images made by the reference convertor (shared fixtures), and tampered copies."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from obdconv.errors import BadInputError
from obdconv.verify import (
    ANN_BLOB_SIZE,
    ANN_TARGET_MEDIA_TYPE,
    VerificationFailed,
    raise_for_report,
    verify_reference,
)
from tests.conftest import requires_root
from tests.verify import layout_edit as le

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hello(fixtures_dir: Path) -> Path:
    return fixtures_dir / "oci" / "hello-world"


@pytest.fixture(scope="module")
def edge3(fixtures_dir: Path) -> Path:
    return fixtures_dir / "oci" / "edge3"


def _verify(layout: Path, tag: str, source_tag: str, **kw: object):
    if os.environ.get("VERIFY_TEST_FORCE_MOUNT"):  # debugging aid: read through the kernel instead
        kw.setdefault("mount", True)
    return verify_reference(f"oci:{layout}:{tag}", f"oci:{layout}:{source_tag}", **kw)


def _all_findings(report) -> list[str]:
    out = [str(f) for f in report.findings]
    for p in report.platforms:
        out += [str(f) for f in p.findings]
    return out


# ---------------------------------------------------------------------------------------------- accepted


def test_reference_hello_world_verifies_userspace(hello: Path) -> None:
    report = _verify(hello, "amd64-converted", "amd64")
    assert report.ok, report.format_text()
    (p,) = report.platforms
    assert p.format == "overlaybd" and p.layers == 1
    assert p.filesystem_compared and p.tree_diff == []
    assert p.entries_compared >= 1  # the `hello` binary
    # The reference mkfs's lost+found HTREE defect is recognised, not failed.
    assert p.fsck.status == "known-quirk", p.fsck
    assert any("lost+found" in line for line in p.fsck.problems)
    raise_for_report(report)  # must not raise


@pytest.mark.parametrize("tag,fmt", [("overlaybd", "overlaybd"), ("turbo", "turbo")])
def test_reference_edge3_verifies_userspace(edge3: Path, tag: str, fmt: str) -> None:
    report = _verify(edge3, tag, "source")
    assert report.ok, report.format_text()
    (p,) = report.platforms
    assert p.format == fmt and p.layers == 3
    # edge3 holds ~30 paths across 3 layers (whiteouts, hard links, devices, xattrs): all compared.
    assert p.entries_compared >= 20
    assert p.fsck.ok


@requires_root
@pytest.mark.root
@pytest.mark.parametrize("tag", ["overlaybd", "turbo"])
def test_reference_edge3_verifies_mounted(edge3: Path, tag: str, tmp_path: Path) -> None:
    report = _verify(edge3, tag, "source", mount=True, workdir=tmp_path)
    assert report.method == "mount"
    assert report.ok, report.format_text()
    assert report.platforms[0].entries_compared >= 20
    # Always unmounted and cleaned up: nothing of ours stays mounted, the work dir is empty again.
    assert str(tmp_path) not in Path("/proc/mounts").read_text()
    assert list(tmp_path.iterdir()) == []


@requires_root
@pytest.mark.root
def test_reference_hello_world_verifies_mounted(hello: Path) -> None:
    report = _verify(hello, "amd64-converted", "amd64", mount=True)
    assert report.ok, report.format_text()


def test_cli_json_report(edge3: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "obdconv", "verify", f"oci:{edge3}:overlaybd", "--source", f"oci:{edge3}:source",
         "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True
    assert doc["platforms"][0]["format"] == "overlaybd"
    assert doc["platforms"][0]["tree_diff"] == []


# ---------------------------------------------------------------------------------------------- rejected


def test_flipped_byte_in_layer_blob_is_a_digest_error(edge3: Path, tmp_path: Path) -> None:
    layout = le.copy_layout(edge3, tmp_path / "edge3")
    layer = le.read_manifest(layout, "overlaybd")["layers"][1]
    path = le.blob_path(layout, layer["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    report = _verify(layout, "overlaybd", "source")
    assert not report.ok
    errors = [str(f) for f in report.platforms[0].errors]
    assert any("layer 1" in e and layer["digest"][:19] in e for e in errors), errors
    with pytest.raises(VerificationFailed) as exc:
        raise_for_report(report)
    assert isinstance(exc.value, BadInputError) and exc.value.exit_code == 65


def test_consistent_rewrite_with_changed_file_content_names_the_path(hello: Path, tmp_path: Path) -> None:
    """Rewrite the converted layer so that every digest matches but the `hello` file's bytes differ."""
    from obdconv.formats.source import BytesSource
    from obdconv.formats.zfile import ZFileReader, compress_zfile

    layout = le.copy_layout(hello, tmp_path / "hello")
    manifest = le.read_manifest(layout, "amd64-converted")
    blob = le.blob_path(layout, manifest["layers"][0]["digest"]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        member = tar.getmember("overlaybd.commit")
        payload = tar.extractfile(member).read()  # type: ignore[union-attr]
    zf = ZFileReader(BytesSource(payload))
    lsmt = bytearray(zf.pread(0, zf.size))
    source_manifest = le.read_manifest(layout, "amd64")
    content = le.file_from_gzip_layer(le.blob_path(layout, source_manifest["layers"][0]["digest"]), "hello")
    at = lsmt.find(content[:4096])
    assert at > 0, "the hello binary's first block must be stored verbatim in the LSMT data area"
    lsmt[at + 100] ^= 0xFF
    le.replace_native_layer(layout, "amd64-converted", 0, le.ustar_wrap(compress_zfile(bytes(lsmt))))

    report = _verify(layout, "amd64-converted", "amd64")
    assert not report.ok
    (p,) = report.platforms
    assert p.errors == [], [str(f) for f in p.errors]  # structure and digests are all fine ...
    assert len(p.tree_diff) == 1 and p.tree_diff[0].startswith("~ hello: sha256 expected"), p.tree_diff
    text = report.format_text()
    assert "~ hello: sha256 expected" in text and "FAILED" in text

    proc = subprocess.run(
        [sys.executable, "-m", "obdconv", "verify", f"oci:{layout}:amd64-converted", "--source", f"oci:{layout}:amd64"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 65
    assert "~ hello: sha256 expected" in proc.stdout
    assert "hello" in proc.stderr


def test_wrong_blob_size_annotation_is_named(edge3: Path, tmp_path: Path) -> None:
    layout = le.copy_layout(edge3, tmp_path / "edge3")
    manifest = le.read_manifest(layout, "overlaybd")
    manifest["layers"][2]["annotations"][ANN_BLOB_SIZE] = "12345"
    le.write_manifest(layout, "overlaybd", manifest)

    report = _verify(layout, "overlaybd", "source")
    assert not report.ok
    errors = [str(f) for f in report.platforms[0].errors]
    assert len(errors) == 1, errors
    assert "layer 2" in errors[0] and ANN_BLOB_SIZE in errors[0] and "'12345'" in errors[0]
    assert report.platforms[0].tree_diff == []  # the filesystem itself is still right


def test_wrong_turbo_target_media_type_is_named(edge3: Path, tmp_path: Path) -> None:
    layout = le.copy_layout(edge3, tmp_path / "edge3")
    manifest = le.read_manifest(layout, "turbo")
    manifest["layers"][0]["annotations"][ANN_TARGET_MEDIA_TYPE] = "application/vnd.oci.image.layer.v1.tar"
    le.write_manifest(layout, "turbo", manifest)

    report = _verify(layout, "turbo", "source")
    assert not report.ok
    errors = [str(f) for f in report.platforms[0].errors]
    assert any(ANN_TARGET_MEDIA_TYPE in e and "layer 0" in e for e in errors), errors


def test_native_diff_id_must_be_the_blob_digest(edge3: Path, tmp_path: Path) -> None:
    layout = le.copy_layout(edge3, tmp_path / "edge3")
    manifest = le.read_manifest(layout, "overlaybd")
    config = le.read_json_blob(layout, manifest["config"]["digest"])
    source_cfg = le.read_json_blob(layout, le.read_manifest(layout, "source")["config"]["digest"])
    config["rootfs"]["diff_ids"][0] = source_cfg["rootfs"]["diff_ids"][0]  # the classic mistake
    le.write_config(layout, manifest, config)
    le.write_manifest(layout, "overlaybd", manifest)

    report = _verify(layout, "overlaybd", "source")
    assert not report.ok
    assert any("diff_ids[0]" in str(f) for f in report.platforms[0].errors)


def test_source_with_a_different_file_is_reported(edge3: Path, tmp_path: Path) -> None:
    """The comparison really uses the source: drop one file from source layer 3 (consistently)."""
    layout = le.copy_layout(edge3, tmp_path / "edge3")
    manifest = le.read_manifest(layout, "source")
    layer = manifest["layers"][2]
    out = io.BytesIO()
    with tarfile.open(le.blob_path(layout, layer["digest"]), "r:gz") as src, \
            tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as dst:
        for m in src.getmembers():
            if m.name.endswith("leaf.txt"):
                continue
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
    import gzip
    import hashlib

    data = out.getvalue()
    layer["digest"], layer["size"] = le.put_blob(layout, data), len(data)
    config = le.read_json_blob(layout, manifest["config"]["digest"])
    config["rootfs"]["diff_ids"][2] = "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest()
    le.write_config(layout, manifest, config)
    le.write_manifest(layout, "source", manifest)

    report = _verify(layout, "overlaybd", "source")
    assert not report.ok
    assert "+ nested/a/b/c/leaf.txt: unexpected file" in report.platforms[0].tree_diff


def test_platform_filter_that_matches_nothing_fails(hello: Path) -> None:
    report = _verify(hello, "amd64-converted", "amd64", platform="linux/s390x")
    assert not report.ok and report.platforms == []
    assert any("linux/s390x" in s for s in _all_findings(report))


def test_cli_requires_source() -> None:
    proc = subprocess.run([sys.executable, "-m", "obdconv", "verify", "oci:/nonexistent:x"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60, env={**os.environ})
    assert proc.returncode == 2 and "--source" in proc.stderr


def test_single_converted_manifest_against_source_index(hello: Path) -> None:
    """The source is the 9-platform Docker list: the converted manifest's config says linux/amd64."""
    report = _verify(hello, "amd64-converted", "docker-list")
    assert report.ok, report.format_text()
    assert [p.platform for p in report.platforms] == ["linux/amd64"]
    assert any("linux/arm64" in str(f) and f.severity == "info" for f in report.findings)


def test_converted_index_verifies_every_platform_present_in_both(hello: Path, tmp_path: Path) -> None:
    layout = le.copy_layout(hello, tmp_path / "hello")
    conv = le.tagged_descriptor(layout, "amd64-converted")
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": conv["mediaType"], "digest": conv["digest"], "size": conv["size"],
                            "platform": {"architecture": "amd64", "os": "linux"}}]}
    data = json.dumps(index).encode()
    digest = le.put_blob(layout, data)
    top = json.loads((layout / "index.json").read_text())
    top["manifests"].append({"mediaType": index["mediaType"], "digest": digest, "size": len(data),
                             "annotations": {"org.opencontainers.image.ref.name": "converted-list"}})
    (layout / "index.json").write_text(json.dumps(top))

    report = _verify(layout, "converted-list", "docker-list")
    assert report.ok, report.format_text()
    assert [p.platform for p in report.platforms] == ["linux/amd64"]
    assert report.platforms[0].manifest_digest == conv["digest"]


@pytest.fixture(scope="module")
def edge3_converted_by_obdconv(edge3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """edge3 `source` converted by obdconv's own local runner (native + turbo) into a layout copy."""
    from obdconv.pipeline.runner import RunnerOptions, convert
    from obdconv.request import ConversionRequest

    base = tmp_path_factory.mktemp("own")
    layout = le.copy_layout(edge3, base / "edge3")
    request = ConversionRequest(repository=f"oci:{layout}", input_tag="source", overlaybd_tag="own",
                                turbo_tag="own-turbo", oci=True, workdir=str(base / "work"))
    convert(request, options=RunnerOptions(workers=1))
    return layout


@pytest.mark.parametrize("tag,fmt", [("own", "overlaybd"), ("own-turbo", "turbo")])
def test_obdconv_conversion_verifies_with_clean_fsck(edge3_converted_by_obdconv: Path, tag: str, fmt: str) -> None:
    report = _verify(edge3_converted_by_obdconv, tag, "source")
    assert report.ok, report.format_text()
    (p,) = report.platforms
    assert p.format == fmt and p.entries_compared >= 20
    # Our own mkfs must not have the reference's lost+found defect.
    assert p.fsck.status == "clean", p.fsck


@requires_root
@pytest.mark.root
@pytest.mark.parametrize("tag", ["own", "own-turbo"])
def test_obdconv_conversion_verifies_mounted(edge3_converted_by_obdconv: Path, tag: str) -> None:
    report = _verify(edge3_converted_by_obdconv, tag, "source", mount=True)
    assert report.ok, report.format_text()


def test_turbo_over_uncompressed_source_layers(edge3: Path, tmp_path: Path) -> None:
    """Turbo layers whose data comes straight from plain-tar source blobs (no gzip.meta needed)."""
    import gzip

    from obdconv.pipeline.runner import RunnerOptions, convert
    from obdconv.request import ConversionRequest

    layout = le.copy_layout(edge3, tmp_path / "edge3")
    manifest = le.read_manifest(layout, "source")
    for layer in manifest["layers"]:
        data = gzip.decompress(le.blob_path(layout, layer["digest"]).read_bytes())
        layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar"
        layer["digest"], layer["size"] = le.put_blob(layout, data), len(data)
    le.write_manifest(layout, "source", manifest)
    convert(ConversionRequest(repository=f"oci:{layout}", input_tag="source", turbo_tag="plain-turbo", oci=True,
                              workdir=str(tmp_path / "work")), options=RunnerOptions(workers=1))

    report = _verify(layout, "plain-turbo", "source")
    assert report.ok, report.format_text()
    turbo = le.read_manifest(layout, "plain-turbo")
    assert all(layer["annotations"][ANN_TARGET_MEDIA_TYPE] == "application/vnd.oci.image.layer.v1.tar"
               for layer in turbo["layers"])


def test_base_layer_below_converted_layers_is_stacked_not_paired(edge3: Path, tmp_path: Path) -> None:
    """--mkfs=false images start with a base layer the source lacks: it is stacked, not compared."""
    from obdconv.formats.lsmt import commit
    from obdconv.formats.zfile import compress_zfile

    layout = le.copy_layout(edge3, tmp_path / "edge3")
    lsmt = io.BytesIO()
    commit({60 << 30: b"\xab" * 4096}, lsmt)  # data in a block the small filesystem never uses
    blob = le.ustar_wrap(compress_zfile(lsmt.getvalue()))
    digest = le.put_blob(layout, blob)
    manifest = le.read_manifest(layout, "overlaybd")
    manifest["layers"].insert(0, {
        "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": len(blob),
        "annotations": {"containerd.io/snapshot/overlaybd/blob-digest": digest,
                        "containerd.io/snapshot/overlaybd/blob-size": str(len(blob)),
                        "containerd.io/snapshot/overlaybd/version": "0.1.0"}})
    config = le.read_json_blob(layout, manifest["config"]["digest"])
    config["rootfs"]["diff_ids"].insert(0, digest)
    le.write_config(layout, manifest, config)
    le.write_manifest(layout, "overlaybd", manifest)

    report = _verify(layout, "overlaybd", "source")
    assert report.ok, report.format_text()
    (p,) = report.platforms
    assert p.layers == 4 and p.tree_diff == []
    assert any("base layer" in f.message and f.where == "layer 0" for f in p.findings)


def test_turbo_gzip_index_of_another_deflate_stream_is_rejected(edge3: Path, tmp_path: Path) -> None:
    """A gzip.meta built over a different deflate stream of the same tar (right sizes, wrong access
    points) must be caught: the runtime would read garbage file data through it."""
    import gzip

    from obdconv.formats.gzindex import GzipIndex, GzipIndexBuilder

    layout = le.copy_layout(edge3, tmp_path / "edge3")
    source_blob = le.blob_path(layout, le.read_manifest(layout, "source")["layers"][0]["digest"]).read_bytes()
    other_stream = gzip.compress(gzip.decompress(source_blob), compresslevel=1, mtime=0)
    builder = GzipIndexBuilder(span=65536)
    builder.feed(other_stream)
    bad_meta = builder.finish(len(source_blob))  # sizes claim the real blob
    assert len(GzipIndex.parse(bad_meta).entries) > 1

    turbo = le.read_manifest(layout, "turbo")
    members = le.turbo_members(le.blob_path(layout, turbo["layers"][0]["digest"]).read_bytes())
    assert "gzip.meta" in members and "ext4.fs.meta" in members
    members["gzip.meta"] = bad_meta
    le.replace_turbo_layer(layout, "turbo", 0, members)

    report = _verify(layout, "turbo", "source")
    assert not report.ok
    errors = [str(f) for f in report.platforms[0].errors]
    assert any("layer 0" in e and "gzip.meta access point" in e for e in errors), errors


def test_docker_media_type_conversion_verifies(hello: Path, tmp_path: Path) -> None:
    """With --oci=false the image uses Docker media types throughout; verify checks them as a family."""
    from obdconv.pipeline.runner import RunnerOptions, convert
    from obdconv.request import ConversionRequest

    layout = le.copy_layout(hello, tmp_path / "hello")
    convert(ConversionRequest(repository=f"oci:{layout}", input_tag="amd64", overlaybd_tag="docker-obd",
                              turbo_tag="docker-turbo", workdir=str(tmp_path / "work"), oci=False),
            options=RunnerOptions(workers=1))
    for tag, layer_type in (("docker-obd", "application/vnd.docker.image.rootfs.diff.tar"),
                            ("docker-turbo", "application/vnd.docker.image.rootfs.diff.tar.gzip")):
        assert le.read_manifest(layout, tag)["layers"][0]["mediaType"] == layer_type
        report = _verify(layout, tag, "amd64")
        assert report.ok, report.format_text()
