"""resolve_image: which manifests get converted, which index entries are dropped, what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from obdconv.errors import BadInputError, UnsupportedError
from obdconv.oci.digests import chain_ids
from obdconv.pipeline.plan import ImagePlan, resolve_image
from obdconv.registry import open_repository
from tests.pipeline.images import Layout, file, layer

ATTESTATION = {"vnd.docker.reference.type": "attestation-manifest", "vnd.docker.reference.digest": "x"}


def _image(lay: Layout, name: str, arch: str = "amd64") -> dict:
    return lay.image([layer([file(name, name.encode())])], arch=arch)


def test_hello_world_list_plans_all_nine_platforms(fixtures_dir: Path) -> None:
    repo = open_repository(f"oci:{fixtures_dir / 'oci' / 'hello-world'}")
    plan = resolve_image(repo, "docker-list")
    assert plan.root_is_index and len(plan.manifests) == 9
    assert len(plan.indexes) == 1 and all(plan.indexes[0].children)
    for m in plan.manifests.values():
        assert m.chain_ids == chain_ids(m.diff_ids) and len(m.layers) == 1
    # round trip through JSON (the fleet ships plans)
    again = ImagePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.to_dict() == plan.to_dict()


def test_attestations_dropped_nested_index_kept_platform_filter(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "l")
    amd = {**_image(lay, "a"), "platform": {"os": "linux", "architecture": "amd64"}}
    arm = {**_image(lay, "b", "arm64"), "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}
    att = {**_image(lay, "c"), "platform": {"os": "unknown", "architecture": "unknown"}, "annotations": ATTESTATION}
    nested = lay.index([arm], docker=True)
    lay.index([amd, att, nested], tag="multi")
    repo = open_repository(f"oci:{lay.root}")

    plan = resolve_image(repo, "multi")
    assert set(plan.manifests) == {amd["digest"], arm["digest"]}  # attestation not converted
    assert next(i.digest for i in plan.indexes) == nested["digest"]  # children first
    root = plan.indexes[-1]
    assert root.children == [amd["digest"], "", nested["digest"]]

    only_amd = resolve_image(repo, "multi", ["linux/amd64"])
    assert set(only_amd.manifests) == {amd["digest"]}
    assert only_amd.indexes[-1].children == [amd["digest"], "", ""]  # nested index left empty: dropped
    with pytest.raises(BadInputError, match="no manifest left"):
        resolve_image(repo, "multi", ["linux/s390x"])


def test_unsupported_media_type_and_bad_config(tmp_path: Path) -> None:
    lay = Layout(tmp_path / "l")
    art = lay.tag("application/vnd.example.artifact+json", b'{"x":1}', "artifact")
    repo = open_repository(f"oci:{lay.root}")
    with pytest.raises((UnsupportedError, BadInputError)):
        resolve_image(repo, "artifact")
    lay.index([{**art, "annotations": {}}], tag="idx")
    with pytest.raises(UnsupportedError, match="unsupported media type"):
        resolve_image(repo, "idx")
    # a config with fewer diff_ids than layers (the reference panics)
    bad = lay.image([layer([file("a", b"a")]), layer([file("b", b"b")])], tag="bad",
                    config_extra={"rootfs": {"type": "layers", "diff_ids": []}})
    assert bad
    with pytest.raises(BadInputError, match="diff_ids"):
        resolve_image(repo, "bad")
