"""Dedup keeps `--mkfs=false` (keyed by the base layer's digest) and `--flatten` apart from the
default output, in both directions; within each, hits work (leading layers on the base layer too)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from obdconv.pipeline.runner import ConversionResult, ProgressEvent, RunnerOptions, convert
from obdconv.registry import RegistryOptions, open_repository
from obdconv.request import ConversionRequest, RegistryAccess
from obdconv.verify import verify_reference
from tests.pipeline.base_fixture import base_layer_path
from tests.pipeline.edge import base, top, upper
from tests.pipeline.images import Layout, file, layer
from tests.pipeline.test_e2e_registry import push_layout_image
from tests.services.registry import RegistryService

pytestmark = pytest.mark.services


def run(name: str, tag: str, out: str, tmp: Path, db: Path, **kw: Any) -> tuple[ConversionResult, list[str]]:
    prepared: list[str] = []

    def progress(e: ProgressEvent) -> None:
        if e.stage == "prepare" and e.finished:
            prepared.append(e.layer_digest)

    request = ConversionRequest(repository=name, input_tag=tag, overlaybd_tag=out, workdir=str(tmp / out),
                                access=RegistryAccess(plain=True), db_type="sqlite", db_str_ref="test", **kw)
    return convert(request, options=RunnerOptions(workers=1, db_str=str(db)), progress=progress), prepared


@pytest.fixture
def images(pipeline_registry: RegistryService, tmp_path: Path) -> str:
    lay = Layout(tmp_path / "src")
    shared = [layer(base(), "gzip", True), layer(upper(), "gzip", True)]
    lay.image([*shared, layer(top(), "gzip", True)], docker=True, tag="a")
    lay.image([*shared, layer([file("only-in-b", b"b" * 5000)], "none", True)], docker=True, tag="b")
    name = f"{pipeline_registry.host}/profiles-{tmp_path.name}"
    push_layout_image(lay.root, "a", name)
    push_layout_image(lay.root, "b", name)
    return name


def layer_count(name: str, digest: str) -> int:
    return len(json.loads(open_repository(name, RegistryOptions(plain=True)).get_manifest(digest).data)["layers"])


def test_mkfs_false_and_mkfs_are_never_each_others_hits(images: str, tmp_path: Path) -> None:
    base_layer = str(base_layer_path())
    db = tmp_path / "dedup.sqlite"
    mkfs, _ = run(images, "a", "mkfs", tmp_path, db)
    on_base, prepared = run(images, "a", "base", tmp_path, db, mkfs=False, base_layer=base_layer)
    assert len(prepared) == 3  # not a hit of the mkfs conversion
    assert layer_count(images, on_base.output("native").root_digest) == 4
    again, prepared = run(images, "a", "base2", tmp_path, db, mkfs=False, base_layer=base_layer)
    assert prepared == [] and again.output("native").root_digest == on_base.output("native").root_digest
    mkfs_again, prepared = run(images, "a", "mkfs2", tmp_path, db)
    assert prepared == [] and mkfs_again.output("native").root_digest == mkfs.output("native").root_digest
    # b shares a's two lower layers: they are reused, b's top converted on them and the base layer
    b, prepared = run(images, "b", "b-base", tmp_path, db, mkfs=False, base_layer=base_layer)
    assert len(prepared) == 1
    shared = list(on_base.output("native").layers)[:2]
    assert [b.output("native").layers[c] for c in shared] == [on_base.output("native").layers[c] for c in shared]
    report = verify_reference(f"{images}:b-base", f"{images}:b", RegistryOptions(plain=True))
    assert report.ok, report.format_text()


def test_flatten_is_deduplicated_apart_from_layered(images: str, tmp_path: Path) -> None:
    db = tmp_path / "dedup.sqlite"
    layered, _ = run(images, "a", "layered", tmp_path, db)
    flat, prepared = run(images, "a", "flat", tmp_path, db, flatten=True)
    assert len(prepared) == 3 and layer_count(images, flat.output("native").root_digest) == 1
    again, prepared = run(images, "a", "flat2", tmp_path, db, flatten=True)
    assert prepared == [] and again.output("native").root_digest == flat.output("native").root_digest
    layered_again, prepared = run(images, "a", "layered2", tmp_path, db)
    assert prepared == [] and layered_again.output("native").root_digest == layered.output("native").root_digest
    # b shares a's lower layers, but a flattened image is one layer of the whole chain: no layer reuse
    b, prepared = run(images, "b", "b-flat", tmp_path, db, flatten=True)
    assert len(prepared) == 3 and layer_count(images, b.output("native").root_digest) == 1
