"""Create or migrate the dedup schema from the shipped SQL files (config/schema.<dialect>.sql).

Idempotent: every statement is `CREATE ... IF NOT EXISTS` / `INSERT IGNORE`, so running it against an
existing reference deployment adds obdconv's tables and leaves `overlaybd_layers`/`overlaybd_manifests`
and their rows untouched. `obdconv_schema.version` records the applied version; a database written by
a newer obdconv is refused rather than silently mis-read.

Nullable columns added to a `register_model`ed table later (e.g. the status table's callback columns)
are added in place to tables an older obdconv created (`add_missing_columns`), without a version bump:
older workers ignore columns they do not know, so a rolling upgrade keeps working.
"""

from __future__ import annotations

import contextlib
import importlib.resources
from pathlib import Path

import peewee
from playhouse.migrate import SchemaMigrator, migrate

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
    """Tables of models other areas `register_model`ed (e.g. the fleet's status records), and their
    nullable columns missing from an existing table; idempotent."""
    extra = registered_models()
    if extra:
        db.create_tables(extra, safe=True)
        for model in extra:
            add_missing_columns(db, model)


def add_missing_columns(db: peewee.Database, model: type[peewee.Model]) -> list[str]:
    """ALTER TABLE ... ADD COLUMN for each NULLABLE field of `model` its table lacks; returns the
    names added. A column that is not nullable is never added here (existing rows would need a value):
    that change needs a schema version. Safe when several processes start at once: a column another
    process added in between is not an error. On MySQL 8 / MariaDB >= 10.3 adding a NULL column is
    an instant, metadata-only change, also on a big table."""
    table = model._meta.table_name
    existing = {c.name for c in db.get_columns(table)}
    missing = [f for f in model._meta.sorted_fields if f.column_name not in existing]
    not_nullable = [f.column_name for f in missing if not f.null]
    if not_nullable:
        raise DatabaseError(f"table {table} lacks column(s) {', '.join(not_nullable)} that cannot be added "
                            "in place; migrate it with `obdconv db init` of a matching version")
    migrator = SchemaMigrator.from_database(db)
    added = []
    for field in missing:
        try:
            migrate(migrator.add_column(table, field.column_name, field))
        except (peewee.OperationalError, peewee.ProgrammingError, peewee.InternalError):
            # Most likely another process added it a moment ago; anything else is an error.
            if field.column_name not in {c.name for c in db.get_columns(table)}:
                raise
            continue
        added.append(field.column_name)
    return added

