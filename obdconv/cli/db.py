"""`obdconv db init --db-type mysql|sqlite --db-str DSN`: create or migrate the dedup schema.

Idempotent: creates whatever tables are missing (obdconv's and the reference convertor's
`overlaybd_layers`/`overlaybd_manifests`), leaves existing tables and rows intact, and records the
schema version. The same statements ship as config/schema.mysql.sql and config/schema.sqlite.sql for
DBAs who prefer to run them by hand. The DSN may come from $OBDCONV_DB_STR instead of the command
line, so the password stays out of `ps`.
"""

from __future__ import annotations

import argparse
import importlib
import os

DB_STR_ENV = "OBDCONV_DB_STR"
# Modules of other areas whose models live in the dedup database (`register_model`): imported so
# `db init` creates their tables too.
REGISTERING_MODULES = ("obdconv.status",)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("db", help="manage the dedup database", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    init = sub.add_parser("init", help="create or migrate the dedup schema (idempotent)", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    init.add_argument("--db-type", required=True, choices=["mysql", "sqlite"], help="database kind")
    init.add_argument("--db-str", default="",
                      help="mysql: user:pass@tcp(host:port)/db or mysql://user:pass@host:port/db; sqlite: file path "
                           f"(default: ${DB_STR_ENV})")
    init.set_defaults(func=run_init)


def run_init(args: argparse.Namespace) -> int:
    # Imported here so `obdconv --help` does not load peewee and pymysql.
    from obdconv.dedup.db import connect_database, database, parse_db_config
    from obdconv.dedup.schema import init_schema
    from obdconv.dedup.store import DB_ERRORS
    from obdconv.errors import DatabaseError

    for name in REGISTERING_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real import error inside the module: surface it
                raise
    config = parse_db_config(args.db_type, args.db_str or os.environ.get(DB_STR_ENV, ""))
    db = connect_database(config)
    database.initialize(db)
    try:
        db.connect()
        version = init_schema(db)
        tables = sorted(db.get_tables())
    except DB_ERRORS as e:
        raise DatabaseError(f"dedup database {config.describe()}: {type(e).__name__}: {e}") from e
    finally:
        if not db.is_closed():
            db.close()
    print(f"dedup schema version {version} ready in {config.describe()} (tables: {', '.join(tables)})")
    return 0
