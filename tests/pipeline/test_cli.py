"""`obdconv convert` flags: names, defaults and precedence as in the reference convertor."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from obdconv.cli.convert import add_arguments, build_request
from obdconv.cli.main import main
from obdconv.errors import NotFoundError, UnsupportedError, UsageError
from obdconv.pipeline.validate import validate_request
from obdconv.request import ConversionRequest


def parse(*argv: str) -> ConversionRequest:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return build_request(p.parse_args(list(argv)))


def test_defaults_match_reference() -> None:
    r = parse("-r", "localhost:5000/x", "-i", "t", "-o", "out")
    assert r.overlaybd_tag == "out" and r.turbo_tag == ""
    assert r.mkfs is True and r.vsize_gb == 64 and r.fstype == "ext4"
    assert r.concurrency_limit == 4 and r.workdir == "tmp_conv"
    assert not (r.oci or r.referrer or r.no_upload or r.reserve or r.dump_manifest)
    assert r.algorithm == "lz4" and r.block_size == 4096


def test_output_tag_ignored_when_format_tag_given() -> None:
    r = parse("-r", "h:1/x", "-i", "t", "-o", "ignored", "--turboOCI", "tt")
    assert r.overlaybd_tag == "" and r.turbo_tag == "tt"
    r = parse("-r", "h:1/x", "-i", "t", "--fastoci", "old", "--turboOCI", "new", "--overlaybd", "n")
    assert r.turbo_tag == "new" and r.overlaybd_tag == "n"
    assert parse("-r", "h:1/x", "-i", "t", "--fastoci", "old").turbo_tag == "old"


def test_bool_flags_take_explicit_values() -> None:
    r = parse("-r", "h:1/x", "-i", "t", "-o", "o", "--mkfs=false", "--oci", "--plain=true", "--no-upload=1")
    assert r.mkfs is False and r.oci is True and r.access.plain is True and r.no_upload is True
    assert parse("-r", "h:1/x", "-i", "t", "-o", "o", "--referrer").oci is True  # --referrer forces --oci


def test_repeatable_and_extra_flags() -> None:
    r = parse("-r", "oci:/tmp/l", "-g", "sha256:" + "a" * 64, "-o", "o", "--platform", "linux/amd64",
              "--platform", "linux/arm64", "--cert-dir", "/a", "--cert-dir", "/b", "--bs", "16",
              "--algorithm", "zstd", "--output-repository", "oci:/tmp/out")
    assert r.platforms == ["linux/amd64", "linux/arm64"]
    assert r.access.cert_dir == ["/a", "/b"]
    assert r.block_size == 16384 and r.algorithm == "zstd"
    assert r.output_repository == "oci:/tmp/out"


def test_unknown_db_type_falls_back_to_no_dedup() -> None:
    assert parse("-r", "h:1/x", "-i", "t", "-o", "o", "--db-type", "postgres", "--db-str", "x").db_type == ""


def test_validation_messages() -> None:
    with pytest.raises(UsageError, match=r"one of input-tag \[-i\] or input-digest \[-g\] is required"):
        validate_request(parse("-r", "h:1/x", "-o", "o"))
    with pytest.raises(UsageError, match=r"output-tag is required, you can specify it by \[-o\|--overlaybd\|--turboOCI\]"):
        validate_request(parse("-r", "h:1/x", "-i", "t"))
    with pytest.raises(UnsupportedError, match="not supported"):
        validate_request(parse("-r", "h:1/x", "-i", "t", "--turboOCI", "t", "--fstype", "erofs"))
    validate_request(parse("-r", "h:1/x", "-i", "t", "-o", "o", "--mkfs=false"))  # supported now
    with pytest.raises(UsageError, match="--base-layer is used only with --mkfs=false"):
        validate_request(parse("-r", "h:1/x", "-i", "t", "-o", "o", "--base-layer", "/x"))
    with pytest.raises(UsageError, match="a turboOCI image cannot be flattened"):
        validate_request(parse("-r", "h:1/x", "-i", "t", "--overlaybd", "o", "--turboOCI", "t", "--flatten"))
    with pytest.raises(UsageError, match="power of two"):
        validate_request(parse("-r", "h:1/x", "-i", "t", "-o", "o", "--bs", "12"))
    with pytest.raises(UsageError, match="4 to 32 KiB"):
        validate_request(parse("-r", "h:1/x", "-i", "t", "-o", "o", "--bs", "64"))
    # output tags are checked before any work (a registry would refuse them only at the final push)
    for flag, name in (("-obad tag", "--overlaybd/-o"), ("--overlaybd=-dash", "--overlaybd/-o"),
                       ("--turboOCI=a/b", "--turboOCI"), ("--turboOCI=" + "x" * 129, "--turboOCI")):
        with pytest.raises(UsageError, match=f"^{name} '.*': not a valid tag"):
            validate_request(parse("-r", "h:1/x", "-i", "t", flag))
    assert validate_request(parse("-r", "h:1/x", "-i", "t", "--turboOCI", "v1.2_x-" + "y" * 121))


def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "-r", "oci:/nonexistent", "-o", "o"]) == UsageError.exit_code
    assert "input-tag" in capsys.readouterr().err
    missing = "/nonexistent/baselayers/ext4_64"
    assert main(["convert", "-r", "oci:/nonexistent", "-i", "t", "-o", "o", "--mkfs=false", "--base-layer",
                 missing]) == NotFoundError.exit_code
    assert f"base layer {missing}: no such file" in capsys.readouterr().err


def test_cli_convert_by_digest_with_referrer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from tests.pipeline.images import Layout, file, layer
    from tests.pipeline.readback import manifest, tag_digest

    lay = Layout(tmp_path / "src")
    src = lay.image([layer([file("a", b"a")])], docker=True)  # untagged: reachable by digest only
    code = main(["convert", "-r", f"oci:{lay.root}", "-g", src["digest"], "--overlaybd", "obd", "--referrer",
                 "--json", "--workers", "1", "-d", str(tmp_path / "w")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    out = result["outputs"][0]
    assert out["tag"] == "obd" and tag_digest(lay.root, "obd") == out["root_digest"]
    m = manifest(lay.root, out["root_digest"])
    assert m["mediaType"] == "application/vnd.oci.image.manifest.v1+json"  # --referrer forces --oci
    assert m["artifactType"] == "application/vnd.containerd.overlaybd.native.v1+json"
    assert m["subject"] == {"mediaType": src["mediaType"], "digest": src["digest"], "size": src["size"]}
