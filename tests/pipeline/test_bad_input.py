"""Bad input and failure paths through `obdconv convert`: the user gets the error class's exit code and
one line naming the problem; the target gets nothing (no blob, no manifest, no tag); nothing is left
on disk under --dir."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from obdconv.cli.main import main
from obdconv.errors import (
    BadInputError,
    NetworkError,
    NotFoundError,
    ObdconvError,
    UnsafePathError,
    UnsupportedError,
)
from obdconv.pipeline.runner import ProgressEvent, RunnerOptions, convert
from obdconv.registry import open_repository
from obdconv.request import ConversionRequest, RegistryAccess
from tests.conftest import requires_root
from tests.pipeline.images import (
    LAYER_TYPES,
    Layer,
    Layout,
    directory,
    file,
    hardlink,
    layer,
    make_tar,
    sha,
    symlink,
)
from tests.pipeline.test_e2e_registry import PLAIN, push_layout_image, repo_state
from tests.services.registry import start_registry

Builder = Callable[[Layout], None]
PAYLOAD = bytes(range(256)) * 200  # 51200 bytes: a few gzip blocks, several 4 KiB data blocks


def _good() -> Layer:
    return layer([directory("etc"), file("etc/a", b"hello\n" * 100)])


def _gzip_layer(blob: bytes, tar: bytes) -> Layer:
    return Layer(blob, sha(tar), LAYER_TYPES[(False, "gzip")])


def truncated_gzip(lay: Layout) -> None:
    tar = make_tar([directory("etc"), file("etc/a", PAYLOAD)])
    lay.image([_good(), _gzip_layer(gzip.compress(tar)[:-200], tar)], tag="t")


def truncated_tar(lay: Layout) -> None:
    tar = make_tar([directory("etc"), file("etc/a", PAYLOAD)])[:20000]  # cut inside etc/a's content
    lay.image([_good(), _gzip_layer(gzip.compress(tar), tar)], tag="t")


def not_gzip(lay: Layout) -> None:
    blob = b"\x1f\x8b" + b"\x07" * 1000  # gzip magic, then an unknown compression method
    lay.image([_gzip_layer(blob, b"")], tag="t")


def path_escape(lay: Layout) -> None:
    lay.image([_good(), layer([file("../../escaped", b"x")])], tag="t")


def hardlink_escape(lay: Layout) -> None:
    lay.image([layer([hardlink("x", "../../etc/passwd")])], tag="t")


def through_symlink(lay: Layout) -> None:
    lay.image([layer([symlink("etc", "../../../tmp"), file("etc/x", b"x")])], tag="t")


def missing_layer_blob(lay: Layout) -> None:
    victim = layer([file("b", b"b")])
    lay.image([_good(), victim], tag="t")
    lay.blob_path(victim.digest).unlink()


def diff_id_mismatch(lay: Layout) -> None:
    second = layer([file("b", b"b")])
    second.diff_id = sha(b"not this layer's tar")
    lay.image([_good(), second], tag="t")


def diff_id_count(lay: Layout) -> None:
    first = _good()
    lay.image([first, layer([file("b", b"b")])], tag="t",
              config_extra={"rootfs": {"type": "layers", "diff_ids": [first.diff_id]}})


def manifest_not_json(lay: Layout) -> None:
    lay.tag("application/vnd.oci.image.manifest.v1+json", b"{not json", "t")


def _tar_layer(compress: Callable[[bytes], bytes]) -> Layer:
    tar = make_tar([directory("etc"), file("etc/a", PAYLOAD)])
    return Layer(compress(tar), sha(tar), LAYER_TYPES[(False, "none")])


def bzip2_layer(lay: Layout) -> None:
    lay.image([_good(), _tar_layer(bz2.compress)], tag="t")


def xz_layer(lay: Layout) -> None:
    lay.image([_good(), _tar_layer(lzma.compress)], tag="t")


def already_converted(lay: Layout) -> None:
    """The image to convert is itself an overlaybd image (converted into this layout just now)."""
    lay.image([_good()], tag="src")
    work = lay.root.parent / "first-work"
    convert(ConversionRequest(repository=f"oci:{lay.root}", input_tag="src", overlaybd_tag="t", workdir=str(work)),
            options=RunnerOptions(workers=1))


def zero_layers(lay: Layout) -> None:
    lay.image([], tag="t")


def _edit_manifest(lay: Layout, tag: str, edit: Callable[[dict[str, object]], None]) -> None:
    desc = lay.resolve(tag)
    doc = json.loads(lay.manifest_bytes(desc["digest"]))
    edit(doc)
    lay.tag(desc["mediaType"], json.dumps(doc).encode(), tag)


def layer_size_wrong(lay: Layout) -> None:
    lay.image([_good(), layer([file("b", PAYLOAD)])], tag="t")
    _edit_manifest(lay, "t", lambda m: m["layers"][1].update(size=m["layers"][1]["size"] - 1))  # type: ignore[index]


def config_size_wrong(lay: Layout) -> None:
    lay.image([_good()], tag="t")
    _edit_manifest(lay, "t", lambda m: m["config"].update(size=m["config"]["size"] + 7))  # type: ignore[index]


def manifest_size_wrong(lay: Layout) -> None:
    lay.image([_good()], tag="t")
    index = json.loads((lay.root / "index.json").read_text())
    index["manifests"][-1]["size"] += 1
    (lay.root / "index.json").write_text(json.dumps(index))


CASES: list[tuple[str, Builder, type[ObdconvError], str]] = [
    ("truncated-gzip", truncated_gzip, BadInputError, r"truncated gzip|gzip blob .*truncated"),
    ("truncated-tar", truncated_tar, BadInputError, "truncated tar: entry 'etc/a'"),
    ("not-gzip", not_gzip, BadInputError, "gzip"),
    ("path-escape", path_escape, UnsafePathError, "'../../escaped'.*escapes the root"),
    ("hardlink-escape", hardlink_escape, UnsafePathError, "'../../etc/passwd' escapes the root"),
    ("through-symlink", through_symlink, BadInputError, "parent 'etc' is a symlink"),
    ("missing-layer-blob", missing_layer_blob, NotFoundError, "not found"),
    ("diff-id-mismatch", diff_id_mismatch, BadInputError, "has diff_id .*config says"),
    ("diff-id-count", diff_id_count, BadInputError, "1 diff_ids for 2 layers"),
    ("manifest-not-json", manifest_not_json, BadInputError, "not valid JSON"),
    ("bzip2-layer", bzip2_layer, UnsupportedError, "bzip2 compressed layer: bzip2/xz compressed layers are not supported"),
    ("xz-layer", xz_layer, UnsupportedError, "xz compressed layer: bzip2/xz compressed layers are not supported"),
    ("already-converted", already_converted, BadInputError,
     "is already an overlaybd/turboOCI image .*overlaybd annotation containerd.io/snapshot/overlaybd/"),
    ("zero-layers", zero_layers, BadInputError, "has no layers: nothing to convert"),
    ("layer-size-wrong", layer_size_wrong, BadInputError, r"descriptor says \d+ bytes, the blob has \d+"),
    ("config-size-wrong", config_size_wrong, BadInputError, r"config sha256:\w+: the descriptor says \d+ bytes"),
    ("manifest-size-wrong", manifest_size_wrong, BadInputError, r"index.json's descriptor says \d+ bytes"),
]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(("name", "build", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_image_fails_cleanly(name: str, build: Builder, error: type[ObdconvError], message: str,
                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lay = Layout(tmp_path / "src")
    build(lay)
    before = {p: p.read_bytes() for p in lay.root.rglob("*") if p.is_file() and p.name != ".obdconv-index.lock"}
    work = tmp_path / "work"
    code = main(["convert", "-r", f"oci:{lay.root}", "-i", "t", "--overlaybd", "obd", "--turboOCI", "turbo",
                 "-d", str(work), "--workers", "1"])
    err = capsys.readouterr().err
    assert code == error.exit_code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("obdconv: error: "), err
    assert re.search(message, last), last
    # the layout (source and target) is exactly as before: no blob, no manifest, no tag
    after = {p: p.read_bytes() for p in lay.root.rglob("*") if p.is_file() and p.name != ".obdconv-index.lock"}
    assert after == before
    # no prepared layer, metadata image or metadata work directory is left: --dir itself is gone
    assert not work.exists(), _files(work)


def test_bad_image_error_class_in_api(tmp_path: Path) -> None:
    """The Python API raises the class (the CLI maps it to the exit code checked above)."""
    lay = Layout(tmp_path / "src")
    path_escape(lay)
    request = ConversionRequest(repository=f"oci:{lay.root}", input_tag="t", overlaybd_tag="obd",
                                workdir=str(tmp_path / "work"))
    with pytest.raises(UnsafePathError, match="escapes the root"):
        convert(request, options=RunnerOptions(workers=2))
    assert [p for p in _files(tmp_path / "work") if p != "spool"] == []


@pytest.mark.services
def test_registry_dies_mid_push(tmp_path: Path) -> None:
    """The registry goes away after the first converted layer is uploaded: NetworkError (retryable,
    exit 75) within the retry budget, and once it is back no tag or manifest points at a half image."""
    lay = Layout(tmp_path / "src")
    lay.image([_good(), layer([file("b", PAYLOAD)]), layer([file("c", PAYLOAD[::-1])])], tag="v1")
    registry = start_registry(tmp_path / "registry")
    try:
        name = f"{registry.host}/dies"
        push_layout_image(lay.root, "v1", name)
        tags_before, _ = repo_state(registry, "dies")
        request = ConversionRequest(repository=name, input_tag="v1", overlaybd_tag="obd",
                                    workdir=str(tmp_path / "work"), access=RegistryAccess(plain=True))

        killed: list[bool] = []

        def kill_after_first_upload(event: ProgressEvent) -> None:
            if event.stage == "assemble" and event.finished and not killed:
                killed.append(True)
                registry.stop()

        start = time.monotonic()
        with pytest.raises(NetworkError) as caught:
            convert(request, options=RunnerOptions(workers=1), progress=kill_after_first_upload)
        assert killed and time.monotonic() - start < 60
        assert registry.host in str(caught.value)
        assert [p for p in _files(tmp_path / "work") if p != "spool"] == []
        registry = start_registry(tmp_path / "registry", port=registry.port)  # same storage
        tags_after, _ = repo_state(registry, "dies")
        assert tags_after == tags_before == ["v1"]
        assert open_repository(name, PLAIN).head_manifest("obd") is None
    finally:
        registry.stop()


def test_ctrl_c_exits_130_and_cleans_up(tmp_path: Path) -> None:
    """SIGINT to the process group (a terminal's Ctrl-C) while layers prepare: exit 130 promptly,
    'interrupted' on stderr, no prepared layer or work directory left, no tag or partial blob."""
    lay = Layout(tmp_path / "src")
    big = os.urandom(1 << 20)
    lay.image([layer([directory(f"d{k}"), *[file(f"d{k}/f{i}", big[i:] + big[:i]) for i in range(24)]])
               for k in range(4)], tag="t")
    index_before = (lay.root / "index.json").read_bytes()
    work = tmp_path / "work"
    proc = subprocess.Popen(
        [sys.executable, "-m", "obdconv", "convert", "-r", f"oci:{lay.root}", "-i", "t", "--overlaybd", "obd",
         "-d", str(work), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # a shell's background jobs inherit SIGINT ignored, and Python then keeps ignoring it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not (work / "spool").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.05)  # inside the prepares (the whole conversion takes about half a second more)
        assert proc.poll() is None, "conversion finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "obdconv: interrupted" in err
    assert [p for p in _files(work) if p != "spool"] == []
    # Layer blobs whose assemble finished may stay (unreferenced, like the reference convertor);
    # no tag, no manifest index entry, no partial upload, and every blob holds what its name says.
    assert (lay.root / "index.json").read_bytes() == index_before
    blobs = sorted((lay.root / "blobs" / "sha256").iterdir())
    assert all(sha(b.read_bytes()) == "sha256:" + b.name for b in blobs), [b.name for b in blobs]


@requires_root
def test_full_disk_names_the_directory_and_cleans_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dir on a 1 MiB tmpfs and a 3 MiB incompressible layer: ENOSPC while preparing is reported
    with the directory that filled up, and the partial spool is removed (the disk is free again)."""
    lay = Layout(tmp_path / "src")
    noise = os.urandom(1 << 20)
    lay.image([layer([file(f"f{i}", noise[i:] + noise[:i]) for i in range(3)])], tag="t")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(small)], check=True)
    try:
        work = small / "work"
        code = main(["convert", "-r", f"oci:{lay.root}", "-i", "t", "--overlaybd", "obd", "-d", str(work),
                     "--workers", "1"])
        err = capsys.readouterr().err
        assert code == ObdconvError.exit_code, err
        assert re.search(rf"No space left on device \(writing under --dir {re.escape(str(work))}\)", err), err
        assert [p for p in _files(work) if p != "spool"] == []
        assert os.statvfs(small).f_bfree == os.statvfs(small).f_blocks  # nothing left taking space
    finally:
        subprocess.run(["umount", str(small)], check=True)
