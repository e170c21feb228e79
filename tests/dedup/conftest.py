"""Fixtures for the dedup tests: every store test runs against SQLite AND a real MariaDB."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from obdconv.dedup.store import DedupStore, open_store

# `mariadb` and `registry` are session fixtures of the plugins loaded by tests/conftest.py.
from tests.services.mariadb import MariaDB


@dataclass
class Backend:
    """One empty dedup database, plus a plain DB-API connection for literal (reference) SQL."""

    kind: str  # "sqlite" or "mysql"
    db_str: str
    server: MariaDB | None = None
    database: str = ""
    path: Path | None = None

    def connect(self) -> Any:
        if self.kind == "sqlite":
            return sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
        assert self.server is not None
        return self.server.connect(self.database)

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement written with go-sql-driver `?` placeholders; returns the rows."""
        if self.kind == "mysql":
            statement = statement.replace("?", "%s")
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(statement, params)
            rows = list(cur.fetchall()) if cur.description else []
            cur.close()
            return rows
        finally:
            conn.close()


def make_backend(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    if kind == "sqlite":
        path = tmp_path / "dedup.sqlite"
        return Backend("sqlite", str(path), path=path)
    server: MariaDB = request.getfixturevalue("mariadb")
    name = server.create_database(f"dedup_{uuid.uuid4().hex[:12]}")
    return Backend("mysql", server.dsn_go_for(name), server=server, database=name)


DEDUP_TABLES = ("overlaybd_layers", "overlaybd_manifests", "obdconv_layers", "obdconv_manifests", "obdconv_claims")


@pytest.fixture(scope="session")
def shared_mysql_database(request: pytest.FixtureRequest) -> str:
    """One MariaDB database with the schema, emptied before each test that uses it: creating InnoDB
    tables costs ~0.5 s, deleting a few rows nothing."""
    server: MariaDB = request.getfixturevalue("mariadb")
    name = server.create_database("dedup_shared")
    open_store("mysql", server.dsn_go_for(name), required=True).close()
    return name


@pytest.fixture(params=["sqlite", "mysql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """An empty dedup database (schema present for mysql, created on open for sqlite)."""
    if request.param == "sqlite":
        return make_backend("sqlite", tmp_path, request)
    server: MariaDB = request.getfixturevalue("mariadb")
    name = request.getfixturevalue("shared_mysql_database")
    b = Backend("mysql", server.dsn_go_for(name), server=server, database=name)
    for table in DEDUP_TABLES:
        b.sql(f"DELETE FROM {table}")
    return b


@pytest.fixture(params=["sqlite", "mysql"])
def fresh_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A brand-new empty database with no tables at all."""
    b = make_backend(request.param, tmp_path, request)
    yield b
    if b.server is not None:
        with b.server.connect() as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{b.database}`")


@pytest.fixture
def mysql_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return make_backend("mysql", tmp_path, request)


@pytest.fixture
def store(backend: Backend) -> Iterator[DedupStore]:
    s = open_store(backend.kind, backend.db_str, required=True)
    yield s
    s.close()

