"""Schema creation: idempotent, leaves an existing reference deployment intact, same via CLI and SQL files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from obdconv.dedup.store import REFERENCE_PROFILE, open_store
from tests.dedup import reference_sql as ref
from tests.dedup.conftest import Backend

REPO_ROOT = Path(__file__).resolve().parents[2]
OBDCONV_TABLES = {"obdconv_layers", "obdconv_manifests", "obdconv_claims", "obdconv_schema"}
REFERENCE_TABLES = {"overlaybd_layers", "overlaybd_manifests"}
CHAIN = "sha256:" + "1" * 64
DIGEST = "sha256:" + "2" * 64


def table_names(backend: Backend) -> set[str]:
    if backend.kind == "sqlite":
        rows = backend.sql("select name from sqlite_master where type = 'table'")
    else:
        rows = backend.sql("show tables")
    return {r[0] for r in rows}


# The real `obdconv` entry point (argument parsing, error-to-exit-code mapping) with only the `db`
# sub-command loaded, so this area's tests do not depend on every other sub-command importing cleanly.
CLI = ("import sys, obdconv.cli.main as m; m.COMMAND_MODULES = ['obdconv.cli.db']; "
       "sys.exit(m.main(sys.argv[1:]))")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CLI, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_db_init_twice_is_idempotent_and_keeps_rows(fresh_backend: Backend) -> None:
    backend = fresh_backend
    first = run_cli("db", "init", "--db-type", backend.kind, "--db-str", backend.db_str)
    assert first.returncode == 0, first.stderr
    assert OBDCONV_TABLES | REFERENCE_TABLES <= table_names(backend)
    backend.sql(ref.CREATE_LAYER, ("h:5000", "lib/a", CHAIN, DIGEST, 42))
    second = run_cli("db", "init", "--db-type", backend.kind, "--db-str", backend.db_str)
    assert second.returncode == 0, second.stderr
    assert backend.sql(ref.GET_LAYER_FOR_REPO, ("h:5000", "lib/a", CHAIN)) == [("h:5000", "lib/a", CHAIN, DIGEST, 42)]
    assert backend.sql("select value from obdconv_schema where name = 'version'") == [("1",)]
    # The password must not be echoed back.
    if backend.server is not None:
        assert backend.server.password not in first.stdout + first.stderr


def test_existing_reference_deployment_is_left_intact(mysql_backend: Backend) -> None:
    for ddl in ref.REFERENCE_DDL:
        mysql_backend.sql(ddl)
    mysql_backend.sql(ref.CREATE_LAYER, ("h:5000", "lib/a", CHAIN, DIGEST, 42))
    before = mysql_backend.sql("show create table overlaybd_layers")
    store = open_store("mysql", mysql_backend.db_str, required=True)  # creates obdconv's tables on open
    try:
        assert store.get_layer("h:5000", "lib/a", CHAIN, REFERENCE_PROFILE) is not None
    finally:
        store.close()
    assert mysql_backend.sql("show create table overlaybd_layers") == before
    assert OBDCONV_TABLES <= table_names(mysql_backend)


def test_db_str_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "env.sqlite"
    result = run_cli("db", "init", "--db-type", "sqlite", env={"OBDCONV_DB_STR": str(path)})
    assert result.returncode == 0, result.stderr
    assert path.exists()


def test_db_init_unreachable_fails_with_database_exit_code(tmp_path: Path) -> None:
    from tests.services.base import free_port

    result = run_cli("db", "init", "--db-type", "mysql", "--db-str", f"u:s3cr@t@tcp(127.0.0.1:{free_port()})/x?timeout=2s")
    assert result.returncode == 75
    assert "dedup database" in result.stderr and "s3cr@t" not in result.stderr


def test_shipped_sql_files_create_the_schema_the_store_uses(fresh_backend: Backend) -> None:
    backend = fresh_backend
    sql_file = REPO_ROOT / "config" / f"schema.{backend.kind}.sql"
    from obdconv.dedup.schema import split_statements

    conn = backend.connect()
    try:
        cur = conn.cursor()
        for statement in split_statements(sql_file.read_text()):
            cur.execute(statement)
        cur.close()
    finally:
        conn.close()
    store = open_store(backend.kind, backend.db_str, required=True, create_schema=False)
    try:
        store.record_layer("h:5000", "lib/a", CHAIN, REFERENCE_PROFILE, DIGEST, 7)
        got = store.get_layer("h:5000", "lib/a", CHAIN, REFERENCE_PROFILE)
        assert got is not None and (got.data_digest, got.data_size) == (DIGEST, 7)
    finally:
        store.close()


def test_registered_models_get_their_tables(fresh_backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    import peewee

    from obdconv.dedup import db as dedup_db

    monkeypatch.setattr(dedup_db, "_extra_models", [])  # keep this test's model out of other tests

    @dedup_db.register_model
    class FleetNote(peewee.Model):
        note = peewee.CharField(max_length=64, primary_key=True)

        class Meta:
            database = dedup_db.database
            table_name = "test_fleet_notes"

    store = open_store(fresh_backend.kind, fresh_backend.db_str, required=True)
    try:
        FleetNote.create(note="hello")
        assert [n.note for n in FleetNote.select()] == ["hello"]
    finally:
        store.close()
    assert "test_fleet_notes" in table_names(fresh_backend)
