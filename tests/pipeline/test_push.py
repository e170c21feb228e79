"""Config / manifest / index rewriting keeps what the reference drops, and sets what it sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from obdconv.oci import mediatypes as mt
from obdconv.pipeline.annotations import layer_annotations
from obdconv.pipeline.push import _dump, build_index, build_manifest, rewrite_config

SOURCE_CONFIG = (
    b'{"architecture":"amd64","config":{"Hostname":"","Env":["A=<b>&c"],"Cmd":["/hello"],'
    b'"Healthcheck":{"Test":["CMD","true"]},"OnBuild":null,"Shell":["/bin/sh","-c"]},'
    b'"container":"abc","container_config":{"Cmd":["/bin/sh"]},"created":"2023-05-04T17:37:03.872958712Z",'
    b'"docker_version":"20.10.23","history":[{"created":"2023-05-04T17:37:03Z","created_by":"x"}],'
    b'"os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:' + b"1" * 64 + b'"]},"zz_unknown":1.5}'
)


def test_config_rewrite_keeps_every_field_and_order() -> None:
    new = "sha256:" + "2" * 64
    out = rewrite_config(SOURCE_CONFIG, [new])
    src, got = json.loads(SOURCE_CONFIG), json.loads(out)
    assert list(got) == list(src)  # same keys, same order
    assert got["rootfs"]["diff_ids"] == [new]
    for key in src:
        if key != "rootfs":
            assert got[key] == src[key], key
    assert list(got["config"]) == list(src["config"])  # Docker-only keys kept
    # Go's encoder escapes HTML characters
    assert b"\\u003cb\\u003e\\u0026c" in out
    assert b" " not in out.replace(b"/bin/sh", b"")  # compact


def test_manifest_layers_config_and_referrer() -> None:
    src_manifest = json.dumps({
        "schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST,
        "config": {"mediaType": mt.DOCKER_CONFIG, "digest": "sha256:" + "a" * 64, "size": 1},
        "layers": [{"mediaType": mt.DOCKER_LAYER_GZIP, "digest": "sha256:" + "b" * 64, "size": 2,
                    "urls": ["http://x"]}],
        "annotations": {"k": "v"},
    }).encode()
    d = "sha256:" + "c" * 64
    layer = {"mediaType": mt.OCI_LAYER_TAR, "digest": d, "size": 10,
             "annotations": layer_annotations("native", d, 10)}
    config_desc = {"mediaType": mt.OCI_CONFIG, "digest": "sha256:" + "e" * 64, "size": 5}
    subject = {"mediaType": mt.DOCKER_MANIFEST, "digest": "sha256:" + "f" * 64, "size": 3}
    out = json.loads(build_manifest(src_manifest, config_desc=config_desc, layers=[layer], oci=True,
                                    subject=subject, artifact_type=mt.ARTIFACT_TYPE_NATIVE))
    assert list(out) == ["schemaVersion", "mediaType", "artifactType", "config", "layers", "subject", "annotations"]
    assert out["mediaType"] == mt.OCI_MANIFEST
    assert out["layers"] == [layer]
    assert out["subject"] == subject and out["artifactType"] == mt.ARTIFACT_TYPE_NATIVE
    assert out["annotations"] == {"k": "v"}
    ann = out["layers"][0]["annotations"]
    assert ann == {"containerd.io/snapshot/overlaybd/blob-digest": d,
                   "containerd.io/snapshot/overlaybd/blob-size": "10",
                   "containerd.io/snapshot/overlaybd/version": "0.1.0"}
    plain = json.loads(build_manifest(src_manifest, config_desc=config_desc, layers=[layer], oci=False))
    assert plain["mediaType"] == mt.DOCKER_MANIFEST and "subject" not in plain


def test_turbo_annotations() -> None:
    d, src = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    ann = layer_annotations("turbo", d, 7, target_digest=src, target_media_type=mt.DOCKER_LAYER_GZIP)
    assert ann["containerd.io/snapshot/overlaybd/version"] == "0.1.0-turbo.ociv1"
    assert ann["containerd.io/snapshot/overlaybd/turbo-oci/target-digest"] == src
    assert list(ann) == sorted(ann)


def test_index_entries_keep_platform_and_drop_skipped() -> None:
    entries = [
        {"mediaType": mt.DOCKER_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 1,
         "platform": {"architecture": "amd64", "os": "linux"}},
        {"mediaType": mt.DOCKER_MANIFEST, "digest": "sha256:" + "2" * 64, "size": 1,
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"}},
        {"mediaType": mt.DOCKER_MANIFEST, "digest": "sha256:" + "3" * 64, "size": 1,
         "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
    ]
    src = json.dumps({"schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST_LIST, "manifests": entries}).encode()
    c1 = {"mediaType": mt.OCI_MANIFEST, "digest": "sha256:" + "a" * 64, "size": 9}
    c3 = {"mediaType": mt.OCI_MANIFEST, "digest": "sha256:" + "b" * 64, "size": 8}
    out = json.loads(build_index(src, [c1, None, c3], oci=False, resolved_media_type=mt.DOCKER_MANIFEST_LIST))
    assert out["mediaType"] == mt.DOCKER_MANIFEST_LIST  # kept without --oci, like the reference
    assert [m["digest"] for m in out["manifests"]] == [c1["digest"], c3["digest"]]
    assert out["manifests"][1]["platform"] == entries[2]["platform"]
    oci = json.loads(build_index(src, [c1, None, c3], oci=True, resolved_media_type=mt.DOCKER_MANIFEST_LIST))
    assert oci["mediaType"] == mt.OCI_INDEX
    # an index without mediaType gets the type it was resolved as (spec §10.5)
    bare = json.dumps({"schemaVersion": 2, "manifests": entries[:1]}).encode()
    out = json.loads(build_index(bare, [c1], oci=False, resolved_media_type=mt.OCI_INDEX))
    assert out["mediaType"] == mt.OCI_INDEX


def test_dump_failure_leaves_no_temp_file(tmp_path: Path) -> None:
    """--dump-manifest writes atomically; when the final rename fails (here: a directory sits at
    the target path) the error surfaces and no hidden temp file stays behind."""
    target = tmp_path / "manifest.json"
    (target / "occupied").mkdir(parents=True)
    with pytest.raises(OSError):
        _dump(target, b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    _dump(tmp_path / "config.json", b"{}")
    assert (tmp_path / "config.json").read_bytes() == b"{}"
    assert oct((tmp_path / "config.json").stat().st_mode & 0o777) == "0o644"
