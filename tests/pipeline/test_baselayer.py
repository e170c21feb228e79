"""`--mkfs=false`: every layer stacked on the real overlaybd base layer (shared fixture), which the
output carries as its first layer (native: tar-wrapped like the reference; turbo: raw, under the
reference's hard-coded descriptor)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest

from obdconv.errors import FormatError, IntegrityError, NotFoundError
from obdconv.formats.blob import open_layer_blob
from obdconv.formats.lsmt import LSMTStack
from obdconv.formats.tarwrap import unwrap
from obdconv.pipeline.baselayer import TURBO_BASE_SIZE, load_base_layer, resolve_base_layer
from obdconv.pipeline.runner import ConversionResult, RunnerOptions, convert
from obdconv.request import ConversionProfile, ConversionRequest
from obdconv.verify import verify_reference
from tests.conftest import requires_root
from tests.pipeline.base_fixture import REFERENCE_NATIVE_PREFIX, TURBO_DIGEST, base_layer_path
from tests.pipeline.edge import edge_layers
from tests.pipeline.images import Layout
from tests.pipeline.readback import blob_path, manifest, tag_digest

NATIVE_TAR = "application/vnd.docker.image.rootfs.diff.tar"
VERSION = "containerd.io/snapshot/overlaybd/version"
BASE_FS_UUID = uuid.UUID("3d8b79fe-5d5f-40ce-a25b-45f392bdf32b")  # dumpe2fs of the fixture's filesystem


@pytest.fixture(scope="module")
def base_path() -> Path:
    return base_layer_path()


@pytest.fixture(scope="module")
def edge_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lay = Layout(tmp_path_factory.mktemp("base-src") / "src")
    lay.image(edge_layers(("gzip", "none", "gzip", "none"), docker=True), tag="docker")
    return lay.root


def run(layout: Path, tmp: Path, base: Path, *, native: str = "obd", turbo: str = "", workers: int = 1,
        **kw: object) -> ConversionResult:
    request = ConversionRequest(repository=f"oci:{layout}", input_tag="docker", overlaybd_tag=native, turbo_tag=turbo,
                                mkfs=False, base_layer=str(base), workdir=str(tmp / "work"), **kw)  # type: ignore[arg-type]
    return convert(request, options=RunnerOptions(workers=workers))


def test_native_base_blob_is_the_references_tar(base_path: Path) -> None:
    base = load_base_layer(str(base_path))
    assert base.digest == TURBO_DIGEST and base.size == TURBO_BASE_SIZE == base_path.stat().st_size
    assert base.vsize_gb == 64
    blob = b"".join(base.chunks("native"))
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == base.native_digest and len(blob) == base.native_size
    # the digest the reference's own tests expect for its tar-wrapped base layer
    assert base.native_digest.startswith(REFERENCE_NATIVE_PREFIX)
    with tarfile.open(fileobj=io.BytesIO(blob)) as t:
        (member,) = t.getmembers()
        assert (member.name, member.mode, member.size, member.mtime, member.uname) == (
            "overlaybd.commit", 0o444, base.size, 0, "")
    assert unwrap(blob) == (512, base.size)
    assert b"".join(base.chunks("turbo")) == base_path.read_bytes()
    converted = base.converted("turbo", oci=True)
    assert (converted.digest, converted.size, converted.diff_id) == (TURBO_DIGEST, TURBO_BASE_SIZE, TURBO_DIGEST)
    assert converted.media_type == "application/vnd.oci.image.layer.v1.tar"
    assert converted.annotations[VERSION] == "0.1.0"


def test_bad_base_layers_name_the_path(base_path: Path, tmp_path: Path, fixtures_dir: Path) -> None:
    missing = tmp_path / "no" / "ext4_64"
    with pytest.raises(NotFoundError, match=f"base layer {missing}: no such file"):
        load_base_layer(str(missing))
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a layer" * 1000)
    with pytest.raises(FormatError, match=f"base layer {junk} is not an overlaybd layer"):
        load_base_layer(str(junk))
    no_fs = fixtures_dir / "overlaybd" / "commit.lsmt.zfile.tar"  # a real layer, one 4 KiB write, no ext4
    with pytest.raises(FormatError, match=f"base layer {no_fs} is an overlaybd layer without an ext4 filesystem"):
        load_base_layer(str(no_fs))
    with pytest.raises(IntegrityError, match=f"base layer {base_path} on worker w9 has digest {TURBO_DIGEST}, but "
                                             "the conversion uses sha256:00"):
        load_base_layer(str(base_path), "sha256:" + "0" * 64, "worker w9")


def test_base_digest_is_in_the_profile_key(base_path: Path) -> None:
    request, base = resolve_base_layer(ConversionRequest("oci:/x", input_tag="t", overlaybd_tag="o", mkfs=False,
                                                         base_layer=str(base_path), vsize_gb=128))
    assert base is not None and request.vsize_gb == 64  # the base layer's size, as the reference
    (profile,) = request.profiles()
    assert profile.base_layer == TURBO_DIGEST
    keys = {profile.key(), ConversionProfile().key(), ConversionProfile(mkfs=False, base_layer="sha256:" + "1" * 64).key()}
    assert len(keys) == 3 and TURBO_DIGEST.partition(":")[2] in profile.key()
    assert ConversionProfile().key() == "native/ext4/v64/mkfs/lz4-4k/obdconv-1"  # unchanged for mkfs


@pytest.mark.slow
def test_mkfs_false_native_and_turbo(base_path: Path, edge_layout: Path, tmp_path: Path) -> None:
    result = run(edge_layout, tmp_path / "a", base_path, turbo="turbo")
    src = tag_digest(edge_layout, "docker")
    source_layers = manifest(edge_layout, src)["layers"]
    base = load_base_layer(str(base_path))
    for fmt, (digest, size) in (("native", (base.native_digest, base.native_size)),
                                ("turbo", (TURBO_DIGEST, TURBO_BASE_SIZE))):
        m = manifest(edge_layout, result.output(fmt).root_digest)
        assert len(m["layers"]) == len(source_layers) + 1
        first = m["layers"][0]
        assert (first["mediaType"], first["digest"], first["size"]) == (NATIVE_TAR, digest, size)
        assert first["annotations"] == {VERSION: "0.1.0", "containerd.io/snapshot/overlaybd/blob-digest": digest,
                                        "containerd.io/snapshot/overlaybd/blob-size": str(size)}
        assert blob_path(edge_layout, digest).stat().st_size == size
        config = json.loads(blob_path(edge_layout, m["config"]["digest"]).read_bytes())
        assert config["rootfs"]["diff_ids"][0] == digest and len(config["rootfs"]["diff_ids"]) == len(m["layers"])
        # the base layer's filesystem, continued (no mkfs of our own): its UUID in the superblock
        stack = LSMTStack([open_layer_blob(str(blob_path(edge_layout, d["digest"]))) for d in m["layers"][:2]]
                          if fmt == "native" else [open_layer_blob(str(blob_path(edge_layout, digest)))])
        assert uuid.UUID(bytes=stack.pread(1024 + 0x68, 16)) == BASE_FS_UUID
        report = verify_reference(f"oci:{edge_layout}:{result.output(fmt).tag}", f"oci:{edge_layout}:docker")
        assert report.ok, report.format_text()  # e2fsck -fn clean, every path equal to the source's
    # deterministic, also through the process pool
    again = run(edge_layout, tmp_path / "b", base_path, native="obd2", turbo="turbo2", workers=2)
    for fmt in ("native", "turbo"):
        assert again.output(fmt).root_digest == result.output(fmt).root_digest


def test_another_base_file_serves_native_but_not_turbo(base_path: Path, edge_layout: Path, tmp_path: Path) -> None:
    """A valid base layer that is not the reference's file (here: the same, tar-wrapped): the native
    image stacks on it (as it is: wrapped once, not twice); turboOCI would have to name it by the
    hard-coded descriptor, so it is refused."""
    other = tmp_path / "ext4_64.tar"
    other.write_bytes(b"".join(load_base_layer(str(base_path)).chunks("native")))
    result = run(edge_layout, tmp_path, other, native="other-obd", turbo="other-turbo")
    assert result.partial
    turbo = result.output("turbo")
    assert turbo.error["class"] == "UnsupportedError" and TURBO_DIGEST in turbo.error["message"]
    assert str(other) in turbo.error["message"] and not turbo.root_digest
    with pytest.raises(KeyError):
        tag_digest(edge_layout, "other-turbo")
    m = manifest(edge_layout, result.output("native").root_digest)
    assert m["layers"][0]["digest"] == load_base_layer(str(other)).native_digest == load_base_layer(
        str(base_path)).native_digest
    report = verify_reference(f"oci:{edge_layout}:other-obd", f"oci:{edge_layout}:docker")
    assert report.ok, report.format_text()


@pytest.mark.slow
@requires_root
def test_mkfs_false_mounts_to_the_source_tree(base_path: Path, edge_layout: Path, tmp_path: Path) -> None:
    run(edge_layout, tmp_path, base_path, native="m-obd", turbo="m-turbo")
    for tag in ("m-obd", "m-turbo"):
        report = verify_reference(f"oci:{edge_layout}:{tag}", f"oci:{edge_layout}:docker", mount=True)
        assert report.ok, report.format_text()
        assert report.platforms[0].fsck.status == "clean" and report.platforms[0].entries_compared > 30
