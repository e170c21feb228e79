"""Fleet acceptance: real Redis, docker-registry, SQLite, two worker processes and Flower.

One fleet serves the whole module (starting it dominates the cost); tests that kill a worker
restart it before they end.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from obdconv.dedup.models import ProfileLayer, ProfileManifest, ReferenceLayer, ReferenceManifest
from obdconv.pipeline.prepare import spool_key
from obdconv.request import ConversionRequest, RegistryAccess
from obdconv.status import ConversionStatus
from tasks.stages import PREPARING_PREFIX
from tests.fleet.conftest import CREDENTIAL_REF, Fleet, push_layout, wait_until
from tests.services.registry import BASIC_PASSWORD, BASIC_USER, RegistryService
from workers.ledger import message_key
from workers.queues import CONTROL
from workers.sample_image import build_sample_image

pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.timeout(300)]


def request_for(registry: RegistryService, repo: str, tag: str, out: str, **kw: Any) -> ConversionRequest:
    return ConversionRequest(f"{registry.host}/{repo}", input_tag=tag, overlaybd_tag=out,
                             access=RegistryAccess(plain=True, credential_ref=kw.pop("credential_ref", "")), **kw)


def tasks_of(fleet: Fleet, request_id: str, name: str) -> list[dict[str, Any]]:
    return [t for t in fleet.flower_tasks().values()
            if t.get("name") == name and request_id in str(t.get("kwargs", ""))]


def layer_of(task: dict[str, Any]) -> str:
    return json.loads(task["kwargs"])["layer"]


def assert_verifies(fleet: Fleet, registry: RegistryService, repo: str, out: str, src: str) -> None:
    result = fleet.verify(f"{registry.host}/{repo}:{out}", f"{registry.host}/{repo}:{src}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 difference(s)" in result.stdout


def test_multilayer_image_uses_both_workers_at_once(fleet: Fleet, registry: RegistryService, images: Path) -> None:
    push_layout(images, "multi", f"{registry.host}/fleet/multi:src")
    request_id = fleet.submit(request_for(registry, "fleet/multi", "src", "obd"))
    final = fleet.wait(request_id)
    assert final["state"] == "SUCCESS", final
    assert final["outputs"]["native"]["tag"] == "obd"
    assert final["outputs"]["native"]["digest"].startswith("sha256:")
    assert_verifies(fleet, registry, "fleet/multi", "obd", "src")

    # Flower saw the four prepare tasks of this request; both workers ran some, overlapping in time.
    prepares = wait_until(lambda: [t for t in tasks_of(fleet, request_id, "obdconv.prepare_layer")
                                   if t.get("succeeded")] or None, 20, "flower to see the prepares")
    assert len(prepares) == 4, prepares
    workers = {t["worker"] for t in prepares}
    assert workers == {"w1@fleettest", "w2@fleettest"}, workers
    overlapping = [(a, b) for a in prepares for b in prepares
                   if a["worker"] != b["worker"] and a["started"] < b["succeeded"] and b["started"] < a["succeeded"]]
    assert overlapping, [(t["worker"], t["started"], t["succeeded"]) for t in prepares]
    # Assemble ran where the prepared data was (its own queue), never re-preparing.
    assembles = tasks_of(fleet, request_id, "obdconv.assemble_layer")
    assert len(assembles) == 4
    prepared_on = {layer_of(t): t["worker"] for t in prepares}
    assert {layer_of(t): t["worker"] for t in assembles} == prepared_on
    assert not set(prepared_on) & set(fleet.runs("reprepare"))


def test_converted_manifest_is_a_dedup_hit(fleet: Fleet, registry: RegistryService, images: Path) -> None:
    push_layout(images, "multi", f"{registry.host}/fleet/again:src")
    first = fleet.wait(fleet.submit(request_for(registry, "fleet/again", "src", "obd")))
    assert first["state"] == "SUCCESS", first
    prepares_before = fleet.runs("prepare")
    second_id = fleet.submit(request_for(registry, "fleet/again", "src", "obd-2"))
    second = fleet.wait(second_id)
    assert second["state"] == "SUCCESS", second
    assert second["outputs"]["native"]["dedup"] is True
    assert second["outputs"]["native"]["digest"] == first["outputs"]["native"]["digest"]
    assert fleet.runs("prepare") == prepares_before
    assert not tasks_of(fleet, second_id, "obdconv.prepare_layer")
    assert_verifies(fleet, registry, "fleet/again", "obd-2", "src")


def test_multi_platform_index(fleet: Fleet, registry: RegistryService, images: Path) -> None:
    push_layout(images, "index", f"{registry.host}/fleet/index:src")
    request_id = fleet.submit(request_for(registry, "fleet/index", "src", "obd", concurrency_limit=1))
    final = fleet.wait(request_id)
    assert final["state"] == "SUCCESS", final
    out = final["outputs"]["native"]
    assert out["mediaType"] in ("application/vnd.oci.image.index.v1+json",
                                "application/vnd.docker.distribution.manifest.list.v2+json")
    assert_verifies(fleet, registry, "fleet/index", "obd", "src")
    # --concurrency-limit 1: one lane, so the two manifests' metadata passes never overlapped.
    metas = tasks_of(fleet, request_id, "obdconv.build_metadata")
    assert len(metas) == 2
    a, b = sorted(metas, key=lambda t: t["started"])
    assert a["succeeded"] <= b["started"]


def test_both_formats_in_one_request(fleet: Fleet, registry: RegistryService, images: Path) -> None:
    push_layout(images, "both", f"{registry.host}/fleet/both:src")
    request_id = fleet.submit(request_for(registry, "fleet/both", "src", "obd", turbo_tag="turbo"))
    final = fleet.wait(request_id)
    assert final["state"] == "SUCCESS", final
    assert {f: o["tag"] for f, o in final["outputs"].items()} == {"native": "obd", "turbo": "turbo"}
    assert final["outputs"]["native"]["digest"] != final["outputs"]["turbo"]["digest"]
    # One prepare per layer served both formats.
    assert len(tasks_of(fleet, request_id, "obdconv.prepare_layer")) == 2
    assert_verifies(fleet, registry, "fleet/both", "obd", "src")
    assert_verifies(fleet, registry, "fleet/both", "turbo", "src")


def test_kill_worker_mid_conversion(fleet: Fleet, registry: RegistryService, images: Path) -> None:
    push_layout(images, "big", f"{registry.host}/fleet/big:src")
    request_id = fleet.submit(request_for(registry, "fleet/big", "src", "obd"))
    # Wait until w2 is working on this request, then kill it (whole process group, SIGKILL).
    wait_until(lambda: any(p.get("host") == "w2@fleettest" for p in fleet.status(request_id)["progress"].values()),
               60, "w2 to start on the request")
    fleet.workers["w2"].kill(signal.SIGKILL)
    fleet.workers["w2"].proc.wait(10)  # type: ignore[union-attr]
    try:
        final = fleet.wait(request_id, timeout=150)
        assert final["state"] == "SUCCESS", final
        assert_verifies(fleet, registry, "fleet/big", "obd", "src")
        # One durable row for the request; one dedup row per layer and one for the manifest, although
        # tasks ran twice; and the manifest lists each layer exactly once.
        with ConversionStatus._meta.database.connection_context():
            assert ConversionStatus.select().where(ConversionStatus.request_id == request_id).count() == 1
            # (the store mirrors reference-profile rows into the reference convertor's tables)
            layer_rows = {model: [r.chain_id for r in model.select().where(model.repo == "fleet/big")]
                          for model in (ReferenceLayer, ProfileLayer)}
            manifest_rows = {model: [r.out_digest for r in model.select().where(model.repo == "fleet/big")]
                             for model in (ReferenceManifest, ProfileManifest)}
        assert layer_rows[ProfileLayer] and manifest_rows[ProfileManifest]
        for chain_ids in layer_rows.values():
            assert len(chain_ids) in (0, 6) and len(set(chain_ids)) == len(chain_ids), layer_rows
        for digests in manifest_rows.values():
            assert digests in ([], [final["outputs"]["native"]["digest"]]), manifest_rows
        manifest = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                   f"docker://{registry.host}/fleet/big:obd"],
                                  capture_output=True, text=True, check=True).stdout
        layers = [layer["digest"] for layer in json.loads(manifest)["layers"]]
        assert len(layers) == 6 and len(set(layers)) == 6
    finally:
        fleet.start_worker("w2")


def test_five_requests_sharing_layers_prepare_each_layer_once(
        fleet: Fleet, registry: RegistryService, images: Path) -> None:
    for n in range(5):
        push_layout(images, f"shared{n}", f"{registry.host}/fleet/shared{n}:src")
    before = fleet.runs("prepare")
    with ThreadPoolExecutor(5) as pool:
        ids = list(pool.map(lambda n: fleet.submit(request_for(registry, f"fleet/shared{n}", "src", "obd")), range(5)))
    finals = [fleet.wait(i, timeout=150) for i in ids]
    assert [f["state"] for f in finals] == ["SUCCESS"] * 5, finals
    after = fleet.runs("prepare")
    new_runs = {d: after[d] - before.get(d, 0) for d in after if after[d] != before.get(d, 0)}
    # 2 shared base layers + 5 distinct top layers, each prepared exactly once.
    assert len(new_runs) == 7, new_runs
    assert set(new_runs.values()) == {1}, new_runs
    for n in (0, 4):
        assert_verifies(fleet, registry, f"fleet/shared{n}", "obd", "src")


def test_credentials_never_travel(fleet: Fleet, private_registry: RegistryService, images: Path) -> None:
    creds = f"{BASIC_USER}:{BASIC_PASSWORD}"
    push_layout(images, "private", f"{private_registry.host}/fleet/private:src", creds=creds)
    request_id = fleet.submit(request_for(private_registry, "fleet/private", "src", "obd",
                                          credential_ref=CREDENTIAL_REF))
    final = fleet.wait(request_id)
    assert final["state"] == "SUCCESS", final
    # Everything the fleet stored or showed: Flower's API, every Redis key (broker and backend),
    # the worker and Flower logs, the status database.
    seen = [json.dumps(fleet.flower_tasks()), json.dumps(fleet.flower.api("/api/workers"))]  # type: ignore[union-attr]
    for db in (0, 1):
        client = fleet.redis.client(db)
        for key in client.scan_iter():
            kind = client.type(key).decode()
            if kind == "string":
                seen.append(repr(client.get(key)))
            elif kind == "list":
                seen.append(repr(client.lrange(key, 0, -1)))
            elif kind == "hash":
                seen.append(repr(client.hgetall(key)))
            elif kind == "zset":
                seen.append(repr(client.zrange(key, 0, -1)))
            elif kind == "set":
                seen.append(repr(client.smembers(key)))
    seen.append(fleet.logs_text())
    seen.append((fleet.workdir / "fleet.sqlite").read_bytes().decode("latin-1"))
    blob = "\n".join(seen)
    assert request_id in blob  # the scan did look at the right things
    assert CREDENTIAL_REF in blob
    assert BASIC_PASSWORD not in blob
    assert BASIC_PASSWORD.split(":")[0] not in blob


def test_bad_input_fails_fast_with_its_class(fleet: Fleet, registry: RegistryService) -> None:
    started = time.monotonic()
    request_id = fleet.submit(request_for(registry, "fleet/does-not-exist", "nope", "obd"))
    final = fleet.wait(request_id, timeout=60)
    assert final["state"] == "FAILURE"
    assert final["error"]["class"] in ("NotFoundError", "BadInputError"), final
    assert "does-not-exist" in final["error"]["message"] or "nope" in final["error"]["message"]
    assert time.monotonic() - started < 30  # not retried with backoff
    converts = tasks_of(fleet, request_id, "obdconv.convert")
    assert converts and all(t.get("retries", 0) == 0 for t in converts)


def test_flower_dashboard_shows_tasks(fleet: Fleet, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium not installed")
    assert fleet.flower is not None
    workers = fleet.flower.api("/api/workers")
    assert {"w1@fleettest", "w2@fleettest"} <= set(workers)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900", "--virtual-time-budget=8000"]
    url = f"{fleet.flower.auth_url}/tasks"
    png = tmp_path / "flower-tasks.png"
    subprocess.run([chromium, *flags, f"--screenshot={png}", url], capture_output=True, timeout=90)
    assert png.is_file() and png.stat().st_size > 10_000
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=90).stdout
    assert "obdconv.prepare_layer" in dom
    assert "obdconv.assemble_layer" in dom


def test_a_message_the_broker_lost_is_sent_again(fleet: Fleet, registry: RegistryService, images: Path) -> None:
    """A worker that dies between kombu's BRPOP and its unacked bookkeeping takes the message with
    it: here the test plays that worker (stops the control queue's consumers, pops the request's
    first message itself). The message ledger re-sends it and the request completes."""
    push_layout(images, "both", f"{registry.host}/fleet/lost:src")
    broker = fleet.redis.client(0)
    destinations = ["w1@fleettest", "w2@fleettest"]
    control = fleet.app.control
    replies = control.cancel_consumer(CONTROL, destination=destinations, reply=True, timeout=10,
                                      limit=len(destinations))
    assert sorted(name for reply in replies for name in reply) == destinations, replies
    # A BRPOP already waiting when the consumer was cancelled still lists the control queue
    # until it times out (kombu's brpop_timeout, 1 s): let it.
    time.sleep(2.5)
    try:
        request_id = fleet.submit(request_for(registry, "fleet/lost", "src", "obd"))
        popped = wait_until(lambda: broker.rpop(CONTROL), 10, "the request's message in the control queue")
        assert json.loads(popped)["headers"]["id"] == request_id
    finally:
        control.add_consumer(CONTROL, destination=destinations, reply=True, timeout=10)
    final = fleet.wait(request_id, timeout=90)
    assert final["state"] == "SUCCESS", final
    assert_verifies(fleet, registry, "fleet/lost", "obd", "src")
    assert "re-sending it" in fleet.logs_text()
    assert not broker.exists(message_key(request_id))  # the ledger forgot it once it ran


def test_waiting_for_a_layer_another_worker_prepares_outlasts_the_retry_limit(
        fleet: Fleet, registry: RegistryService, tmp_path: Path) -> None:
    """A prepare finds the layer being prepared elsewhere (its lock held) and polls every second;
    waiting longer than the task's retry limit (5) is waiting, not failing."""
    layout = tmp_path / "layout"
    digest = build_sample_image(layout, "waiting", layers=1, file_bytes=64 << 10, seed=4242)
    manifest = json.loads((layout / "blobs" / "sha256" / digest.split(":")[1]).read_text())
    layer_key = spool_key(manifest["layers"][0]["digest"], "lz4", 4096)
    fleet.redis.client(1).set(PREPARING_PREFIX + layer_key, "someone-else", ex=9)
    push_layout(layout, "waiting", f"{registry.host}/fleet/waiting:src")
    final = fleet.wait(fleet.submit(request_for(registry, "fleet/waiting", "src", "obd")), timeout=90)
    assert final["state"] == "SUCCESS", final
    assert not fleet.redis.client(1).exists(PREPARING_PREFIX + layer_key)
    assert_verifies(fleet, registry, "fleet/waiting", "obd", "src")


# Last in this module: after the Redis restart the workers' remote control (pidbox) may not answer.
def test_status_survives_redis_restart(fleet: Fleet, registry: RegistryService, images: Path) -> None:
    request_id = fleet.submit(request_for(registry, "fleet/multi", "src", "obd-again"))
    final = fleet.wait(request_id)
    assert final["state"] == "SUCCESS"
    fleet.redis.stop()
    fleet.redis.process.start()  # same port, empty: every result and progress key is gone
    after = fleet.status(request_id)
    assert after["state"] == "SUCCESS"
    assert after["outputs"]["native"]["digest"] == final["outputs"]["native"]["digest"]
    assert after["celery_state"] in ("PENDING", "UNKNOWN")  # proves the answer came from the database
