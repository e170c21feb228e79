"""The fleet with `--flatten` (one assemble task), `--mkfs=false` (the base layer each worker holds)
and partial results (PARTIAL final state, `--all-or-nothing`): real Redis, registry, two workers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from obdconv.cli.fleet import _exit_code
from obdconv.errors import PartialResultError
from obdconv.registry import RegistryOptions, open_repository
from obdconv.request import ConversionRequest, RegistryAccess
from obdconv.status import PARTIAL
from tests.fleet.conftest import Fleet, wait_until
from tests.pipeline.base_fixture import REFERENCE_NATIVE_PREFIX, TURBO_DIGEST, base_layer_path
from tests.pipeline.edge import base, top, upper
from tests.pipeline.images import Layout, layer
from tests.pipeline.test_e2e_registry import push_layout_image
from tests.pipeline.test_flatten import layers as flatten_layers
from tests.services.registry import RegistryService

pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lay = Layout(tmp_path_factory.mktemp("reffeat-images") / "layout")
    lay.image([layer(m, "gzip", True) for m in flatten_layers()], docker=True, tag="flat")
    lay.image([layer(base(), "gzip"), layer(upper(), "zstd"), layer(top(), "none")], tag="zstd")
    lay.image([layer(base(), "gzip", True), layer(upper(), "none", True)], docker=True, tag="small")
    return lay.root


def push(layout: Path, tag: str, registry: RegistryService, repo: str) -> None:
    """The layout's image `tag` as `<repo>:src` (skopeo cannot read Docker media types from a layout)."""
    push_layout_image(layout, tag, f"{registry.host}/{repo}")
    repository = open_repository(f"{registry.host}/{repo}", RegistryOptions(plain=True))
    m = repository.get_manifest(tag)
    repository.put_manifest(m.data, m.media_type, "src")


def request(registry: RegistryService, repo: str, **kw: Any) -> ConversionRequest:
    return ConversionRequest(f"{registry.host}/{repo}", input_tag="src", access=RegistryAccess(plain=True), **kw)


def tasks_named(fleet: Fleet, request_id: str, name: str) -> list[dict[str, Any]]:
    return [t for t in fleet.flower_tasks().values() if t.get("name") == name and request_id in str(t.get("kwargs"))]


def verifies(fleet: Fleet, registry: RegistryService, repo: str, tag: str) -> None:
    result = fleet.verify(f"{registry.host}/{repo}:{tag}", f"{registry.host}/{repo}:src")
    assert result.returncode == 0, result.stdout + result.stderr


def layers_of(registry: RegistryService, repo: str, tag: str) -> list[dict[str, Any]]:
    repository = open_repository(f"{registry.host}/{repo}", RegistryOptions(plain=True))
    return json.loads(repository.get_manifest(tag).data)["layers"]  # type: ignore[no-any-return]


def test_flatten_prepares_in_parallel_and_assembles_once(fleet: Fleet, registry: RegistryService,
                                                         layout: Path) -> None:
    push(layout, "flat", registry, "reffeat/flat")
    request_id = fleet.submit(request(registry, "reffeat/flat", overlaybd_tag="flat", flatten=True))
    final = fleet.wait(request_id)
    assert final["state"] == "SUCCESS", final
    assert len(layers_of(registry, "reffeat/flat", "flat")) == 1
    verifies(fleet, registry, "reffeat/flat", "flat")
    prepares = wait_until(lambda: [t for t in tasks_named(fleet, request_id, "obdconv.prepare_layer")
                                   if t.get("succeeded")] or None, 20, "flower to see the prepares")
    assert len(prepares) == 5
    assert not tasks_named(fleet, request_id, "obdconv.assemble_layer")
    (flat,) = wait_until(lambda: tasks_named(fleet, request_id, "obdconv.assemble_flat") or None, 20,
                         "flower to see the assemble")
    # the workers share a machine (one spool root): the other worker's layers are read, not prepared again
    digests = {json.loads(t["kwargs"])["layer"] for t in prepares}
    assert not digests & set(fleet.runs("reprepare"))
    assert flat["worker"] in {t["worker"] for t in prepares}


def test_base_layer_on_every_worker(fleet: Fleet, registry: RegistryService, layout: Path) -> None:
    push(layout, "small", registry, "reffeat/base")
    path = str(base_layer_path())
    final = fleet.wait(fleet.submit(request(registry, "reffeat/base", overlaybd_tag="obd", turbo_tag="turbo",
                                            mkfs=False, base_layer=path)))
    assert final["state"] == "SUCCESS", final
    assert layers_of(registry, "reffeat/base", "obd")[0]["digest"].startswith(REFERENCE_NATIVE_PREFIX)
    assert layers_of(registry, "reffeat/base", "turbo")[0]["digest"] == TURBO_DIGEST
    for tag in ("obd", "turbo"):
        verifies(fleet, registry, "reffeat/base", tag)
    # a pinned digest no worker's file has: fails naming the worker and both digests, pushes nothing
    wrong = "sha256:" + "0" * 64
    failed = fleet.wait(fleet.submit(request(registry, "reffeat/base", overlaybd_tag="wrong", mkfs=False,
                                             base_layer=path, base_layer_digest=wrong)))
    assert failed["state"] == "FAILURE", failed
    assert failed["error"]["class"] == "IntegrityError"
    assert f"base layer {path} on worker w" in failed["error"]["message"] and wrong in failed["error"]["message"]
    assert "wrong" not in open_repository(f"{registry.host}/reffeat/base", RegistryOptions(plain=True)).list_tags()


def test_partial_result_and_all_or_nothing(fleet: Fleet, registry: RegistryService, layout: Path) -> None:
    push(layout, "zstd", registry, "reffeat/zstd")
    request_id = fleet.submit(request(registry, "reffeat/zstd", overlaybd_tag="obd", turbo_tag="turbo"))
    final = fleet.wait(request_id)
    assert final["state"] == PARTIAL, final
    native, turbo = final["outputs"]["native"], final["outputs"]["turbo"]
    assert native["tag"] == "obd" and native["digest"].startswith("sha256:")
    assert turbo["tag"] == "turbo" and "digest" not in turbo
    assert turbo["error"]["class"] == "UnsupportedError" and "is zstd-compressed" in turbo["error"]["message"]
    assert final["error"]["class"] == "UnsupportedError"  # the row says why the request is not whole
    assert _exit_code(final) == PartialResultError.exit_code
    verifies(fleet, registry, "reffeat/zstd", "obd")
    tags = open_repository(f"{registry.host}/reffeat/zstd", RegistryOptions(plain=True)).list_tags()
    assert "turbo" not in tags
    # decided at plan time: no prepare made turboOCI data, no task converted it
    assert not any('"turbo"' in str(t.get("result")) for t in tasks_named(fleet, request_id, "obdconv.assemble_layer"))

    failed = fleet.wait(fleet.submit(request(registry, "reffeat/zstd", overlaybd_tag="obd-all", turbo_tag="turbo-all",
                                             all_or_nothing=True)))
    assert failed["state"] == "FAILURE", failed
    assert failed["error"]["class"] == "UnsupportedError"
    assert failed["error"]["message"].startswith("--all-or-nothing: nothing converted")
    tags = open_repository(f"{registry.host}/reffeat/zstd", RegistryOptions(plain=True)).list_tags()
    assert not {"obd-all", "turbo-all"} & set(tags)
