"""Workers recording the same rows at once (retried tasks, two images sharing layers): no duplicates,
no errors, and the store stays available (lock contention is retried, not taken for an outage)."""

from __future__ import annotations

import threading

import peewee

from obdconv.dedup.store import REFERENCE_PROFILE, DedupStore, is_transient
from tests.dedup import reference_sql as ref
from tests.dedup.conftest import Backend

HOST = "registry.test:5000"


def test_lock_errors_are_transient_outages_are_not() -> None:
    assert is_transient(peewee.OperationalError(1213, "Deadlock found when trying to get lock"))
    assert is_transient(peewee.OperationalError(1205, "Lock wait timeout exceeded"))
    assert is_transient(peewee.OperationalError("database is locked"))
    assert not is_transient(peewee.OperationalError(2003, "Can't connect to MySQL server"))
    assert not is_transient(peewee.OperationalError("unable to open database file"))


def test_many_threads_recording_the_same_rows(store: DedupStore, backend: Backend) -> None:
    chains = [f"sha256:{i:064x}" for i in range(20)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def writer() -> None:
        try:
            barrier.wait()
            for i, chain in enumerate(chains):
                store.record_layer(HOST, "lib/a", chain, REFERENCE_PROFILE, f"sha256:{i + 1000:064x}", i)
        except BaseException as e:  # any failure is the test's failure
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert store.available
    assert backend.sql("select count(*) from obdconv_layers") == [(20,)]
    assert backend.sql("select count(*) from overlaybd_layers") == [(20,)]
    for i, chain in enumerate(chains):
        assert backend.sql(ref.GET_LAYER_FOR_REPO, (HOST, "lib/a", chain)) == [
            (HOST, "lib/a", chain, f"sha256:{i + 1000:064x}", i)]
