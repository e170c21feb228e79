"""A worker cut off from the network for longer than the lease comes back and its copy of a task
fails (its Redis calls broke), after the redelivered copy already succeeded on another worker
(tests/multihost saw it): that stale failure must neither fail the request nor release its claims."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery.backends.redis import RedisBackend

import workers.database
from obdconv.dedup.claims import layer_claim_key
from obdconv.dedup.store import REFERENCE_PROFILE
from obdconv.errors import NetworkError
from obdconv.status import get_status, record_running, record_submitted
from tasks.base import FleetTask
from tasks.stages import prepare_layer_task
from tests.services.redis import RedisServer
from workers.app import app, settings_of

pytestmark = pytest.mark.services


@pytest.fixture
def worker(tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(app, "obdconv_settings",
                        settings_of(app).with_overrides(db_type="sqlite", db_str=str(tmp_path / "w.sqlite")))
    monkeypatch.setattr(workers.database, "_db_pid", None)
    backend = RedisBackend(app=app, url=redis_server.url(12))
    monkeypatch.setattr(FleetTask, "backend", backend)
    store = workers.database.dedup_store()
    yield store, backend
    monkeypatch.setattr(workers.database, "_db_pid", None)


def job_with_claims(store: Any, request_id: str) -> dict[str, Any]:
    owner = f"fleet:{request_id}:0123456789abcdef"
    keys = [layer_claim_key("registry.test:5000", f"sha256:{i:064x}", REFERENCE_PROFILE) for i in range(3)]
    for key in keys:
        assert store.claim(key, owner, ttl=300)
    record_submitted(request_id, "registry.test:5000/app:v1", {"repository": "registry.test:5000/app"})
    record_running(request_id, "assemble")
    return {"request_id": request_id, "request": {"repository": "registry.test:5000/app"},
            "reuse": {"owner": owner, "claims": keys}}


def test_a_stale_copys_failure_leaves_the_request_alone(worker: Any) -> None:
    store, backend = worker
    job = job_with_claims(store, "req-late")
    backend.mark_as_done("task-1", {"node": "w2@h"})  # the redelivered copy finished on w2
    prepare_layer_task.on_failure(NetworkError("Error 101 connecting to redis"), "task-1", (), {"job": job}, None)
    assert get_status("req-late")["state"] == "RUNNING"
    for key in job["reuse"]["claims"]:
        holder = store.holder(key)
        assert holder is not None and holder.owner == job["reuse"]["owner"]


def test_a_real_failure_still_fails_the_request(worker: Any) -> None:
    store, _ = worker
    job = job_with_claims(store, "req-failed")
    prepare_layer_task.on_failure(NetworkError("registry gone"), "task-2", (), {"job": job}, None)
    status = get_status("req-failed")
    assert status["state"] == "FAILURE" and "registry gone" in status["error"]["message"]
    assert all(store.holder(key) is None for key in job["reuse"]["claims"])  # released for waiters
