"""The durable status record of one conversion request (a peewee model).

Celery's result backend forgets results after `result_expires` and loses them when Redis restarts;
this row does not. It is written by the fleet (submit: PENDING; tasks: RUNNING/stage, SUCCESS with
output digests, FAILURE with the error class and message; a cancel: CANCELLED) and read by
`obdconv status/wait` and the HTTP API. SUCCESS, FAILURE and CANCELLED are final: nothing moves a
row out of them.

The model binds to the dedup database proxy (`obdconv.dedup.db.database`: SQLite for a local
fleet, MySQL in production) and is registered there so `obdconv db init` creates its table;
`open_status_database(db_type, db_str)` points the proxy at a database when nothing else did.
Writes are idempotent upserts: re-running a task never creates a second row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peewee

from obdconv.dedup.db import connect_database, parse_db_config, register_model
from obdconv.dedup.db import database as status_database
from obdconv.errors import DatabaseError

PENDING = "PENDING"
RUNNING = "RUNNING"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
CANCELLED = "CANCELLED"  # cancelled before any tag moved (tasks/cancel.py)
# Some requested output formats delivered, others impossible (obdconv/pipeline/feasibility.py): the
# delivered ones in `outputs` as on SUCCESS, each missing one as {"tag", "error": {"class", "message"}}.
PARTIAL = "PARTIAL"
FINAL_STATES = frozenset({SUCCESS, FAILURE, CANCELLED, PARTIAL})
# Error messages can quote untrusted input (a 100 KB tar path): keep them well inside MySQL's
# TEXT (65535 bytes, 4 per utf8mb4 character), where a longer value fails the whole write.
MAX_ERROR_MESSAGE = 8000
# Told (request_id, state) each time a row is written with a state in FINAL_STATES (tasks/notify.py:
# completion callback, pub/sub event, metrics). A redelivered task may write the same final state
# twice: listeners deduplicate. They must not raise; they run after the row is committed.
final_state_listeners: list[Callable[[str, str], None]] = []


@register_model
class ConversionStatus(peewee.Model):
    request_id = peewee.CharField(max_length=64, primary_key=True)
    state = peewee.CharField(max_length=16, default=PENDING)
    stage = peewee.CharField(max_length=64, default="")
    source = peewee.CharField(max_length=512, default="")  # repository + tag/digest (no secrets)
    request_json = peewee.TextField(default="{}")
    submitted_at = peewee.DoubleField(null=True)
    started_at = peewee.DoubleField(null=True)
    finished_at = peewee.DoubleField(null=True)
    updated_at = peewee.DoubleField(default=time.time)
    outputs_json = peewee.TextField(default="{}")  # {"overlaybd": {"tag":..,"digest":..}, ...}
    error_class = peewee.CharField(max_length=64, default="")
    error_message = peewee.TextField(default="")
    # Completion callback (tasks/notify.py); NULL on rows without one, and on rows written before
    # these columns existed (added in place by obdconv.dedup.schema.add_missing_columns).
    callback_state = peewee.CharField(max_length=16, null=True)  # PENDING/RETRYING/DELIVERED/FAILED
    callback_error = peewee.TextField(null=True)
    callback_attempts = peewee.IntegerField(null=True)

    class Meta:
        database = status_database
        table_name = "obdconv_requests"


def bind_status_database(db: peewee.Database, create: bool = True) -> None:
    """Point the shared proxy at `db` (if not already) and create the status table."""
    if status_database.obj is not db:
        status_database.initialize(db)
    if create:
        from obdconv.dedup.schema import add_missing_columns

        with _db_errors("create the status table"):
            db.create_tables([ConversionStatus], safe=True)
            add_missing_columns(db, ConversionStatus)  # a table made by an older obdconv


def open_status_database(db_type: str, db_str: str) -> peewee.Database:
    """Open `db_type`/`db_str` (the `--db-type/--db-str` forms of obdconv.dedup.db) and bind to it."""
    cfg = parse_db_config(db_type, db_str)
    if cfg.db_type == "sqlite":
        Path(cfg.path).parent.mkdir(parents=True, exist_ok=True)
    db = connect_database(cfg)
    bind_status_database(db)
    return db


class _db_errors:
    """Turn peewee/driver failures into DatabaseError (retryable), naming what was attempted."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None and isinstance(exc, peewee.PeeweeException):
            # (the driver's message names the host at most: say which database)
            raise DatabaseError(f"status database {_describe(status_database.obj)}: cannot {self.what}: {exc}") from exc
        return False


def _describe(db: peewee.Database | None) -> str:
    """Where the status table lives, without the password."""
    if isinstance(db, peewee.MySQLDatabase):
        params = db.connect_params
        where = params.get("unix_socket") or f"{params.get('host')}:{params.get('port')}"
        return f"mysql://{params.get('user', '')}@{where}/{db.database}"
    if isinstance(db, peewee.SqliteDatabase):
        return f"sqlite:{db.database}"
    return "(not configured)"


def _upsert(request_id: str, **values: Any) -> None:
    values["updated_at"] = time.time()
    query = ConversionStatus.insert(request_id=request_id, **values)
    if isinstance(status_database.obj, peewee.MySQLDatabase):
        query = query.on_conflict(update=values)  # MySQL: ON DUPLICATE KEY UPDATE (no target)
    else:
        query = query.on_conflict(conflict_target=[ConversionStatus.request_id], update=values)
    with _db_errors(f"write status of {request_id}"), status_database.connection_context():
        query.execute()
    if values.get("state") in FINAL_STATES:
        _announce_final(request_id, values["state"])


def _announce_final(request_id: str, state: str) -> None:
    for listener in final_state_listeners:
        listener(request_id, state)


def record_submitted(request_id: str, source: str, request: dict[str, Any]) -> None:
    """PENDING row at submit time; never downgrades a row that already moved on."""
    with _db_errors(f"record submit of {request_id}"), status_database.connection_context():
        ConversionStatus.insert(
            request_id=request_id, state=PENDING, source=source[:512], request_json=json.dumps(request),
            submitted_at=time.time(), updated_at=time.time(),
        ).on_conflict_ignore().execute()


def record_running(request_id: str, stage: str, source: str = "", request: dict[str, Any] | None = None) -> None:
    """RUNNING at `stage` (no-op on a finished request, so a redelivered task cannot reopen it)."""
    with _db_errors(f"record stage of {request_id}"), status_database.connection_context():
        row = ConversionStatus.get_or_none(ConversionStatus.request_id == request_id)
        if row is not None and row.state in FINAL_STATES:
            return
    values: dict[str, Any] = {"state": RUNNING, "stage": stage}
    if row is None or row.started_at is None:
        values["started_at"] = time.time()
    if source:
        values["source"] = source[:512]
    if request is not None:
        values["request_json"] = json.dumps(request)
    _upsert(request_id, **values)


def record_success(request_id: str, outputs: dict[str, Any]) -> None:
    _upsert(request_id, state=SUCCESS, stage="done", outputs_json=json.dumps(outputs, sort_keys=True),
            finished_at=time.time(), error_class="", error_message="")


def record_partial(request_id: str, outputs: dict[str, Any]) -> None:
    """PARTIAL: `outputs` holds every requested format, the missing ones with their "error"; the
    row's error names the first of them (so `error_class` says why the request is not whole)."""
    missing = [(fmt, o["error"]) for fmt, o in sorted(outputs.items()) if isinstance(o, dict) and o.get("error")]
    error_class, message = (missing[0][1].get("class", ""), "; ".join(
        f"{fmt}: {e.get('message', '')}" for fmt, e in missing)) if missing else ("", "")
    _upsert(request_id, state=PARTIAL, stage="done", outputs_json=json.dumps(outputs, sort_keys=True),
            finished_at=time.time(), error_class=error_class[:64], error_message=message[:MAX_ERROR_MESSAGE])


def record_failure(request_id: str, error_class: str, message: str) -> None:
    """FAILURE with the error class name and message. The first failure wins (later failures of
    sibling tasks of the same request are consequences, not causes)."""
    with _db_errors(f"read status of {request_id}"), status_database.connection_context():
        row = ConversionStatus.get_or_none(ConversionStatus.request_id == request_id)
        if row is not None and row.state in FINAL_STATES:
            return
    if len(message) > MAX_ERROR_MESSAGE:
        cut = len(message) - MAX_ERROR_MESSAGE
        message = f"{message[:MAX_ERROR_MESSAGE]}... ({cut} more characters)"
    _upsert(request_id, state=FAILURE, error_class=error_class[:64], error_message=message,
            finished_at=time.time())


def record_callback(request_id: str, state: str, attempts: int, error: str = "") -> None:
    """The completion callback's delivery state; never touches the conversion's own state."""
    _upsert(request_id, callback_state=state[:16], callback_attempts=attempts, callback_error=error[:MAX_ERROR_MESSAGE])


def get_request(request_id: str) -> dict[str, Any] | None:
    """The request as submitted (ConversionRequest.to_dict()), or None."""
    with _db_errors(f"read request of {request_id}"), status_database.connection_context():
        row = ConversionStatus.get_or_none(ConversionStatus.request_id == request_id)
    return json.loads(row.request_json or "{}") if row is not None else None
def record_cancelled(request_id: str) -> bool:
    """CANCELLED, only from a state that is not final (one conditional UPDATE, so a request that
    just finished is never turned into a cancelled one). False when the row is final or missing."""
    now = time.time()
    with _db_errors(f"record cancel of {request_id}"), status_database.connection_context():
        changed = (ConversionStatus.update(state=CANCELLED, stage="cancelled", finished_at=now, updated_at=now)
                   .where((ConversionStatus.request_id == request_id)
                          & ConversionStatus.state.not_in(sorted(FINAL_STATES)))
                   .execute())
    if changed:
        _announce_final(request_id, CANCELLED)
    return bool(changed)


def get_status(request_id: str) -> dict[str, Any] | None:
    with _db_errors(f"read status of {request_id}"), status_database.connection_context():
        row = ConversionStatus.get_or_none(ConversionStatus.request_id == request_id)
    if row is None:
        return None
    return {
        "request_id": row.request_id,
        "state": row.state,
        "stage": row.stage,
        "source": row.source,
        "submitted_at": row.submitted_at,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "updated_at": row.updated_at,
        "outputs": json.loads(row.outputs_json or "{}"),
        "error": {"class": row.error_class, "message": row.error_message} if row.error_class else None,
        "callback": ({"state": row.callback_state, "attempts": row.callback_attempts or 0,
                      "error": row.callback_error or ""} if row.callback_state else None),
    }
