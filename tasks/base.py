"""The base class of every fleet task: retry policy, error classification, status records.

* NetworkError / DatabaseError (`retryable` in obdconv.errors) are retried with exponential
  backoff and jitter up to settings.retry_max times; BadInputError and everything else is not.
  Waiting for another task (`retry_later`) is not a failure: it uses none of those retries.
* A failure is written to the request's durable status record as (error class name, message)
  the first time it happens, so callers see the cause even when Celery wraps it in a ChordError.
* A task of a cancelled request ends quietly before it runs (tasks/cancel.py).
* Every task gets the request context `job` as a keyword argument:
  {"request_id": str, "request": ConversionRequest.to_dict(), ...stage specific fields}.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task
from celery.states import SUCCESS
from celery.utils.time import get_exponential_backoff_interval

from obdconv.errors import DatabaseError, NetworkError, ObdconvError
from obdconv.status import record_failure
from tasks.cancel import stop_if_cancelled
from tasks.claims import release_claims
from tasks.context import failure_message, settings
from workers.database import open_worker_database

log = logging.getLogger(__name__)


WAITS = "waits"  # key in a task's `job`: how many of its retries were waits (`retry_later`)
RETRY_BACKOFF = 2  # seconds, doubled per failure (with full jitter), up to settings.retry_backoff_max


def retry_later(task: Task, countdown: float, **options: Any) -> BaseException:
    """Come back in `countdown` seconds without holding a worker slot (waiting for another task's
    work, not failing). Celery's `retry(max_retries=None)` means "the task's default limit" (5), not
    "unlimited", so this retry is allowed explicitly; the caller bounds the wait itself.

    Celery has one retry counter for both; the waits are also counted in the re-sent `job`, so
    that `FleetTask.retry` gives a failure after a long wait its full retries and backoff."""
    kwargs = dict(options.pop("kwargs", None) or task.request.kwargs or {})
    job = dict(kwargs.get("job") or {})
    job[WAITS] = int(job.get(WAITS, 0)) + 1
    kwargs["job"] = job
    try:
        return task.retry(countdown=countdown, max_retries=task.request.retries + 1, kwargs=kwargs, **options)
    finally:
        # `retry(max_retries=...)` leaves `override_max_retries` on the task object (one per worker
        # process), and Celery's autoretry would apply it to the next failure of ANY later run.
        if hasattr(task, "override_max_retries"):
            delattr(task, "override_max_retries")


def failure_retry(retries: int, waits: int, max_retries: int, backoff_max: float) -> tuple[int, float]:
    """(max_retries for Celery, countdown) of a retry after a failure, when `waits` of the task's
    `retries` so far were waits: the limit and the backoff count failures only."""
    failures = max(retries - waits, 0)
    countdown = get_exponential_backoff_interval(factor=RETRY_BACKOFF, retries=failures, maximum=int(backoff_max),
                                                 full_jitter=True)
    return max_retries + (retries - failures), countdown


def error_class_name(exc: BaseException) -> str:
    return type(exc).__name__


def finished_elsewhere(task: Task, task_id: str) -> bool:
    """True when the result backend holds SUCCESS for `task_id` (a redelivered copy of the task)."""
    try:
        return bool(task.backend.get_task_meta(task_id).get("status") == SUCCESS)
    except Exception:  # backend unreachable: treat the failure as the request's
        return False


class FleetTask(Task):
    abstract = True
    # Retried with exponential backoff by `retry` below (not Celery's `retry_backoff`, which
    # would count waits as failures). redis.RedisError: a task's own Redis calls (locks, holders,
    # counters) lost the broker for a moment, like a NetworkError.
    autoretry_for = (NetworkError, DatabaseError, redis.RedisError)
    acks_late = True
    reject_on_worker_lost = True
    # A retry's ETA was set on the fleet clock: wait for it on the fleet clock (workers/clock.py).
    Strategy = "workers.clock:fleet_strategy"

    max_retries = settings().retry_max
    retry_backoff_max = settings().retry_backoff_max

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task; an obdconv error leaving it says which worker it happened on (and why a
        path may be missing there), in the exception itself: Celery stores the exception as the
        task's result before `on_failure` runs, and a client may read either."""
        job = kwargs.get("job")
        if isinstance(job, dict):
            stop_if_cancelled(job, self.name)  # Ignore: the request was cancelled
        try:
            return super().__call__(*args, **kwargs)
        except ObdconvError as exc:
            job = kwargs.get("job") or {}
            exc.args = (failure_message(exc, job.get("request") or {}, self.request.hostname or "?"),)
            raise

    def retry(self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None, throw: bool = True,
              eta: Any = None, countdown: float | None = None, max_retries: int | None = None,
              **options: Any) -> Any:
        if exc is not None:  # a failure, retried by `autoretry_for`: our limit and backoff, always
            # (a `max_retries` given here is Celery's `override_max_retries`, possibly left over from
            # a wait in eager mode, where the retry runs inside `retry_later`'s call)
            job = (self.request.kwargs or {}).get("job") or {}
            max_retries, backoff = failure_retry(self.request.retries, int(job.get(WAITS, 0)), self.max_retries,
                                                 self.retry_backoff_max)
            if countdown is None and eta is None:
                countdown = backoff
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)

    def on_failure(self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   einfo: Any) -> None:
        job = kwargs.get("job") or {}
        request_id = job.get("request_id")
        log.error("%s %s failed: %s: %s", self.name, task_id, error_class_name(exc), exc)
        if finished_elsewhere(self, task_id):
            # This worker was cut off longer than the lease: the task was redelivered, ran on another
            # worker and succeeded (Celery keeps that SUCCESS). This late failure of the stale copy
            # must not fail the request nor release the claims its live tasks hold.
            log.warning("%s %s already succeeded on another worker: its request goes on", self.name, task_id)
            return
        if request_id and settings().db_type:
            try:
                open_worker_database()
                record_failure(request_id, error_class_name(exc), str(exc))
                release_claims(job)  # a failed request converts nothing more: let waiters take over now
            except DatabaseError as e:  # the Celery result still carries the error
                log.error("cannot record failure of %s: %s", request_id, e)
