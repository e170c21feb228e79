"""Create or migrate the dedup schema from the shipped SQL files (config/schema.<dialect>.sql).

Idempotent: every statement is `CREATE ... IF NOT EXISTS` / `INSERT IGNORE`, so running it against an
existing reference deployment adds obdconv's tables and leaves `overlaybd_layers`/`overlaybd_manifests`
and their rows untouched. `obdconv_schema.version` records the applied version; a database written by
a newer obdconv is refused rather than silently mis-read.
"""

from __future__ import annotations

import contextlib
import importlib.resources
from pathlib import Path

import peewee

from obdconv.dedup.db import dialect, registered_models
from obdconv.dedup.models import SchemaInfo
from obdconv.errors import DatabaseError

SCHEMA_VERSION = 1


def schema_sql_path(dialect_name: str) -> Path:
    """The shipped SQL file: `config/` sits beside `obdconv/` both in the checkout and when installed."""
    name = f"schema.{dialect_name}.sql"
    beside = Path(__file__).resolve().parents[2] / "config" / name
    if beside.is_file():
        return beside
    return Path(str(importlib.resources.files("config").joinpath(name)))


def split_statements(sql: str) -> list[str]:
    """Statements of a schema file: `--` comment lines dropped, split at lines ending in ';'."""
    statements: list[str] = []
    current: list[str] = []
    for line in sql.splitlines():
        if line.strip().startswith("--") or not line.strip():
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(current).rstrip().removesuffix(";"))
            current = []
    if current:
        statements.append("\n".join(current))
    return statements


def schema_version(db: peewee.Database) -> int | None:
    """The applied schema version, or None when obdconv's tables do not exist yet."""
    if not db.table_exists(SchemaInfo._meta.table_name):
        return None
    # Raw SQL rather than the model: `db` need not be the database the model proxy points at.
    row = db.execute_sql("SELECT value FROM obdconv_schema WHERE name = 'version'").fetchone()
    return int(row[0]) if row is not None else None


def init_schema(db: peewee.Database) -> int:
    """Create missing tables (ours, the reference's, and `register_model`ed ones); returns the version."""
    current = schema_version(db)
    if current is not None and current > SCHEMA_VERSION:
        raise DatabaseError(
            f"dedup database schema version {current} is newer than this obdconv supports ({SCHEMA_VERSION})"
        )
    if current != SCHEMA_VERSION:
        sql = schema_sql_path(dialect(db)).read_text()
        # SQLite: one transaction, so a crash leaves no half schema. MySQL DDL commits implicitly,
        # so a transaction there would only mislead.
        with db.atomic() if dialect(db) == "sqlite" else contextlib.nullcontext():
            for statement in split_statements(sql):
                db.execute_sql(statement)
        # Future migrations from `current` to SCHEMA_VERSION go here, one step per version.
    create_registered_tables(db)
    return SCHEMA_VERSION


def create_registered_tables(db: peewee.Database) -> None:
    """Tables of models other areas `register_model`ed (e.g. the fleet's status records); idempotent."""
    extra = registered_models()
    if extra:
        db.create_tables(extra, safe=True)

