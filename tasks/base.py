"""The base class of every fleet task: retry policy, error classification, status records.

* NetworkError / DatabaseError (`retryable` in obdconv.errors) are retried with exponential
  backoff and jitter up to settings.retry_max times; BadInputError and everything else is not.
* A failure is written to the request's durable status record as (error class name, message)
  the first time it happens, so callers see the cause even when Celery wraps it in a ChordError.
* Every task gets the request context `job` as a keyword argument:
  {"request_id": str, "request": ConversionRequest.to_dict(), ...stage specific fields}.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from obdconv.errors import DatabaseError, NetworkError
from obdconv.status import record_failure
from tasks.claims import release_claims
from tasks.context import open_worker_database, settings

log = logging.getLogger(__name__)


def retry_later(task: Task, countdown: float, **options: Any) -> BaseException:
    """Come back in `countdown` seconds without holding a worker slot (waiting for another task's
    work, not failing). Celery's `retry(max_retries=None)` means "the task's default limit" (5), not
    "unlimited", so this retry is allowed explicitly; the caller bounds the wait itself."""
    return task.retry(countdown=countdown, max_retries=task.request.retries + 1, **options)


def error_class_name(exc: BaseException) -> str:
    return type(exc).__name__


class FleetTask(Task):
    abstract = True
    autoretry_for = (NetworkError, DatabaseError)
    retry_backoff = 2
    retry_jitter = True
    acks_late = True
    reject_on_worker_lost = True

    max_retries = settings().retry_max
    retry_backoff_max = settings().retry_backoff_max

    def on_failure(self, exc: BaseException, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   einfo: Any) -> None:
        job = kwargs.get("job") or {}
        request_id = job.get("request_id")
        log.error("%s %s failed: %s: %s", self.name, task_id, error_class_name(exc), exc)
        if request_id and settings().db_type:
            try:
                open_worker_database()
                record_failure(request_id, error_class_name(exc), str(exc))
                release_claims(job)  # a failed request converts nothing more: let waiters take over now
            except DatabaseError as e:  # the Celery result still carries the error
                log.error("cannot record failure of %s: %s", request_id, e)
