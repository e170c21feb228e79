"""What happens when a request reaches a final state: an event on Redis pub/sub, the metrics, and
the completion callback, sent by its own task (`obdconv.notify`) so it never delays or changes the
conversion's result.

Trigger: obdconv/status.py tells `final_state_listeners` each time a status row is written with a
state in FINAL_STATES (SUCCESS, FAILURE, and whatever final states other code adds), in whichever
process wrote it, once `install()` registered `on_final_state` there: every worker does at start
(workers/startup.py); any other process that writes final states (e.g. an API cancelling a
request) must call it too. A redelivered task can write the same final state again: the first writer takes
`obdconv:final:<request id>:<state>` (SET NX in the result backend) and only it announces.

* Event: the summary below as JSON on the channel `obdconv:events` of the result backend's Redis.
  Pub/sub is fire and forget: a listener that is not subscribed at that moment misses it (the
  status row stays the durable record).
* Callback: when the request has `callback_url`, `obdconv.notify` (control queue) POSTs the same
  summary, signed (tasks/webhook.py), with the key named by `callback_secret_ref` resolved on the
  worker (config/callback_secrets.py). Network trouble, 5xx, 408/425/429: retried after
  `callback_backoff` * 2^n s (full jitter, at most `callback_backoff_max`), `callback_retries` times;
  another 4xx, a redirect elsewhere or a key not configured: given up at once. The outcome goes to the
  status row's callback_state (PENDING -> RETRYING -> DELIVERED | FAILED), callback_attempts and
  callback_error, never to its state.

Summary: {"event": "conversion.finished", "request_id", "state", "source", "outputs": {format: {"tag",
"digest", "mediaType", "size"[, "dedup"]}}, "error": {"class", "message"} | null, "submitted_at",
"started_at", "finished_at"} (times in Unix seconds).
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

from celery import Task

from config.callback_secrets import resolve_callback_secret
from obdconv import status as status_table
from obdconv.errors import DatabaseError, ObdconvError
from obdconv.request import ConversionRequest
from tasks.context import settings
from tasks.progress import backend_client
from tasks.webhook import EVENT, CallbackError, post_callback, summary_body
from workers import metrics
from workers.app import app
from workers.database import open_worker_database
from workers.queues import CONTROL, TASK_NOTIFY

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "obdconv:events"
FINAL_MARK_PREFIX = "obdconv:final:"
CALLBACK_PENDING = "PENDING"
CALLBACK_RETRYING = "RETRYING"
CALLBACK_DELIVERED = "DELIVERED"
CALLBACK_FAILED = "FAILED"
_OUTPUT_FIELDS = ("tag", "digest", "mediaType", "size", "dedup")


def summary_of(status: dict[str, Any]) -> dict[str, Any]:
    """The event / callback body for a status record (obdconv.status.get_status); outputs without
    their `dump` (manifest JSON: large, and not what a notification is for)."""
    outputs = {fmt: {k: out[k] for k in _OUTPUT_FIELDS if k in out}
               for fmt, out in sorted((status.get("outputs") or {}).items())}
    return {"event": EVENT, "request_id": status["request_id"], "state": status["state"],
            "source": status.get("source", ""), "outputs": outputs, "error": status.get("error"),
            "submitted_at": status.get("submitted_at"), "started_at": status.get("started_at"),
            "finished_at": status.get("finished_at")}


def _first_announcement(request_id: str, state: str) -> bool:
    client = backend_client()
    if client is None:
        return True
    return bool(client.set(f"{FINAL_MARK_PREFIX}{request_id}:{state}", 1, nx=True, ex=settings().result_expires))


def on_final_state(request_id: str, state: str) -> None:
    """The status listener: never raises (the conversion's result is already decided and recorded)."""
    try:
        if not _first_announcement(request_id, state):
            return
        record = status_table.get_status(request_id)
        request = status_table.get_request(request_id) or {}
        if record is None:
            return
    except Exception as e:  # Redis or the database down: nothing to announce with
        log.error("cannot announce %s of %s: %s: %s", state, request_id, type(e).__name__, e)
        return
    metrics.count_final(state, _formats(request), (record.get("error") or {}).get("class", ""))
    summary = summary_of(record)
    try:
        client = backend_client()
        if client is not None:
            client.publish(EVENTS_CHANNEL, json.dumps(summary, sort_keys=True))
    except Exception as e:
        log.warning("cannot publish %s of %s on %s: %s", state, request_id, EVENTS_CHANNEL, e)
    if request.get("callback_url"):
        try:
            status_table.record_callback(request_id, CALLBACK_PENDING, 0)
            notify_task.apply_async(kwargs={"request_id": request_id, "state": state}, queue=CONTROL,
                                    task_id=f"{request_id}.notify.{state}")
        except Exception as e:
            log.error("cannot queue the callback of %s: %s: %s", request_id, type(e).__name__, e)


def _formats(request: dict[str, Any]) -> list[str]:
    try:
        return [p.format for p in ConversionRequest.from_dict(request).profiles()]
    except (TypeError, ValueError, KeyError):  # a row written by another obdconv version
        return []


def backoff(attempt: int, base: float, maximum: float) -> float:
    """Seconds before retry number `attempt` (1-based): full jitter over base * 2^(attempt-1)."""
    return random.uniform(0, min(maximum, base * 2 ** (attempt - 1)))


# Database trouble while reading or recording is retried like the POST (Celery's own backoff).
@app.task(bind=True, name=TASK_NOTIFY, acks_late=True, reject_on_worker_lost=True,
          max_retries=settings().callback_retries, autoretry_for=(DatabaseError,), retry_backoff=True,
          retry_backoff_max=60)
def notify_task(self: Task, *, request_id: str, state: str) -> dict[str, Any]:
    """POST the signed summary of `request_id` to its callback URL; -> {"callback_state", "attempts"}."""
    s = settings()
    open_worker_database()
    record = status_table.get_status(request_id)
    request = status_table.get_request(request_id) or {}
    url, ref = request.get("callback_url", ""), request.get("callback_secret_ref", "")
    attempt = self.request.retries + 1
    if record is None or not url:
        return {"callback_state": "", "attempts": 0}
    error = ""
    try:
        key = resolve_callback_secret(ref, s.callback_secrets_file)
        post_callback(url, summary_body(summary_of(record)), key, request_id=request_id,
                      delivery=f"{request_id}/{state}", timeout=float(s.callback_timeout))
    except CallbackError as e:
        error = str(e)
        if e.retryable and attempt <= s.callback_retries:
            status_table.record_callback(request_id, CALLBACK_RETRYING, attempt, error)
            metrics.count_callback("retried")
            log.warning("callback of %s, attempt %d: %s; retrying", request_id, attempt, error)
            raise self.retry(countdown=backoff(attempt, s.callback_backoff, s.callback_backoff_max)) from None
    except ObdconvError as e:  # the key is not configured (AuthError): retrying cannot help
        error = f"{type(e).__name__}: {e}"
    if error:
        status_table.record_callback(request_id, CALLBACK_FAILED, attempt, error)
        metrics.count_callback("failed")
        log.error("callback of %s given up after %d attempt(s): %s", request_id, attempt, error)
        return {"callback_state": CALLBACK_FAILED, "attempts": attempt}
    status_table.record_callback(request_id, CALLBACK_DELIVERED, attempt)
    metrics.count_callback("delivered")
    return {"callback_state": CALLBACK_DELIVERED, "attempts": attempt}


def install() -> None:
    """Register `on_final_state` with the status table (idempotent). Every worker does it at start
    (workers/startup.py); another process that writes final states calls it too."""
    if on_final_state not in status_table.final_state_listeners:
        status_table.final_state_listeners.append(on_final_state)
