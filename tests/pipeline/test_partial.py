"""One format impossible, the other delivered: a zstd layer rules out turboOCI (decided at plan
time); the native output is still converted and pushed, the result names what is missing and why,
and `--all-or-nothing` fails the whole request instead, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from obdconv.cli.main import main
from obdconv.errors import PartialResultError, UnsupportedError
from obdconv.pipeline.feasibility import Refusal, deliverable
from obdconv.pipeline.runner import ProgressEvent, RunnerOptions, convert
from obdconv.request import ConversionProfile, ConversionRequest
from obdconv.verify import verify_reference
from tests.pipeline.edge import base, top, upper
from tests.pipeline.images import Layer as SourceLayer
from tests.pipeline.images import Layout, compress, layer, make_tar, sha
from tests.pipeline.readback import manifest, tag_digest
from tests.pipeline.test_e2e_layout import tree_hash


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    lay = Layout(tmp_path / "src")
    lay.image([layer(base(), "gzip"), layer(upper(), "zstd"), layer(top(), "none")], tag="zstd-typed")
    # media types lie: a "+gzip" layer holding zstd bytes is found by sniffing its first bytes
    tar = make_tar(top())
    liar = SourceLayer(compress(tar, "zstd"), sha(tar), "application/vnd.oci.image.layer.v1.tar+gzip")
    lay.image([layer(base(), "gzip"), liar], tag="zstd-sniffed")
    return lay.root


def blobs(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs" / "sha256").iterdir()}


def referenced(root: Path, manifest_digest: str) -> set[str]:
    m = manifest(root, manifest_digest)
    return {manifest_digest[7:], m["config"]["digest"][7:], *(d["digest"][7:] for d in m["layers"])}


@pytest.mark.parametrize("tag", ["zstd-typed", "zstd-sniffed"])
def test_native_delivered_turbo_refused_up_front(layout: Path, tmp_path: Path, tag: str) -> None:
    before = blobs(layout)
    events: list[ProgressEvent] = []
    request = ConversionRequest(repository=f"oci:{layout}", input_tag=tag, overlaybd_tag="obd", turbo_tag="turbo",
                                workdir=str(tmp_path / "w"))
    result = convert(request, options=RunnerOptions(workers=1), progress=events.append)
    assert result.partial and result.to_dict()["partial"] is True
    turbo = result.output("turbo")
    zstd_layer = manifest(layout, tag_digest(layout, tag))["layers"][1]["digest"]
    assert turbo.error == {"class": "UnsupportedError", "message": f"layer {zstd_layer} is zstd-compressed: "
                           "turboOCI needs gzip or uncompressed layers (the runtime reads file data from the "
                           "original blob)"}
    assert (turbo.tag, turbo.root_digest, turbo.manifests, turbo.layers) == ("turbo", "", {}, {})
    native = result.output("native")
    assert not native.error and native.root_digest == tag_digest(layout, "obd")
    # decided before any layer was prepared; nothing of turboOCI pushed: every new blob is native's
    assert [e.stage for e in events].index("prepare") > [e.stage for e in events].index("plan")
    assert not any(e.format == "turbo" for e in events)
    with pytest.raises(KeyError):
        tag_digest(layout, "turbo")
    assert blobs(layout) - before <= referenced(layout, native.root_digest)
    report = verify_reference(f"oci:{layout}:obd", f"oci:{layout}:{tag}")
    assert report.ok, report.format_text()


def test_all_or_nothing_fails_before_any_work(layout: Path, tmp_path: Path) -> None:
    before = tree_hash(layout)
    events: list[str] = []
    request = ConversionRequest(repository=f"oci:{layout}", input_tag="zstd-sniffed", overlaybd_tag="obd",
                                turbo_tag="turbo", all_or_nothing=True, workdir=str(tmp_path / "w"))
    with pytest.raises(UnsupportedError, match=r"^--all-or-nothing: nothing converted, as turboOCI: layer sha256:"):
        convert(request, options=RunnerOptions(workers=1), progress=lambda e: events.append(e.stage))
    assert "prepare" not in events
    assert tree_hash(layout) == before


def test_cli_partial_exit_code_text_and_json(layout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["convert", "-r", f"oci:{layout}", "-i", "zstd-typed", "--overlaybd", "obd", "--turboOCI", "turbo",
            "--workers", "1", "-d", str(tmp_path / "w")]
    assert main(argv) == PartialResultError.exit_code == 79
    out = capsys.readouterr().out
    assert f'converted to "oci:{layout}:obd", digest: "{tag_digest(layout, "obd")}"' in out
    assert f'turboOCI output "oci:{layout}:turbo" not built: UnsupportedError: layer sha256:' in out
    assert main([*argv, "--json"]) == 79
    doc = json.loads(capsys.readouterr().out)
    assert doc["partial"] is True
    assert {o["format"]: o["error"].get("class", "") for o in doc["outputs"]} == {"native": "",
                                                                                  "turbo": "UnsupportedError"}
    before = tree_hash(layout)
    assert main([*argv, "--all-or-nothing"]) == UnsupportedError.exit_code
    assert "--all-or-nothing: nothing converted" in capsys.readouterr().err
    assert tree_hash(layout) == before
    # turbo alone is no partial result: it fails as a whole, as before
    assert main(["convert", "-r", f"oci:{layout}", "-i", "zstd-typed", "--turboOCI", "t", "--workers", "1",
                 "-d", str(tmp_path / "w2")]) == UnsupportedError.exit_code


def test_deliverable() -> None:
    native, turbo = ConversionProfile("native"), ConversionProfile("turbo")
    refusal = {"turbo": Refusal("turbo", "UnsupportedError", "why")}
    assert deliverable([native, turbo], {}, all_or_nothing=True) == [native, turbo]
    assert deliverable([native, turbo], refusal, all_or_nothing=False) == [native]
    with pytest.raises(UnsupportedError, match=r"^--all-or-nothing: nothing converted, as turboOCI: why$"):
        deliverable([native, turbo], refusal, all_or_nothing=True)
    with pytest.raises(UnsupportedError, match=r"^turboOCI: why$"):
        deliverable([turbo], refusal, all_or_nothing=False)
