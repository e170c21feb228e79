"""The cancel flag and commit gate of tasks/cancel.py, with a real Redis and SQLite in this process:
a cancel and a commit cannot both win, tasks of a cancelled request end without running, and
cancel_request never turns a finished request into a cancelled one. (The HTTP side and real workers:
test_intake.py, test_e2e_events.py.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.exceptions import Ignore

import tasks.cancel as cancel
from config.settings import load_settings
from obdconv.dedup.store import open_store
from obdconv.status import get_status, open_status_database, record_submitted, record_success
from tasks.base import FleetTask
from tests.services.redis import RedisServer
from workers.app import create_app

pytestmark = pytest.mark.services


@pytest.fixture
def backend(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    client = redis_server.client(9)
    client.flushdb()
    monkeypatch.setattr(cancel, "_client", lambda: client)  # what the fleet's tasks would reach
    yield client
    client.flushdb()


@pytest.fixture
def fleet_app(redis_server: RedisServer, tmp_path: Path) -> Celery:
    env = {"OBDCONV_BROKER_URL": redis_server.url(8), "OBDCONV_RESULT_BACKEND": redis_server.url(9),
           "OBDCONV_DB_TYPE": "sqlite", "OBDCONV_DB_STR": str(tmp_path / "status.sqlite")}
    open_status_database("sqlite", env["OBDCONV_DB_STR"])
    return create_app(load_settings(env=env))


def test_first_fate_wins(backend: redis.Redis) -> None:
    rid = str(uuid.uuid4())
    assert cancel.claim_fate(backend, rid, cancel.COMMITTING, 60) == cancel.COMMITTING
    assert cancel.claim_fate(backend, rid, cancel.CANCELLED, 60) == cancel.COMMITTING  # too late to cancel
    assert cancel.claim_fate(backend, rid, cancel.COMMITTING, 60) == cancel.COMMITTING  # a re-run may commit
    cancel.reopen(backend, rid)  # the commit window moved nothing: cancels are possible again
    assert cancel.claim_fate(backend, rid, cancel.CANCELLED, 60) == cancel.CANCELLED
    cancel.reopen(backend, rid)  # never undoes a cancel
    assert cancel.fate_of(backend, rid) == cancel.CANCELLED
    with pytest.raises(Ignore):
        cancel.commit_or_stop({"request_id": rid}, 60)


def test_tasks_of_a_cancelled_request_end_without_running(backend: redis.Redis) -> None:
    app = Celery("cancel-flag-test", set_as_current=False)
    app.conf.task_always_eager = True
    ran: list[str] = []

    @app.task(bind=True, base=FleetTask, name="test.stage")
    def stage(self: Any, *, job: dict[str, Any]) -> str:
        ran.append(job["request_id"])
        return "done"

    live, cancelled = str(uuid.uuid4()), str(uuid.uuid4())
    cancel.claim_fate(backend, cancelled, cancel.CANCELLED, 60)
    assert stage.apply(kwargs={"job": {"request_id": live}}).get() == "done"
    result = stage.apply(kwargs={"job": {"request_id": cancelled}})
    assert result.state == "IGNORED"
    assert ran == [live]


def test_cancel_request_respects_a_commit_and_a_finished_request(fleet_app: Celery, redis_server: RedisServer,
                                                                  tmp_path: Path) -> None:
    backend = redis_server.client(9)
    committing, finished, pending = (str(uuid.uuid4()) for _ in range(3))
    for rid in (committing, finished, pending):
        record_submitted(rid, "127.0.0.1:1/app:v1", {"repository": "127.0.0.1:1/app"})
    cancel.claim_fate(backend, committing, cancel.COMMITTING, 60)
    outcome = cancel.cancel_request(fleet_app, committing)
    assert (outcome.cancelled, outcome.reason) == (False, "committing")
    assert get_status(committing)["state"] == "PENDING"

    record_success(finished, {})
    outcome = cancel.cancel_request(fleet_app, finished)
    assert (outcome.cancelled, outcome.reason, outcome.state) == (False, "final", "SUCCESS")
    assert cancel.fate_of(backend, finished) is None

    store = open_store("sqlite", str(tmp_path / "status.sqlite"), required=True)
    assert store.claim(f"layer|x|{pending}", f"fleet:{pending}:0123456789abcdef", ttl=600)
    assert store.claim("layer|other", "fleet:someone-else:0123", ttl=600)
    outcome = cancel.cancel_request(fleet_app, pending)
    assert outcome.cancelled and outcome.claims_released == 1
    assert get_status(pending)["state"] == "CANCELLED"
    assert cancel.fate_of(backend, pending) == cancel.CANCELLED
    assert store.holder("layer|other") is not None  # another request's claim is untouched
    assert cancel.cancel_request(fleet_app, "no-such-request").reason == "unknown"
    store.close()
