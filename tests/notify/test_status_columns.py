"""The status row's callback columns: a table made by an older obdconv (without them) gets them in
place, rows intact, on SQLite and MariaDB; the shipped SQL files create the table the model reads."""

from __future__ import annotations

from pathlib import Path

import peewee
import pytest

from obdconv import status
from obdconv.dedup.db import connect_database, parse_db_config
from obdconv.dedup.schema import add_missing_columns, split_statements
from tests.dedup.conftest import Backend

ROOT = Path(__file__).resolve().parents[2]
CALLBACK_COLUMNS = {"callback_state", "callback_error", "callback_attempts"}
# The table as obdconv created it before the callback columns existed (peewee's DDL of that model).
OLD_TABLE = {
    "sqlite": 'CREATE TABLE "obdconv_requests" ("request_id" VARCHAR(64) NOT NULL PRIMARY KEY, "state" VARCHAR(16) '
              'NOT NULL, "stage" VARCHAR(64) NOT NULL, "source" VARCHAR(512) NOT NULL, "request_json" TEXT NOT NULL, '
              '"submitted_at" REAL, "started_at" REAL, "finished_at" REAL, "updated_at" REAL NOT NULL, '
              '"outputs_json" TEXT NOT NULL, "error_class" VARCHAR(64) NOT NULL, "error_message" TEXT NOT NULL)',
    "mysql": "CREATE TABLE `obdconv_requests` (`request_id` VARCHAR(64) NOT NULL PRIMARY KEY, `state` VARCHAR(16) "
             "NOT NULL, `stage` VARCHAR(64) NOT NULL, `source` VARCHAR(512) NOT NULL, `request_json` TEXT NOT NULL, "
             "`submitted_at` DOUBLE PRECISION, `started_at` DOUBLE PRECISION, `finished_at` DOUBLE PRECISION, "
             "`updated_at` DOUBLE PRECISION NOT NULL, `outputs_json` TEXT NOT NULL, `error_class` VARCHAR(64) NOT "
             "NULL, `error_message` TEXT NOT NULL)",
}
OLD_ROW = ("INSERT INTO obdconv_requests (request_id, state, stage, source, request_json, submitted_at, started_at, "
           "finished_at, updated_at, outputs_json, error_class, error_message) VALUES ('old-1', 'SUCCESS', 'done', "
           "'h/app:v1', '{}', 1.0, 2.0, 3.0, 3.0, '{\"native\": {\"digest\": \"sha256:aa\"}}', '', '')")


def columns(backend: Backend) -> set[str]:
    if backend.kind == "sqlite":
        return {r[1] for r in backend.sql("PRAGMA table_info(obdconv_requests)")}
    return {r[0] for r in backend.sql("SHOW COLUMNS FROM obdconv_requests")}


def open_db(backend: Backend) -> peewee.Database:
    return connect_database(parse_db_config(backend.kind, backend.db_str))


def test_an_old_table_gets_the_callback_columns_in_place(fresh_backend: Backend) -> None:
    backend = fresh_backend
    backend.sql(OLD_TABLE[backend.kind])
    backend.sql(OLD_ROW)
    assert not CALLBACK_COLUMNS & columns(backend)
    db = open_db(backend)
    try:
        status.bind_status_database(db)  # what every worker does when it opens its database
        assert CALLBACK_COLUMNS <= columns(backend)
        old = status.get_status("old-1")
        assert old is not None and old["state"] == "SUCCESS" and old["callback"] is None
        assert old["outputs"] == {"native": {"digest": "sha256:aa"}}
        status.record_callback("old-1", "FAILED", 3, "cannot reach http://r:80: Connection refused")
        after = status.get_status("old-1")
        assert after is not None and after["state"] == "SUCCESS" and after["finished_at"] == 3.0
        assert after["callback"] == {"state": "FAILED", "attempts": 3,
                                     "error": "cannot reach http://r:80: Connection refused"}
        assert add_missing_columns(db, status.ConversionStatus) == []  # a second worker: nothing to do
    finally:
        db.close()


def test_a_column_another_worker_just_added_is_not_an_error(fresh_backend: Backend) -> None:
    backend = fresh_backend
    backend.sql(OLD_TABLE[backend.kind])
    db = open_db(backend)
    try:
        real = db.get_columns
        calls = []

        def stale_first(table: str) -> list[peewee.ColumnMetadata]:
            calls.append(table)  # the first look predates the other worker's ALTER TABLE
            return [c for c in real(table) if c.name not in CALLBACK_COLUMNS] if len(calls) == 1 else real(table)

        add_missing_columns(db, status.ConversionStatus)
        db.get_columns = stale_first  # type: ignore[method-assign]
        assert add_missing_columns(db, status.ConversionStatus) == []
        assert CALLBACK_COLUMNS <= columns(backend)
    finally:
        db.close()


def test_a_missing_column_that_needs_a_value_is_refused(fresh_backend: Backend) -> None:
    backend = fresh_backend
    backend.sql(OLD_TABLE[backend.kind].replace("`error_message` TEXT NOT NULL", "`x` TEXT")
                .replace('"error_message" TEXT NOT NULL', '"x" TEXT'))
    db = open_db(backend)
    try:
        with pytest.raises(Exception, match="lacks column\\(s\\) error_message"):
            add_missing_columns(db, status.ConversionStatus)
    finally:
        db.close()


def test_shipped_sql_creates_the_status_table_the_model_reads(fresh_backend: Backend) -> None:
    backend = fresh_backend
    sql = (ROOT / "config" / f"schema.{backend.kind}.sql").read_text()
    for statement in split_statements(sql):
        backend.sql(statement)
    assert columns(backend) == {f.column_name for f in status.ConversionStatus._meta.sorted_fields}
    db = open_db(backend)
    try:
        status.bind_status_database(db, create=False)
        status.record_submitted("r1", "h/app:v1", {"repository": "h/app"})
        status.record_callback("r1", "PENDING", 0)
        row = status.get_status("r1")
        assert row is not None and row["state"] == "PENDING" and row["callback"]["state"] == "PENDING"
    finally:
        db.close()
