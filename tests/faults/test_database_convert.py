"""Database faults outside the fleet: `obdconv convert --db-type mysql` with MariaDB down, and the
status table's writes after the server dropped the connection a process keeps open."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from obdconv.errors import DatabaseError
from obdconv.status import ConversionStatus, get_status, open_status_database, record_running, status_database
from tests.faults.conftest import root_digest, run_cli
from tests.fleet.conftest import push_layout
from tests.services.base import free_port
from tests.services.mariadb import TEST_PASSWORD, MariaDB
from tests.services.registry import RegistryService
from workers.sample_image import build_sample_image

pytestmark = [pytest.mark.services]


@pytest.fixture(scope="module")
def source(registry: RegistryService, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = tmp_path_factory.mktemp("db-src") / "layout"
    build_sample_image(layout, "img", layers=2, file_bytes=64 << 10, seed=63)
    push_layout(layout, "img", f"{registry.host}/faults/db-convert:src")
    return f"{registry.host}/faults/db-convert"


def down_dsn() -> str:
    """MariaDB is down: nothing listens where the DSN points."""
    return f"obdconv:{TEST_PASSWORD}@tcp(127.0.0.1:{free_port()})/conversioncache"


def test_convert_with_the_database_down_degrades_with_a_warning(source: str, tmp_path: Path) -> None:
    """Documented degrade (obdconv/dedup/store.py): one warning on stderr, then the conversion
    without dedup. (A process of its own: the warning is what a user's terminal shows.)"""
    proc = subprocess.run([sys.executable, "-m", "obdconv", "convert", "-r", source, "-i", "src", "--overlaybd",
                           "obd", "--plain", "--json", "--workers", "1", "-d", str(tmp_path / "work"),
                           "--db-type", "mysql", "--db-str", down_dsn()],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert root_digest(json.loads(proc.stdout)).startswith("sha256:")
    assert proc.stderr.count("dedup database unreachable") == 1, proc.stderr
    assert "converting without dedup" in proc.stderr and TEST_PASSWORD not in proc.stderr


def test_convert_with_the_database_down_and_required_fails_clearly(source: str, tmp_path: Path) -> None:
    dsn = down_dsn()
    code, _, err = run_cli("convert", "-r", source, "-i", "src", "--overlaybd", "obd-required", "--plain",
                           "--workers", "1", "-d", str(tmp_path / "work"), "--db-type", "mysql", "--db-str", dsn,
                           "--db-required")
    assert code == DatabaseError.exit_code == 75, err
    port = dsn.split("127.0.0.1:")[1].split(")")[0]
    assert f"dedup database mysql://obdconv@127.0.0.1:{port}/conversioncache unreachable" in err, err
    assert TEST_PASSWORD not in err


@pytest.fixture
def status_db(mariadb: MariaDB) -> Iterator[MariaDB]:
    open_status_database("mysql", mariadb.dsn_go_for(mariadb.create_database("faults_status")))
    try:
        yield mariadb
    finally:
        status_database.close()


def test_status_write_after_the_server_dropped_the_connection(status_db: MariaDB) -> None:
    """A worker keeps its database connection open (the dedup store binds the same one); when the
    server drops it (restart, kill, idle timeout) the next status write reconnects. Before the fix
    peewee's connection context failed with IndexError there, which no task retries."""
    status_database.connect(reuse_if_open=True)
    [(connection_id,)] = status_database.execute_sql("SELECT CONNECTION_ID()").fetchall()
    with status_db.connect() as admin, admin.cursor() as cur:
        cur.execute(f"KILL {int(connection_id)}")
    record_running("dropped-1", "prepare")
    assert get_status("dropped-1")["stage"] == "prepare"  # type: ignore[index]
    assert ConversionStatus.select().where(ConversionStatus.request_id == "dropped-1").count() == 1
