"""End to end with the local runner, a real registry and a real MariaDB: dedup as the user sees it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from obdconv.pipeline.runner import ConversionResult, ProgressEvent, RunnerOptions, convert
from obdconv.registry import RegistryOptions, open_repository
from obdconv.request import ConversionRequest, RegistryAccess
from tests.dedup.conftest import Backend
from tests.pipeline.edge import base, top, upper
from tests.pipeline.images import Layout, file, layer
from tests.pipeline.test_e2e_registry import push_layout_image

pytestmark = pytest.mark.services
REPO_ROOT = Path(__file__).resolve().parents[2]


def run(repository: str, tag: str, workdir: Path, backend: Backend, *, native: str = "",
        turbo: str = "") -> tuple[ConversionResult, list[str]]:
    prepared: list[str] = []

    def progress(e: ProgressEvent) -> None:
        if e.stage == "prepare" and e.finished:
            prepared.append(e.layer_digest)

    request = ConversionRequest(repository=repository, input_tag=tag, overlaybd_tag=native, turbo_tag=turbo,
                                workdir=str(workdir), access=RegistryAccess(plain=True), db_type="mysql",
                                db_str_ref="test")
    result = convert(request, options=RunnerOptions(workers=1, db_str=backend.db_str), progress=progress)
    return result, prepared


def images(tmp: Path) -> tuple[Layout, list[str]]:
    """Two images sharing their two base layers; returns the layout and the shared layer digests."""
    lay = Layout(tmp / "src")
    shared = [layer(base(), "gzip", True), layer(upper(), "gzip", True)]
    lay.image([*shared, layer(top(), "gzip", True)], docker=True, tag="a")
    lay.image([*shared, layer([file("only-in-b", b"b" * 5000)], "none", True)], docker=True, tag="b")
    return lay, [s.digest for s in shared]


def all_blobs_present(repository: str, manifest_digest: str) -> bool:
    repo = open_repository(repository, RegistryOptions(plain=True))
    doc = json.loads(repo.get_manifest(manifest_digest).data)
    return all(repo.head_blob(d["digest"]) == d["size"] for d in [doc["config"], *doc["layers"]])


@pytest.fixture
def mysql(mysql_backend: Backend) -> Backend:
    return mysql_backend


def test_rerun_is_a_manifest_hit_with_nothing_downloaded(registry: Any, mysql: Backend, tmp_path: Path) -> None:
    lay, _ = images(tmp_path)
    name = f"{registry.host}/e2e-rerun-{uuid.uuid4().hex[:8]}"
    push_layout_image(lay.root, "a", name)
    first, prepared = run(name, "a", tmp_path / "w1", mysql, native="obd", turbo="turbo")
    assert len(prepared) == 3
    again, prepared = run(name, "a", tmp_path / "w2", mysql, native="obd-again", turbo="turbo-again")
    assert prepared == []
    repo = open_repository(name, RegistryOptions(plain=True))
    for fmt, tag in (("native", "obd-again"), ("turbo", "turbo-again")):
        assert again.output(fmt).root_digest == first.output(fmt).root_digest
        assert repo.head_manifest(tag) == first.output(fmt).root_digest
    # Native rows are visible to the reference's queries; turbo rows only in ours.
    host, path = name.split("/", 1)
    assert len(mysql.sql("select chain_id from overlaybd_layers where host=? and repo=?", (host, path))) == 3
    assert len(mysql.sql("select chain_id from obdconv_layers where host=? and repo=?", (host, path))) == 6


def test_second_repository_mounts_every_layer(registry: Any, mysql: Backend, tmp_path: Path) -> None:
    lay, shared = images(tmp_path)
    first_repo, second_repo = f"{registry.host}/e2e-one-{uuid.uuid4().hex[:8]}", f"{registry.host}/e2e-two-{uuid.uuid4().hex[:8]}"
    push_layout_image(lay.root, "a", first_repo)
    first, _ = run(first_repo, "a", tmp_path / "w1", mysql, native="obd")
    # The same image in another repository: a manifest hit by cross-repository mount.
    push_layout_image(lay.root, "a", second_repo)
    again, prepared = run(second_repo, "a", tmp_path / "w2", mysql, native="obd")
    assert prepared == []
    assert again.output("native").root_digest == first.output("native").root_digest
    assert all_blobs_present(second_repo, again.output("native").root_digest)
    # Another image sharing the base layers, in a third repository: the shared layers are mounted,
    # only its own top layer is converted.
    third_repo = f"{registry.host}/e2e-three-{uuid.uuid4().hex[:8]}"
    push_layout_image(lay.root, "b", third_repo)
    third, prepared = run(third_repo, "b", tmp_path / "w3", mysql, native="obd")
    assert len(prepared) == 1 and prepared[0] not in shared
    assert all_blobs_present(third_repo, third.output("native").root_digest)
    host, path = third_repo.split("/", 1)
    assert len(mysql.sql("select chain_id from obdconv_layers where host=? and repo=?", (host, path))) == 3


def test_stale_rows_lead_to_a_fresh_conversion_and_corrected_rows(registry: Any, mysql: Backend,
                                                                  tmp_path: Path) -> None:
    lay, shared = images(tmp_path)
    name = f"{registry.host}/e2e-stale-{uuid.uuid4().hex[:8]}"
    push_layout_image(lay.root, "a", name)
    first, prepared = run(name, "a", tmp_path / "w1", mysql, native="obd")
    top_source = next(d for d in prepared if d not in shared)
    repo = open_repository(name, RegistryOptions(plain=True))
    converted = json.loads(repo.get_manifest(first.output("native").root_digest).data)
    top_blob = converted["layers"][-1]["digest"]
    repo.delete_blob(top_blob)  # e.g. a registry garbage collection
    assert repo.head_blob(top_blob) is None
    again, prepared = run(name, "a", tmp_path / "w2", mysql, native="obd-again")
    # The manifest row (its image lost a blob) and the top layer's row were stale: only that layer is
    # converted again, on top of the converted parents; the result is the same image, whole again.
    assert len(prepared) == 1 and prepared[0] == top_source
    assert again.output("native").root_digest == first.output("native").root_digest
    assert all_blobs_present(name, again.output("native").root_digest)
    host, path = name.split("/", 1)
    rows = mysql.sql("select data_digest from obdconv_layers where host=? and repo=?", (host, path))
    assert len(rows) == 3 and (top_blob,) in [tuple(r) for r in rows]


def test_two_conversions_at_once_convert_each_shared_layer_once(registry: Any, mysql: Backend,
                                                                tmp_path: Path) -> None:
    lay, shared = images(tmp_path)
    name = f"{registry.host}/e2e-race-{uuid.uuid4().hex[:8]}"
    push_layout_image(lay.root, "a", name)
    push_layout_image(lay.root, "b", name)
    start_at = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-m", "tests.dedup.convert_worker", name, tag, f"{tag}-obd", "mysql",
                               mysql.db_str, str(tmp_path / f"w-{tag}"), str(start_at)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    reports = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    prepared = [d for r in reports for d in r["prepared"]]
    for digest in shared:
        assert prepared.count(digest) == 1, f"shared layer {digest} prepared {prepared.count(digest)} times"
    assert len(prepared) == 4  # 2 shared + each image's own top layer
