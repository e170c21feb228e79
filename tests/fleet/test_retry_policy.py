"""Waiting (`retry_later`) and failing (NetworkError/DatabaseError) share Celery's one retry counter;
a failure after a long wait must still get its full retries and backoff.

The tasks run on a real Celery app in eager mode (`Task.apply`): Celery's own retry machinery
(autoretry, the retry counter, MaxRetriesExceeded) with no broker, since only the policy is under
test here (the fleet acceptance tests run waits through real workers)."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

import tasks.cancel as cancel
from obdconv.errors import NetworkError
from tasks.base import WAITS, FleetTask, failure_retry, retry_later
from tasks.context import settings

RETRY_MAX = settings().retry_max


@pytest.fixture(autouse=True)
def _no_fleet_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """No result backend runs here: the cancel check (every FleetTask start) has nothing to read.
    (Left to reach for the default backend, a client that outlasts Redis restarts waits ~15 s per
    call for a server that never comes.)"""
    monkeypatch.setattr(cancel, "_client", lambda: None)


def _app() -> Celery:
    app = Celery("retry-policy-test", set_as_current=False)
    app.conf.task_always_eager = True
    return app


def _flaky(waits: int, failures: int) -> tuple[Any, list[dict[str, Any]]]:
    """A task that waits `waits` times, then fails `failures` times, then returns its job."""
    calls: list[dict[str, Any]] = []

    @_app().task(bind=True, base=FleetTask, name="test.flaky")
    def flaky(self: Any, *, job: dict[str, Any]) -> dict[str, Any]:
        calls.append(dict(job))
        if len(calls) <= waits:
            raise retry_later(self, 0)
        if len(calls) <= waits + failures:
            raise NetworkError(f"registry unreachable (attempt {len(calls)})")
        return job

    return flaky, calls


def test_a_failure_after_more_waits_than_the_retry_limit_is_still_retried() -> None:
    waits = RETRY_MAX * 3
    task, calls = _flaky(waits=waits, failures=RETRY_MAX)
    job = task.apply(kwargs={"job": {"request_id": "r1"}}).get()
    assert len(calls) == waits + RETRY_MAX + 1
    assert job[WAITS] == waits and job["request_id"] == "r1"


def test_failures_alone_are_still_limited() -> None:
    task, calls = _flaky(waits=4, failures=RETRY_MAX + 1)
    result = task.apply(kwargs={"job": {"request_id": "r2"}})
    with pytest.raises(NetworkError, match="registry unreachable"):
        result.get()
    assert len(calls) == 4 + RETRY_MAX + 1  # the first try after the waits, then RETRY_MAX retries


def test_backoff_counts_failures_not_waits() -> None:
    # After 40 waits, the first failure backs off like a first failure (at most 2 s), not like
    # the 41st (which would be the 120 s cap).
    countdowns = [failure_retry(retries=40, waits=40, max_retries=5, backoff_max=120)[1] for _ in range(200)]
    assert max(countdowns) <= 2 and min(countdowns) >= 0
    limit, _ = failure_retry(retries=43, waits=40, max_retries=5, backoff_max=120)
    assert limit == 45  # 3 failures so far: 2 more allowed
    later = [failure_retry(retries=44, waits=40, max_retries=5, backoff_max=120)[1] for _ in range(200)]
    assert max(later) > 2  # the 5th failure waits up to 2 * 2**4 s
