"""A dedup database that is unreachable, or dies mid-run, degrades to "no dedup" with one warning —
unless the database is required (`--db-required`), then every failure is a DatabaseError."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import pytest

from obdconv.dedup.store import REFERENCE_PROFILE, DedupStore, open_store
from obdconv.errors import DatabaseError
from tests.services.base import free_port
from tests.services.mariadb import TEST_PASSWORD, start_mariadb

HOST = "registry.test:5000"
CHAIN = "sha256:" + "c" * 64
DIGEST = "sha256:" + "d" * 64


def dead_dsn() -> str:
    return f"obdconv:{TEST_PASSWORD}@tcp(127.0.0.1:{free_port()})/conversioncache?timeout=2s"


def warnings_about_unreachable(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "dedup database unreachable" in r.getMessage()]


@pytest.mark.parametrize("db", ["mysql", "sqlite"])
def test_unreachable_database_degrades_with_one_warning(db: str, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    db_str = dead_dsn() if db == "mysql" else str(tmp_path / "no-such-dir" / "dedup.sqlite")
    store = open_store(db, db_str, required=False)
    assert store.enabled and not store.available
    assert store.get_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE) is None
    assert store.layers_on_host(HOST, CHAIN, REFERENCE_PROFILE) == []
    store.record_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE, DIGEST, 1)  # no-op, no exception
    assert store.claim("k", "me", ttl=5)  # nobody to coordinate with: go ahead
    messages = warnings_about_unreachable(caplog)
    assert len(messages) == 1 and "converting without dedup" in messages[0]
    assert TEST_PASSWORD not in caplog.text and TEST_PASSWORD not in repr(store)


def test_required_database_unreachable_raises(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(DatabaseError) as info:
        open_store("mysql", dead_dsn(), required=True)
    assert "127.0.0.1" in str(info.value) and TEST_PASSWORD not in str(info.value)
    assert info.value.exit_code == 75


def test_connection_loss_mid_run_degrades_then_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    server = start_mariadb(tmp_path / "db", durable=True)  # committed rows survive the SIGKILL
    try:
        store = open_store("mysql", server.dsn_go, required=False, retry_after=0.2)
        store.record_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE, DIGEST, 1)
        assert store.get_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE) is not None

        server.process.kill(signal.SIGKILL)
        server.process.proc.wait(10)  # type: ignore[union-attr]
        assert store.get_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE) is None  # degraded, no crash
        assert not store.available
        store.record_layer(HOST, "lib/b", CHAIN, REFERENCE_PROFILE, DIGEST, 1)
        assert store.get_manifest(HOST, "lib/a", DIGEST, "application/json", REFERENCE_PROFILE) is None
        assert len(warnings_about_unreachable(caplog)) == 1

        # The same loss with --db-required is an error, not a silent miss.
        strict = DedupStore(store.config, store._db, required=True)
        with pytest.raises(DatabaseError):
            strict.get_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE)

        server.process.start()  # same datadir and port: the database comes back
        time.sleep(0.3)
        got = store.get_layer(HOST, "lib/a", CHAIN, REFERENCE_PROFILE)
        assert got is not None and got.data_digest == DIGEST
        assert store.available
        assert "reachable again" in caplog.text
        store.close()
    finally:
        server.process.stop()
