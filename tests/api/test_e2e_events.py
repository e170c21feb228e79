"""End to end: a real docker-registry whose `notifications` point at the API (a uvicorn process),
real Redis, SQLite, two real workers and Flower. A `skopeo copy` into the registry is all it takes:
the converted tag appears with nothing else calling obdconv. Also: a conversion enqueued over HTTP,
cancelling a request that waits for another's claim, readiness, and that bearer tokens appear in no
log, status row, task message or Flower."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from obdconv.dedup.claims import manifest_claim_key
from obdconv.dedup.store import manifest_profile_key, open_store
from obdconv.oci import mediatypes as mt
from obdconv.registry import open_repository
from obdconv.registry.options import RegistryOptions
from obdconv.request import ConversionProfile
from tests.api.conftest import DISTRIBUTION_SECRET, RULES, TOKEN_TEAM, api_env
from tests.fleet.conftest import Fleet, push_layout, running_fleet, wait_until
from tests.services.api import ApiServer
from tests.services.registry import RegistryService, start_registry
from workers.sample_image import build_sample_image

pytestmark = [pytest.mark.services, pytest.mark.slow]


@dataclass
class E2E:
    fleet: Fleet
    api: ApiServer
    registry: RegistryService
    layout: Path

    def repo(self, name: str) -> Any:
        return open_repository(f"{self.registry.host}/{name}", RegistryOptions(plain=True))

    def tags(self, name: str) -> list[str]:
        try:
            return list(self.repo(name).list_tags())
        except Exception:
            return []

    def metric(self, name: str, **labels: str) -> float:
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.api.request("GET", "/metrics").text.splitlines():
            if line.startswith(f"{name}{{{wanted}}} "):
                return float(line.split()[-1])
        return 0.0

    def requests_for(self, repository: str) -> list[dict[str, Any]]:
        r = self.api.request("GET", "/v1/conversions", TOKEN_TEAM, params={"repository": repository})
        assert r.status_code == 200, r.text
        return list(r.json()["items"])

    def wait_final(self, request_id: str, timeout: float = 120) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            s = self.api.request("GET", f"/v1/conversions/{request_id}", TOKEN_TEAM).json()
            return s if s["state"] in ("SUCCESS", "FAILURE", "CANCELLED") else None

        return wait_until(final, timeout, f"request {request_id} to end")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    workdir = tmp_path_factory.mktemp("api-e2e")
    layout = workdir / "images" / "layout"
    build_sample_image(layout, "app", layers=2, file_bytes=256 << 10, seed=71)
    build_sample_image(layout, "manual", layers=2, file_bytes=128 << 10, seed=72)
    with running_fleet(workdir, {}, flower=True) as fleet:
        env = {**api_env(workdir / "api", fleet.redis), **{k: v for k, v in fleet.env.items()
                                                           if k.startswith("OBDCONV_") and "API" not in k}}
        api = ApiServer(workdir / "logs", env).start()
        notifications = {"endpoints": [{
            "name": "obdconv", "url": f"{api.url}/v1/events/distribution",
            "headers": {"Authorization": [DISTRIBUTION_SECRET]},
            "timeout": "10s", "threshold": 3, "backoff": "1s",
            "ignoredmediatypes": ["application/octet-stream"]}]}
        registry = start_registry(workdir / "registry", notifications=notifications)
        try:
            yield E2E(fleet, api, registry, layout)
        finally:
            registry.stop()
            api.stop()


def test_a_registry_push_is_converted_with_nothing_else_calling_obdconv(e2e: E2E) -> None:
    assert "e2e" in RULES
    push_layout(e2e.layout, "app", f"{e2e.registry.host}/e2e/app:v1")
    wait_until(lambda: "v1-obd" in e2e.tags("e2e/app"), 180, "the converted tag v1-obd")
    source = f"{e2e.registry.host}/e2e/app"
    [request] = e2e.requests_for(source)
    request = e2e.wait_final(request["request_id"])
    assert request["state"] == "SUCCESS", request
    assert request["outputs"]["native"]["digest"] == e2e.repo("e2e/app").head_manifest("v1-obd")
    check = e2e.fleet.verify(f"{source}:v1-obd", f"{source}:v1")
    assert check.returncode == 0, check.stdout + check.stderr
    # obdconv's own push of v1-obd came back as an event and was ignored (loop prevention)
    wait_until(lambda: "'v1-obd' is an obdconv output" in e2e.api.log_text(), 30, "the output's event")
    assert e2e.metric("obdconv_api_events_total", sender="distribution", outcome="ignored") >= 1
    # the same push delivered again: the same request, nothing new queued
    accepted = e2e.metric("obdconv_api_events_total", sender="distribution", outcome="accepted")
    push_layout(e2e.layout, "app", f"{e2e.registry.host}/e2e/app:v1")
    wait_until(lambda: e2e.metric("obdconv_api_events_total", sender="distribution", outcome="accepted") > accepted,
               30, "the second delivery")
    assert [r["request_id"] for r in e2e.requests_for(source)] == [request["request_id"]]
    assert sorted(e2e.tags("e2e/app")) == ["v1", "v1-obd"]


def test_ready_with_live_workers(e2e: E2E) -> None:
    r = e2e.api.request("GET", "/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"]["workers"] == "ok (2 live)"


def test_a_conversion_enqueued_over_http_reports_progress_and_outputs(e2e: E2E) -> None:
    push_layout(e2e.layout, "manual", f"{e2e.registry.host}/manual/http:v1")  # no rule: only this request
    source = f"{e2e.registry.host}/manual/http"
    r = e2e.api.request("POST", "/v1/conversions", TOKEN_TEAM, headers={"Idempotency-Key": "http-1"},
                        json={"repository": source, "input_tag": "v1", "turbo_tag": "v1-http-turbo", "plain": True})
    assert r.status_code == 202, r.text
    status = e2e.wait_final(r.json()["request_id"])
    assert status["state"] == "SUCCESS", status
    assert status["outputs"]["turbo"]["digest"] == e2e.repo("manual/http").head_manifest("v1-http-turbo")
    [manifest] = status["progress"]["manifests"]
    assert manifest["stage"] == "done" and len(manifest["layers"]) == 2
    assert all("prepare" in layer["stages"] or "assemble" in layer["stages"] for layer in manifest["layers"])


def test_cancel_a_request_waiting_for_a_claim_moves_no_tag(e2e: E2E) -> None:
    """The request waits (its convert_manifest retries every second) for a claim another owner holds;
    after the cancel its task ends quietly, and even once the claim is free nothing is tagged."""
    name = "manual/blocked"
    push_layout(e2e.layout, "manual", f"{e2e.registry.host}/{name}:v1")  # no rule for manual/*: no event request
    digest = e2e.repo(name).head_manifest("v1")
    store = open_store("sqlite", e2e.fleet.env["OBDCONV_DB_STR"], required=True)
    profile = ConversionProfile("native")
    key = manifest_claim_key(e2e.registry.host, name, digest, mt.DOCKER_MANIFEST, manifest_profile_key(profile, False))
    assert store.claim(key, "test:someone-else", ttl=600)
    try:
        r = e2e.api.request("POST", "/v1/conversions", TOKEN_TEAM,
                            json={"repository": f"{e2e.registry.host}/{name}", "input_tag": "v1",
                                  "overlaybd_tag": "v1-obd", "plain": True})
        assert r.status_code == 202, r.text
        request_id = r.json()["request_id"]
        wait_until(lambda: e2e.api.request("GET", f"/v1/conversions/{request_id}", TOKEN_TEAM).json()["stage"] == "dedup",
                   60, "the request to wait for the claim")

        def cancel() -> Any:
            c = e2e.api.request("POST", f"/v1/conversions/{request_id}/cancel", TOKEN_TEAM)
            return c if c.status_code == 200 else None  # 409 "tagging" only while a lookup runs: try again

        cancelled = wait_until(cancel, 10, "the cancel")
        assert cancelled.json()["state"] == "CANCELLED"
    finally:
        store.release(key, "test:someone-else")
    # its waiting task was revoked (discarded when due) or, had the revoke missed it, stopped by the flag
    stopped = (f"Discarding revoked task: obdconv.convert_manifest[{request_id}]", f"{request_id}: cancelled")
    wait_until(lambda: any(line in e2e.fleet.logs_text() for line in stopped), 30, "the waiting task to stop")
    with sqlite3.connect(e2e.fleet.env["OBDCONV_DB_STR"]) as db:  # the claim is free and nobody took it
        assert db.execute("SELECT COUNT(*) FROM obdconv_claims WHERE owner LIKE ?", (f"fleet:{request_id}:%",)
                          ).fetchone()[0] == 0
    time.sleep(3)  # a task that had not stopped would convert now that the claim is free
    assert e2e.tags(name) == ["v1"]
    final = e2e.api.request("GET", f"/v1/conversions/{request_id}", TOKEN_TEAM).json()
    assert final["state"] == "CANCELLED"
    conflict = e2e.api.request("POST", f"/v1/conversions/{request_id}/cancel", TOKEN_TEAM)
    assert conflict.status_code == 200  # cancelling again is harmless
    store.close()


def test_tokens_never_reach_logs_status_rows_task_messages_or_flower(e2e: E2E) -> None:
    assert e2e.fleet.flower is not None
    with sqlite3.connect(e2e.fleet.env["OBDCONV_DB_STR"]) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        rows = json.dumps({t: db.execute(f"SELECT * FROM {t}").fetchall() for t in tables}, default=str)
    assert re.search(r"obdconv_requests", rows)
    places = {"API log": e2e.api.log_text(), "worker and Flower logs": e2e.fleet.logs_text(),
              "database": rows, "Flower tasks": json.dumps(e2e.fleet.flower_tasks()),
              "Redis": e2e.fleet.broker_state() + "\n".join(
                  repr(e2e.fleet.redis.client(db).get(k)) for db in (0, 1)
                  for k in e2e.fleet.redis.client(db).scan_iter() if e2e.fleet.redis.client(db).type(k) == b"string")}
    assert "obdconv.convert" in places["Flower tasks"]  # Flower did see the requests' tasks
    for where, text in places.items():
        assert TOKEN_TEAM not in text, f"the bearer token is in the {where}"
        assert DISTRIBUTION_SECRET.split()[-1] not in text, f"the event secret is in the {where}"
