"""Manifest/config JSON: Go byte parity against reference-convertor output, platforms, validation."""

from __future__ import annotations

import json

import pytest

from obdconv.errors import BadInputError
from obdconv.oci import mediatypes as mt
from obdconv.oci.manifest import (
    config_diff_ids,
    descriptor,
    detect_media_type,
    go_image_config,
    go_index,
    go_json,
    go_manifest,
    go_time,
    is_attestation,
    kind_of,
    parse_json,
    parse_platform,
    parse_platforms,
    platform_matches,
    validate_index,
    validate_manifest,
)
from tests.conftest import requires_shared
from tests.oci.helpers import EDGE3_BLOBS, EDGE3_SOURCE_CONFIG, FIXTURES

HELLO = FIXTURES / "hello-world" / "blobs" / "sha256"
HELLO_SOURCE_CONFIG = HELLO / "9c7a54a9a43cca047013b82af109fe963fde787f63f9e016fdc3384500c2823d"
HELLO_CONVERTED_CONFIG = HELLO / "b67b1f1224de620e9a932ab7ff0e819d7dd9d236605dd8027e5ecf2df650e65e"
HELLO_CONVERTED_MANIFEST = HELLO / "42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88"
HELLO_DOCKER_LIST = HELLO / "726023f73a8fc5103fa6776d48090539042cb822531c6b751b1f6dd18cb5705d"
HELLO_AMD64 = HELLO / "7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3"
EDGE3_OVERLAYBD_MANIFEST = EDGE3_BLOBS / "87f14781f8d67a17d4ff0871e503934f027b7e1b2968b12eb08ce24a49e31c5e"
EDGE3_OVERLAYBD_CONFIG = EDGE3_BLOBS / "fc4eb689ded42a226552b05b51f38f4504bef68c8daed73a548769336635599d"


@requires_shared
def test_docker_config_reencoded_like_reference() -> None:
    """Docker-only keys dropped, struct order, Go bytes: equals the reference's converted config."""
    converted = HELLO_CONVERTED_CONFIG.read_bytes()
    new_diff_ids = json.loads(converted)["rootfs"]["diff_ids"]
    got = go_json(go_image_config(parse_json(HELLO_SOURCE_CONFIG.read_bytes()), new_diff_ids))
    assert got == converted


@requires_shared
def test_umoci_config_reencoded_like_reference() -> None:
    converted = EDGE3_OVERLAYBD_CONFIG.read_bytes()
    source = parse_json(EDGE3_SOURCE_CONFIG.read_bytes())
    got = go_json(go_image_config(source, json.loads(converted)["rootfs"]["diff_ids"]))
    assert got == converted


@requires_shared
def test_converted_manifests_roundtrip_byte_exact() -> None:
    for blob in (HELLO_CONVERTED_MANIFEST, EDGE3_OVERLAYBD_MANIFEST):
        raw = blob.read_bytes()
        assert go_json(parse_json(raw)) == raw
        assert go_json(go_manifest(parse_json(raw))) == raw


@requires_shared
def test_manifest_built_from_descriptors_matches_reference() -> None:
    raw = EDGE3_OVERLAYBD_MANIFEST.read_bytes()
    ref = json.loads(raw)
    layers = []
    for layer in ref["layers"]:
        digest, size = layer["digest"], layer["size"]
        # insertion order deliberately not sorted: Go sorts map keys
        annotations = {mt.ANNOTATION_VERSION: mt.OVERLAYBD_VERSION, mt.ANNOTATION_BLOB_SIZE: str(size),
                       mt.ANNOTATION_BLOB_DIGEST: digest}
        layers.append(descriptor(mt.native_layer_type(oci=True), digest, size, annotations))
    manifest = {"schemaVersion": 2, "mediaType": mt.output_manifest_type(oci=True),
                "config": descriptor(mt.output_config_type(oci=True), ref["config"]["digest"], ref["config"]["size"]),
                "layers": layers}
    assert go_json(go_manifest(manifest)) == raw


def test_go_escaping() -> None:
    # Known Go encoding/json outputs (HTML-safe escaping, U+2028/9, raw UTF-8, \u00xx controls).
    assert go_json({"k": "<a href=\"x\">&</a>"}) == b'{"k":"\\u003ca href=\\"x\\"\\u003e\\u0026\\u003c/a\\u003e"}'
    assert go_json(["\u2028\u2029"]) == b'["\\u2028\\u2029"]'
    assert go_json("caf\u00e9 \u4e16") == "\"caf\u00e9 \u4e16\"".encode()
    assert go_json("\x01\x1f\n\t\\") == b'"\\u0001\\u001f\\n\\t\\\\"'
    assert go_json({"b": 1, "a": [True, None, 1.5, 1e21, 1e-7, 100.0]}) == b'{"b":1,"a":[true,null,1.5,1e+21,1e-7,100]}'
    assert go_json("\ud800") == '"\ufffd"'.encode()


def test_go_time() -> None:
    assert go_time("2024-01-01T00:00:00.100000000Z") == "2024-01-01T00:00:00.1Z"
    assert go_time("2024-01-01T00:00:00.000Z") == "2024-01-01T00:00:00Z"
    assert go_time("2024-01-01T10:00:00+00:00") == "2024-01-01T10:00:00Z"
    assert go_time("2024-01-01T10:00:00.5+02:00") == "2024-01-01T10:00:00.5+02:00"
    with pytest.raises(BadInputError):
        go_time("2024-13-01T00:00:00Z")
    with pytest.raises(BadInputError):
        go_time("yesterday")


def test_config_rules() -> None:
    source = {
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00.500Z",
        "config": {"Env": [], "Cmd": None, "Labels": {"z": "1", "a": "2"}, "ExposedPorts": {"80/tcp": {"x": 1}},
                   "Healthcheck": {"Test": ["NONE"]}, "ArgsEscaped": True, "user": "case-insensitive"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]},
        "history": [{"created_by": "x", "empty_layer": False}],
        "container_config": {},
    }
    out = go_image_config(source)
    assert list(out) == ["created", "architecture", "os", "config", "rootfs", "history"]
    assert out["created"] == "2024-01-01T00:00:00.5Z"
    assert out["config"] == {"User": "case-insensitive", "ExposedPorts": {"80/tcp": {}}, "Labels": {"a": "2", "z": "1"},
                             "ArgsEscaped": True}
    assert list(out["config"]["Labels"]) == ["a", "z"]
    assert out["history"] == [{"created_by": "x"}]
    with pytest.raises(BadInputError, match="Env"):
        go_image_config({"config": {"Env": "not-a-list"}})


@requires_shared
def test_kinds_and_detection() -> None:
    assert kind_of(mt.OCI_MANIFEST) == kind_of(mt.DOCKER_MANIFEST) == "manifest"
    assert kind_of(mt.OCI_INDEX) == kind_of(mt.DOCKER_MANIFEST_LIST) == "index"
    assert kind_of(mt.DOCKER_MANIFEST_V1_SIGNED) == "other"
    assert detect_media_type({"manifests": []}) == mt.OCI_INDEX
    assert detect_media_type(parse_json(HELLO_AMD64.read_bytes())) == mt.DOCKER_MANIFEST


@requires_shared
def test_platform_matching_on_docker_list() -> None:
    index = parse_json(HELLO_DOCKER_LIST.read_bytes())
    validate_index(index)
    entries = index["manifests"]

    def pick(spec: str) -> list[str]:
        wanted = parse_platforms(spec)
        return [e["digest"] for e in entries if platform_matches(e, wanted)]

    assert len(pick("")) == len(entries)
    assert pick("linux/amd64") == [HELLO_AMD64.name.join(["sha256:", ""])]
    arm64 = [e for e in entries if e["platform"]["architecture"] == "arm64"]
    assert pick("linux/arm64/v8") == pick("linux/aarch64") == [e["digest"] for e in arm64]
    arm = {e["platform"].get("variant") for e in entries if e["platform"]["architecture"] == "arm"}
    assert len(pick("linux/arm")) == len(arm) > 1
    assert len(pick("linux/arm/v7")) == 1
    assert pick("windows/amd64,linux/s390x") == [e["digest"] for e in entries
                                                 if e["platform"]["architecture"] == "s390x"]
    with pytest.raises(BadInputError, match="platform"):
        parse_platform("linux")


def test_attestation_detection() -> None:
    att = {"mediaType": mt.OCI_MANIFEST, "digest": "sha256:" + "0" * 64, "size": 1,
           "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
           "platform": {"architecture": "unknown", "os": "unknown"}}
    assert is_attestation(att)
    assert not is_attestation({"annotations": {"vnd.docker.reference.type": "other"}})
    assert not is_attestation({})


@requires_shared
def test_validation_names_problem() -> None:
    good = parse_json(HELLO_AMD64.read_bytes())
    validate_manifest(good)
    with pytest.raises(BadInputError, match="schemaVersion"):
        validate_manifest({**good, "schemaVersion": 1})
    with pytest.raises(BadInputError, match="config"):
        validate_manifest({k: v for k, v in good.items() if k != "config"})
    with pytest.raises(BadInputError, match=r"layer 0.*digest"):
        validate_manifest({**good, "layers": [{"mediaType": mt.DOCKER_LAYER_GZIP, "size": 1, "digest": "md5:xyz!"}]})
    with pytest.raises(BadInputError, match="size"):
        validate_manifest({**good, "layers": [{**good["layers"][0], "size": -1}]})
    with pytest.raises(BadInputError, match="not valid JSON"):
        parse_json(b"{")
    with pytest.raises(BadInputError, match="not a JSON object"):
        parse_json(b"[]")


@requires_shared
def test_config_diff_ids_length_checked() -> None:
    config = parse_json(HELLO_SOURCE_CONFIG.read_bytes())
    assert config_diff_ids(config, 1) == config["rootfs"]["diff_ids"]
    with pytest.raises(BadInputError, match="2 layers"):
        config_diff_ids(config, 2)


@requires_shared
def test_index_reencoding_drops_unknown_and_keeps_platform() -> None:
    index = parse_json(HELLO_DOCKER_LIST.read_bytes())
    out = go_index(index)
    assert list(out) == ["schemaVersion", "mediaType", "manifests"]
    first = out["manifests"][0]
    assert list(first) == ["mediaType", "digest", "size", "platform"]
    assert first["platform"] == {"architecture": "amd64", "os": "linux"}


def test_turbo_target_media_type() -> None:
    assert mt.turbo_target_media_type(mt.DOCKER_LAYER_GZIP, True) == mt.DOCKER_LAYER_GZIP
    assert mt.turbo_target_media_type(mt.DOCKER_LAYER_GZIP, False) == mt.DOCKER_LAYER_TAR
    assert mt.turbo_target_media_type(mt.OCI_LAYER_TAR, True) == mt.OCI_LAYER_GZIP
