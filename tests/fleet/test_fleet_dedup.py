"""Fleet dedup at every level: manifest hits for every child of an index, mid-chain layer hits,
database claims between simultaneous requests, expired claims taken over, and the flags the fleet
must reject or give fleet semantics. Real Redis, real MariaDB, real docker-registry, two workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from obdconv.dedup.claims import manifest_claim_key
from obdconv.dedup.store import manifest_profile_key, open_store
from obdconv.pipeline.annotations import manifest_media_type
from obdconv.request import ConversionRequest, RegistryAccess
from tests.fleet.conftest import ROOT, Fleet, push_layout, running_fleet, wait_until
from tests.services.mariadb import MariaDB, mariadb  # noqa: F401  (session fixture)
from tests.services.registry import RegistryService
from workers.sample_image import build_sample_image

pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.timeout(300)]

CLAIM_TTL = 5  # seconds: a claim nobody heartbeats expires quickly in these tests


@pytest.fixture(scope="module")
def dedup_db(mariadb: MariaDB) -> str:  # noqa: F811
    return mariadb.dsn_go_for(mariadb.create_database("fleet_dedup"))


@pytest.fixture(scope="module")
def dfleet(tmp_path_factory: pytest.TempPathFactory, dedup_db: str) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("dfleet"), {}, flower=False, OBDCONV_DB_TYPE="mysql",
                       OBDCONV_DB_STR=dedup_db, OBDCONV_CLAIM_TTL=str(CLAIM_TTL)) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("dimages") / "layout"
    digests = {
        "index": build_sample_image(path, "index", layers=2, file_bytes=128 << 10, seed=31,
                                    platforms=("amd64", "arm64")),
        "base": build_sample_image(path, "base", layers=3, file_bytes=256 << 10, seed=32, shared_layers=2),
        "grown": build_sample_image(path, "grown", layers=4, file_bytes=256 << 10, seed=33, shared_layers=2),
        "twin": build_sample_image(path, "twin", layers=3, file_bytes=256 << 10, seed=34),
        "held": build_sample_image(path, "held", layers=2, file_bytes=128 << 10, seed=35),
        "dumped": build_sample_image(path, "dumped", layers=2, file_bytes=64 << 10, seed=36),
        "killed": build_sample_image(path, "killed", layers=4, file_bytes=2 << 20, seed=37),
    }
    return path, digests


def request_for(registry: RegistryService, repo: str, out: str, **kw: Any) -> ConversionRequest:
    return ConversionRequest(f"{registry.host}/{repo}", input_tag="src", overlaybd_tag=out,
                             access=RegistryAccess(plain=True), **kw)


def source_layers(registry: RegistryService, repo: str) -> list[str]:
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{repo}:src"],
                         capture_output=True, text=True, check=True).stdout
    return [x["digest"] for x in json.loads(raw)["layers"]]


def new_runs(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def assert_verifies(fleet: Fleet, registry: RegistryService, repo: str, out: str) -> None:
    result = fleet.verify(f"{registry.host}/{repo}:{out}", f"{registry.host}/{repo}:src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 difference(s)" in result.stdout


def test_resubmitted_index_is_a_manifest_hit_for_every_child(
        dfleet: Fleet, registry: RegistryService, layout: tuple[Path, dict[str, str]]) -> None:
    push_layout(layout[0], "index", f"{registry.host}/fleetd/index:src")
    first = dfleet.wait(dfleet.submit(request_for(registry, "fleetd/index", "obd")))
    assert first["state"] == "SUCCESS", first
    prepares, assembles = dfleet.runs("prepare"), dfleet.runs("assemble")
    second = dfleet.wait(dfleet.submit(request_for(registry, "fleetd/index", "obd-again")))
    assert second["state"] == "SUCCESS", second
    assert second["outputs"]["native"]["digest"] == first["outputs"]["native"]["digest"]
    # Neither child manifest touched a layer: no download (prepare), no assemble, anywhere.
    assert dfleet.runs("prepare") == prepares
    assert dfleet.runs("assemble") == assembles
    assert_verifies(dfleet, registry, "fleetd/index", "obd-again")


def test_bottom_layers_converted_before_are_reused(
        dfleet: Fleet, registry: RegistryService, layout: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    push_layout(layout[0], "base", f"{registry.host}/fleetd/base:src")
    push_layout(layout[0], "grown", f"{registry.host}/fleetd/grown:src")
    base_layers, grown_layers = source_layers(registry, "fleetd/base"), source_layers(registry, "fleetd/grown")
    assert base_layers[:2] == grown_layers[:2] and base_layers[2] != grown_layers[2]  # the premise
    assert dfleet.wait(dfleet.submit(request_for(registry, "fleetd/base", "obd")))["state"] == "SUCCESS"

    prepares, assembles = dfleet.runs("prepare"), dfleet.runs("assemble")
    grown = dfleet.wait(dfleet.submit(request_for(registry, "fleetd/grown", "obd")))
    assert grown["state"] == "SUCCESS", grown
    # Only the two new layers were prepared and assembled (another repository: mounted hits).
    assert set(new_runs(prepares, dfleet.runs("prepare"))) == set(grown_layers[2:])
    assert set(new_runs(assembles, dfleet.runs("assemble"))) == {f"{d}@{i}" for i, d in
                                                                 enumerate(grown_layers) if i >= 2}
    assert_verifies(dfleet, registry, "fleetd/grown", "obd")

    # The same image converted from scratch (`obdconv convert`, no database) gives the same manifest.
    push_layout(layout[0], "grown", f"{registry.host}/fleetd/grown-scratch:src")
    subprocess.run([sys.executable, "-m", "obdconv", "convert", "-r", f"{registry.host}/fleetd/grown-scratch",
                    "-i", "src", "--overlaybd", "obd", "--plain"], cwd=tmp_path, check=True, capture_output=True,
                   timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                          f"docker://{registry.host}/fleetd/grown-scratch:obd"],
                         capture_output=True, check=True).stdout
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == grown["outputs"]["native"]["digest"]


def test_simultaneous_requests_convert_each_layer_once(
        dfleet: Fleet, registry: RegistryService, layout: tuple[Path, dict[str, str]]) -> None:
    push_layout(layout[0], "twin", f"{registry.host}/fleetd/twin:src")
    layers = source_layers(registry, "fleetd/twin")
    prepares, assembles = dfleet.runs("prepare"), dfleet.runs("assemble")
    with ThreadPoolExecutor(2) as pool:
        ids = list(pool.map(lambda tag: dfleet.submit(request_for(registry, "fleetd/twin", tag)), ["a", "b"]))
    finals = [dfleet.wait(i, timeout=150) for i in ids]
    assert [f["state"] for f in finals] == ["SUCCESS", "SUCCESS"], finals
    assert finals[0]["outputs"]["native"]["digest"] == finals[1]["outputs"]["native"]["digest"]
    assert new_runs(prepares, dfleet.runs("prepare")) == dict.fromkeys(layers, 1)
    assert new_runs(assembles, dfleet.runs("assemble")) == {f"{d}@{i}": 1 for i, d in enumerate(layers)}
    # One converted, the other waited for its claim and got the result as a hit.
    assert sorted(bool(f["outputs"]["native"].get("dedup")) for f in finals) == [False, True]
    assert_verifies(dfleet, registry, "fleetd/twin", "b")


def test_expired_claim_of_a_dead_holder_is_taken_over(
        dfleet: Fleet, registry: RegistryService, layout: tuple[Path, dict[str, str]], dedup_db: str) -> None:
    push_layout(layout[0], "held", f"{registry.host}/fleetd/held:src")
    layers = source_layers(registry, "fleetd/held")
    request = request_for(registry, "fleetd/held", "obd")
    key = manifest_claim_key(registry.host, "fleetd/held", layout[1]["held"], manifest_media_type(False),
                             manifest_profile_key(request.profiles()[0], False))
    store = open_store("mysql", dedup_db, required=True)
    try:  # a holder that took the claim and died: nobody heartbeats it
        assert store.claim(key, "dead-worker", CLAIM_TTL)
        claimed = time.monotonic()
        prepares = dfleet.runs("prepare")
        request_id = dfleet.submit(request)
        time.sleep(2)
        assert dfleet.status(request_id)["state"] not in ("SUCCESS", "FAILURE")
        assert not set(new_runs(prepares, dfleet.runs("prepare"))) & set(layers)  # waiting, not converting
        final = dfleet.wait(request_id, timeout=90)
        assert final["state"] == "SUCCESS", final
        assert time.monotonic() - claimed >= CLAIM_TTL - 0.5
        assert set(new_runs(prepares, dfleet.runs("prepare"))) == set(layers)
        assert store.holder(key) is None  # the taker released it after recording
    finally:
        store.release(key, "dead-worker")
        store.close()
    assert_verifies(dfleet, registry, "fleetd/held", "obd")


def test_worker_killed_while_its_request_holds_claims(
        dfleet: Fleet, registry: RegistryService, layout: tuple[Path, dict[str, str]], dedup_db: str) -> None:
    """A worker dies mid-conversion while its request holds the claims and another request waits
    for them: the dead worker's task is redelivered to the other worker (same claim owner) or the
    waiting request takes the expired claim over; either way both finish with the same image and
    no claim is left behind."""
    push_layout(layout[0], "killed", f"{registry.host}/fleetd/killed:src")
    first = dfleet.submit(request_for(registry, "fleetd/killed", "obd"))
    wait_until(lambda: any(p.get("host") == "w2@fleettest" for p in dfleet.status(first)["progress"].values()),
               60, "w2 to work on the request")
    second = dfleet.submit(request_for(registry, "fleetd/killed", "obd-2"))
    # Kill once the second request is really waiting (a worker took it). A kill inside kombu's
    # pop-then-record window would lose a message; the message ledger re-sends it (workers/ledger.py,
    # tested on its own in test_acceptance.py), but that is not what this test is about.
    wait_until(lambda: dfleet.status(second)["state"] != "PENDING", 60, "the second request to be taken")
    dfleet.workers["w2"].kill(signal.SIGKILL)
    dfleet.workers["w2"].proc.wait(10)  # type: ignore[union-attr]
    try:
        finals = [dfleet.wait(i, timeout=150) for i in (first, second)]
        assert [f["state"] for f in finals] == ["SUCCESS", "SUCCESS"], (finals, dfleet.broker_state())
        assert finals[0]["outputs"]["native"]["digest"] == finals[1]["outputs"]["native"]["digest"]
        store = open_store("mysql", dedup_db, required=True)
        try:
            key = manifest_claim_key(registry.host, "fleetd/killed", layout[1]["killed"], manifest_media_type(False),
                                     manifest_profile_key(ConversionRequest("x", overlaybd_tag="o").profiles()[0],
                                                          False))
            assert store.holder(key) is None
        finally:
            store.close()
        assert_verifies(dfleet, registry, "fleetd/killed", "obd-2")
    finally:
        dfleet.start_worker("w2")


def test_mkfs_false_needs_the_base_layer_on_the_workers(dfleet: Fleet, registry: RegistryService) -> None:
    missing = "/nonexistent/obdconv-test/ext4_64"
    request = request_for(registry, "fleetd/held", "obd-nomkfs", mkfs=False, base_layer=missing)
    request_id = dfleet.submit(request)  # the client does not read the file: the workers do
    final = dfleet.wait(request_id)
    assert final["state"] == "FAILURE", final
    assert final["error"]["class"] == "NotFoundError", final
    assert f"base layer {missing}: no such file" in final["error"]["message"]


def test_dump_manifest_returns_the_manifest(dfleet: Fleet, registry: RegistryService,
                                            layout: tuple[Path, dict[str, str]]) -> None:
    push_layout(layout[0], "dumped", f"{registry.host}/fleetd/dump:src")
    dumps = []
    for tag in ("obd", "obd-hit"):  # converted, then a dedup hit: both return the dump
        final = dfleet.wait(dfleet.submit(request_for(registry, "fleetd/dump", tag, dump_manifest=True)))
        assert final["state"] == "SUCCESS", final
        out = final["outputs"]["native"]
        manifest = out["dump"]["manifest.json"]
        assert "sha256:" + hashlib.sha256(manifest.encode()).hexdigest() == out["digest"]
        config_digest = json.loads(manifest)["config"]["digest"]
        assert "sha256:" + hashlib.sha256(out["dump"]["config.json"].encode()).hexdigest() == config_digest
        dumps.append((out.get("dedup", False), out["dump"]))
    assert [d[0] for d in dumps] == [False, True]
    assert dumps[0][1] == dumps[1][1]
