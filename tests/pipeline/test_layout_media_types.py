"""An `oci:` layout target gets OCI media types unless `--oci=false` says otherwise: skopeo, podman
and buildah see no Docker-typed manifest in an OCI layout (issue #13, defect 8). Decided once, in
`validate_request`, for convert, submit, the API and the fleet alike."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from obdconv.cli import convert as convert_cli
from obdconv.cli import fleet as fleet_cli
from obdconv.cli.main import main
from obdconv.pipeline.validate import validate_request
from obdconv.request import ConversionRequest
from tests.pipeline.images import Layout, file, layer
from tests.pipeline.readback import manifest, tag_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def settled(repository: str, output_repository: str = "", oci: bool | None = None, referrer: bool = False) -> bool:
    request = ConversionRequest(repository, input_tag="t", overlaybd_tag="o", output_repository=output_repository,
                                oci=oci, referrer=referrer)
    validate_request(request)
    assert request.oci is not None
    return request.oci


def test_media_types_follow_the_target_unless_asked() -> None:
    assert settled("oci:/l") is True
    assert settled("localhost:5000/app", output_repository="oci:/out") is True
    assert settled("localhost:5000/app") is False  # a registry: Docker schema 2, like the reference
    assert settled("oci:/l", output_repository="localhost:5000/app") is False
    assert settled("oci:/l", oci=False) is False  # asked for: kept
    assert settled("localhost:5000/app", oci=True) is True


def parse_convert(*argv: str) -> ConversionRequest:
    p = argparse.ArgumentParser()
    convert_cli.add_arguments(p)
    return convert_cli.build_request(p.parse_args(list(argv)))


def parse_submit(*argv: str) -> ConversionRequest:
    p = argparse.ArgumentParser()
    fleet_cli.register(p.add_subparsers())
    return fleet_cli.request_from_args(p.parse_args(["submit", *argv]))


@pytest.mark.parametrize("parse", [parse_convert, parse_submit], ids=["convert", "submit"])
def test_every_entry_point_leaves_it_to_validation(parse: object) -> None:
    for argv, target_is_layout, want in (((), True, True), ((), False, False), (("--oci",), False, True),
                                         (("--referrer",), True, True)):
        repository = "oci:/l" if target_is_layout else "localhost:5000/app"
        request = parse("-r", repository, "-i", "t", "--overlaybd", "o", *argv)  # type: ignore[operator]
        validate_request(request)
        assert request.oci is want, (argv, repository)
    assert parse_convert("-r", "oci:/l", "-i", "t", "--overlaybd", "o", "--oci=false").oci is False


def test_api_body_leaves_it_to_validation() -> None:
    from api.models import ConversionIn

    body = ConversionIn(repository="oci:/l", input_tag="t", overlaybd_tag="o")
    request = body.to_request("oci:/l", "")
    validate_request(request)
    assert request.oci is True


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed (scripts/setup.sh installs it)")
def test_converted_image_in_a_layout_is_readable_by_skopeo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lay = Layout(tmp_path / "src")
    lay.image([layer([file("a", b"a" * 5000)], docker=True), layer([file("b", b"b")], "none", docker=True)],
              docker=True, tag="v1")
    code = main(["convert", "-r", f"oci:{lay.root}", "-i", "v1", "--overlaybd", "v1-obd", "--turboOCI", "v1-turbo",
                 "--json", "--workers", "1", "-d", str(tmp_path / "w")])
    assert code == 0
    outputs = {o["tag"]: o for o in json.loads(capsys.readouterr().out)["outputs"]}
    for tag in ("v1-obd", "v1-turbo"):
        digest = outputs[tag]["root_digest"]
        assert tag_digest(lay.root, tag) == digest and manifest(lay.root, digest)["mediaType"] == OCI_MANIFEST
        seen = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{lay.root}:{tag}"], capture_output=True,
                                         text=True, check=True, timeout=60).stdout)
        assert seen["Digest"] == digest and len(seen["Layers"]) == 2
        copied = tmp_path / f"copied-{tag}"
        subprocess.run(["skopeo", "copy", f"oci:{lay.root}:{tag}", f"dir:{copied}"], capture_output=True, check=True,
                       timeout=60)
        m = json.loads((copied / "manifest.json").read_bytes())
        assert m["mediaType"] == OCI_MANIFEST
        assert all((copied / d["digest"].partition(":")[2]).is_file() for d in [m["config"], *m["layers"]])

    # Docker media types when asked for: what skopeo cannot see in a layout.
    assert main(["convert", "-r", f"oci:{lay.root}", "-i", "v1", "--overlaybd", "v1-docker", "--oci=false",
                 "--workers", "1", "-d", str(tmp_path / "w")]) == 0
    assert manifest(lay.root, tag_digest(lay.root, "v1-docker"))["mediaType"] == DOCKER_MANIFEST
    proc = subprocess.run(["skopeo", "inspect", f"oci:{lay.root}:v1-docker"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "no descriptor found" in proc.stderr
