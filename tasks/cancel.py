"""Cancelling a fleet request: one Redis key decides between a cancel and the request's commit.

`obdconv:fate:<request id>` in the result backend's Redis (beside the progress hash) is written
once (SET NX) with one of two values:
* "cancelled" by a cancel (`cancel_request`, the HTTP API's POST /v1/conversions/{id}/cancel);
* "committing" by the task about to move the request's tag(s): push_manifest of the root manifest,
  push_index, and convert_manifest of a root manifest while its dedup lookup may re-tag a hit
  (`commit_or_stop`; given back with `reopen` when the lookup re-tagged nothing).
Whoever comes first wins. A cancel that finds "committing" is refused (the outputs are being
tagged: retry, or wait for the result); a push that finds "cancelled" tags nothing. So a CANCELLED
request never moved a tag, and a request that moved one is never reported CANCELLED.

Every fleet task checks the key when it starts (`stop_if_cancelled`, from FleetTask.__call__): a
cancelled request's tasks release the claims in their job and end quietly (Celery `Ignore`: no
retry, no FAILURE recorded, the message ledger forgets the message); assemble checks again before
each format's layer blob. A blob an assemble already committed is content-addressed and referenced
by no manifest; nothing else of the request is left.

`cancel_request` (used by the API; any process with the fleet's settings can call it): takes the
gate, records CANCELLED (a conditional UPDATE: never over a final state), revokes the request's
task messages still waiting (found in the message ledger, workers/ledger.py, by their job's request
id) and releases every dedup claim the request holds (owner `fleet:<request id>:*`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import peewee
import redis
from celery.exceptions import Ignore

from obdconv.errors import NetworkError

log = logging.getLogger(__name__)

FATE_KEY_PREFIX = "obdconv:fate:"
CANCELLED = "cancelled"
COMMITTING = "committing"

# Compare-and-delete: give the gate back only if it still says "committing".
_REOPEN_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def fate_key(request_id: str) -> str:
    return FATE_KEY_PREFIX + request_id


def fate_of(client: redis.Redis, request_id: str) -> str | None:
    raw = client.get(fate_key(request_id))
    return raw.decode() if raw is not None else None


def claim_fate(client: redis.Redis, request_id: str, fate: str, ttl: int) -> str:
    """Set the request's fate to `fate` unless it already has one; returns the fate in force."""
    if client.set(fate_key(request_id), fate, nx=True, ex=max(1, ttl)):
        return fate
    return fate_of(client, request_id) or fate  # expired in between: nobody else decided


def reopen(client: redis.Redis, request_id: str) -> None:
    """Let a cancel in again after a commit window that moved nothing."""
    client.eval(_REOPEN_LUA, 1, fate_key(request_id), COMMITTING)


# --- the fleet side --------------------------------------------------------------------------------


def _client() -> redis.Redis | None:
    from tasks.progress import backend_client

    return backend_client()


def _stop(job: dict[str, Any], why: str) -> Ignore:
    from tasks.claims import release_claims

    log.warning("%s: cancelled; %s", job.get("request_id"), why)
    release_claims(job)
    return Ignore()


def stop_if_cancelled(job: dict[str, Any], task_name: str) -> None:
    """Raise Ignore (after releasing the job's claims) when the job's request was cancelled.
    Redis unreachable: carry on (the task needs Redis anyway and fails its own way)."""
    request_id = job.get("request_id")
    client = _client()
    if not request_id or client is None:
        return
    try:
        cancelled = fate_of(client, request_id) == CANCELLED
    except redis.RedisError as e:
        log.warning("%s: cannot read the cancel flag: %s", request_id, e)
        return
    if cancelled:
        raise _stop(job, f"{task_name} ends without running")


def commit_or_stop(job: dict[str, Any], ttl: int) -> None:
    """Take the gate before moving the request's tag(s); Ignore if it was cancelled first. A Redis
    failure here is a NetworkError (retried): tagging without the gate could race a cancel."""
    request_id = job["request_id"]
    client = _client()
    if client is None:
        return  # no Redis result backend: nothing can cancel
    try:
        fate = claim_fate(client, request_id, COMMITTING, ttl)
    except redis.RedisError as e:
        raise NetworkError(f"cannot take the commit gate of {request_id}: {e}") from e
    if fate == CANCELLED:
        raise _stop(job, "nothing tagged")


def reopen_for_cancel(job: dict[str, Any]) -> None:
    client = _client()
    if client is None:
        return
    try:
        reopen(client, job["request_id"])
    except redis.RedisError as e:  # the gate expires with result_expires; until then cancels get 409
        log.warning("%s: cannot reopen the commit gate: %s", job["request_id"], e)


# --- the cancelling side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CancelOutcome:
    """`cancelled`: the request is CANCELLED now (or already was). Otherwise `reason` says why not:
    "final" (it had finished: `state`), "committing" (its tags are being moved), "unknown"."""

    cancelled: bool
    reason: str = ""
    state: str = ""
    revoked: int = 0
    claims_released: int = 0


def request_task_ids(broker: redis.Redis, request_id: str) -> list[str]:
    """Ids of the request's task messages the message ledger still holds (sent, not yet run)."""
    from workers.ledger import MESSAGE_KEY_PREFIX, LedgerEntry

    found = []
    keys = list(broker.scan_iter(match=MESSAGE_KEY_PREFIX + "*", count=1000))
    for start in range(0, len(keys), 500):
        for raw in broker.mget(keys[start:start + 500]):
            if raw is None:
                continue
            try:
                entry = LedgerEntry.from_json(raw)
                kwargs = entry.body[1] if isinstance(entry.body, list) and len(entry.body) > 1 else {}
                job = kwargs.get("job") if isinstance(kwargs, dict) else None
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(job, dict) and job.get("request_id") == request_id:
                found.append(entry.task_id)
    return found


def cancel_request(celery_app: Any, request_id: str) -> CancelOutcome:
    """Cancel `request_id` (see the module docstring). Needs the fleet's database configured."""
    from obdconv.client import status_database_ready
    from obdconv.dedup.claims import release_owners
    from obdconv.status import FINAL_STATES, get_status, record_cancelled, status_database
    from tasks.claims import request_owner_prefix
    from tasks.progress import client_for
    from workers.app import settings_of

    settings = settings_of(celery_app)
    if not status_database_ready(celery_app):
        return CancelOutcome(False, "unknown")
    row = get_status(request_id)
    if row is None:
        return CancelOutcome(False, "unknown")
    if row["state"] in FINAL_STATES and row["state"] != "CANCELLED":
        return CancelOutcome(False, "final", row["state"])
    backend = client_for(settings.result_backend)
    if backend is not None:
        try:
            fate = claim_fate(backend, request_id, CANCELLED, settings.result_expires)
        except redis.RedisError as e:
            raise NetworkError(f"cannot set the cancel flag of {request_id}: {e}") from e
        if fate == COMMITTING:
            return CancelOutcome(False, "committing", row["state"])
    if not record_cancelled(request_id):
        now = get_status(request_id) or row
        if now["state"] != "CANCELLED":
            return CancelOutcome(False, "final", now["state"])
    broker = redis.Redis.from_url(settings.broker_url, socket_timeout=10, socket_connect_timeout=5)
    try:
        task_ids = sorted({request_id, *request_task_ids(broker, request_id)})
    except redis.RedisError as e:  # the flag still stops every task when it starts
        log.warning("%s: cannot read the message ledger: %s", request_id, e)
        task_ids = [request_id]
    finally:
        broker.close()
    try:
        celery_app.control.revoke(task_ids)
    except Exception as e:  # broker away: the flag still stops every task when it starts
        log.warning("%s: cannot revoke its tasks: %s", request_id, e)
    try:
        with status_database.connection_context():
            released = (release_owners(status_database, request_owner_prefix(request_id))
                        if status_database.table_exists("obdconv_claims") else 0)
    except peewee.PeeweeException as e:  # claims nobody heartbeats expire after claim_ttl anyway
        log.warning("%s: cannot release its claims: %s", request_id, e)
        released = 0
    log.info("%s: cancelled (%d task message(s) revoked, %d claim(s) released)", request_id, len(task_ids),
             released)
    return CancelOutcome(True, state="CANCELLED", revoked=len(task_ids), claims_released=released)
