"""The durable status record of one conversion request (a peewee model).

Celery's result backend forgets results after `result_expires` and loses them when Redis restarts;
this row does not. It is written by the fleet (submit: PENDING; tasks: RUNNING/stage, SUCCESS with
output digests, FAILURE with the error class and message) and read by `obdconv status/wait`.

The model binds to the dedup database proxy (`obdconv.dedup.db.database`: SQLite for a local
fleet, MySQL in production) and is registered there so `obdconv db init` creates its table;
`open_status_database(db_type, db_str)` points the proxy at a database when nothing else did.
Writes are idempotent upserts: re-running a task never creates a second row.
"""

from __future__ import annotations

import json
import time
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
FINAL_STATES = frozenset({SUCCESS, FAILURE})
# Error messages can quote untrusted input (a 100 KB tar path): keep them well inside MySQL's
# TEXT (65535 bytes, 4 per utf8mb4 character), where a longer value fails the whole write.
MAX_ERROR_MESSAGE = 8000



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

    class Meta:
        database = status_database
        table_name = "obdconv_requests"


def bind_status_database(db: peewee.Database, create: bool = True) -> None:
    """Point the shared proxy at `db` (if not already) and create the status table."""
    if status_database.obj is not db:
        status_database.initialize(db)
    if create:
        with _db_errors("create the status table"):
            db.create_tables([ConversionStatus], safe=True)


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
    }
