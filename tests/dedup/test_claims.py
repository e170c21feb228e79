"""Claims (leases): exactly one winner among racing threads and processes, expiry and takeover,
heartbeats, and waiting for a holder's result — on SQLite and a real MariaDB."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from obdconv.dedup.claims import ClaimTimeoutError, layer_claim_key, manifest_claim_key
from obdconv.dedup.store import REFERENCE_PROFILE, DedupStore
from obdconv.request import ConversionProfile
from tests.dedup.conftest import Backend

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY = layer_claim_key("registry.test:5000", "sha256:" + "a" * 64, REFERENCE_PROFILE)


def test_claim_keys_separate_hosts_profiles_and_stay_short() -> None:
    chain = "sha256:" + "a" * 64
    keys = {layer_claim_key("h1:5000", chain, REFERENCE_PROFILE), layer_claim_key("h2:5000", chain, REFERENCE_PROFILE),
            layer_claim_key("h1:5000", chain, ConversionProfile("turbo")),
            manifest_claim_key("h1:5000", "lib/a", chain, "application/vnd.oci.image.manifest.v1+json", "p")}
    assert len(keys) == 4
    long_key = layer_claim_key("h" * 300, chain, REFERENCE_PROFILE)
    assert len(long_key) <= 255 and long_key != layer_claim_key("g" * 300, chain, REFERENCE_PROFILE)


def test_threads_racing_exactly_one_wins(store: DedupStore) -> None:
    n = 8
    barrier = threading.Barrier(n)
    results: dict[str, bool] = {}

    def racer(owner: str) -> None:
        store.holder(KEY)  # open this thread's connection before the start line
        barrier.wait()
        results[owner] = store.claim(KEY, owner, ttl=30)

    threads = [threading.Thread(target=racer, args=(f"worker-{i}",)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == n
    winners = [o for o, won in results.items() if won]
    assert len(winners) == 1
    holder = store.holder(KEY)
    assert holder is not None and holder.owner == winners[0] and holder.seconds_left > 20


def test_processes_racing_exactly_one_wins(backend: Backend, store: DedupStore) -> None:
    start_at = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-m", "tests.dedup.claim_worker", backend.kind, backend.db_str, KEY,
                               f"proc-{i}", str(start_at)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            outputs.append(out.strip())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(outputs) == ["LOST", "LOST", "LOST", "WON"]
    holder = store.holder(KEY)
    assert holder is not None and holder.owner == f"proc-{outputs.index('WON')}"


def test_expired_lease_is_taken_over_and_old_owner_loses_it(store: DedupStore) -> None:
    assert store.claim(KEY, "dead-worker", ttl=0.3)
    assert not store.claim(KEY, "other", ttl=30)  # still held
    time.sleep(0.5)
    assert store.claim(KEY, "other", ttl=30)
    assert not store.heartbeat(KEY, "dead-worker", ttl=30)  # it knows it lost the lease
    store.release(KEY, "dead-worker")  # a late release by the old owner must not free it
    holder = store.holder(KEY)
    assert holder is not None and holder.owner == "other"


def test_claim_again_by_the_same_owner_renews(store: DedupStore) -> None:
    assert store.claim(KEY, "me", ttl=1)
    assert store.claim(KEY, "me", ttl=30)
    holder = store.holder(KEY)
    assert holder is not None and holder.seconds_left > 20


def test_lease_heartbeat_keeps_it_past_the_ttl_and_release_frees_it(store: DedupStore) -> None:
    lease = store.acquire(KEY, "holder", ttl=0.6)
    assert lease is not None
    with lease:
        time.sleep(1.5)  # well past the ttl: only heartbeats keep it
        assert not store.claim(KEY, "intruder", ttl=30)
        holder = store.holder(KEY)
        assert holder is not None and holder.owner == "holder" and holder.seconds_left > 0
        assert not lease.lost.is_set()
    assert store.holder(KEY) is None
    assert store.claim(KEY, "intruder", ttl=30)


def test_lease_notices_takeover(store: DedupStore) -> None:
    lease = store.acquire(KEY, "slow", ttl=0.3)
    assert lease is not None
    # Simulate a holder presumed dead: another worker takes the (expired) lease before the heartbeat.
    time.sleep(0.4)
    assert store.claim(KEY, "fast", ttl=30)
    lease.interval = 0.05
    with lease:
        assert lease.lost.wait(5)
    holder = store.holder(KEY)
    assert holder is not None and holder.owner == "fast"  # release by the loser did not free it


def test_wait_for_returns_the_holders_result_without_converting(store: DedupStore) -> None:
    result: dict[str, str] = {}
    first = store.wait_for(KEY, "first", lambda: result.get("digest"), timeout=5, ttl=30)
    assert first.result is None and first.lease is not None

    def holder_finishes() -> None:
        with first.lease:  # type: ignore[union-attr]
            time.sleep(0.8)
            result["digest"] = "sha256:" + "d" * 64  # the result row appears before release

    t = threading.Thread(target=holder_finishes)
    t.start()
    started = time.monotonic()
    second = store.wait_for(KEY, "second", lambda: result.get("digest"), timeout=10, ttl=30, poll_interval=0.05)
    waited = time.monotonic() - started
    t.join()
    assert second.lease is None and second.result == "sha256:" + "d" * 64
    assert waited >= 0.5  # it really waited for the holder
    assert store.holder(KEY) is None


def test_wait_for_takes_over_a_dead_holders_lease(store: DedupStore) -> None:
    assert store.claim(KEY, "crashed", ttl=0.5)  # never heartbeats, never releases
    started = time.monotonic()
    outcome = store.wait_for(KEY, "survivor", lambda: None, timeout=10, ttl=30, poll_interval=0.05)
    assert outcome.result is None and outcome.lease is not None
    assert time.monotonic() - started >= 0.3
    holder = store.holder(KEY)
    assert holder is not None and holder.owner == "survivor"
    outcome.lease.release()


def test_wait_for_times_out_while_a_live_holder_works(store: DedupStore) -> None:
    assert store.claim(KEY, "busy", ttl=30)
    with pytest.raises(ClaimTimeoutError):
        store.wait_for(KEY, "impatient", lambda: None, timeout=0.3, ttl=30, poll_interval=0.05)


def test_database_clock_decides_expiry(store: DedupStore, backend: Backend) -> None:
    # Expiry is computed by the database: a lease written with a (database) time in the past is
    # expired whatever this machine's clock says.
    assert store.claim(KEY, "a", ttl=30)
    past = "2000-01-01 00:00:00.000"
    backend.sql("update obdconv_claims set expires_at = ? where owner = ?", (past, "a"))
    assert store.claim(KEY, "b", ttl=30)


def test_heartbeat_many_extends_only_our_live_claims_in_one_statement(store: DedupStore) -> None:
    keys = [layer_claim_key("registry.test:5000", f"sha256:{c * 64}", REFERENCE_PROFILE) for c in "bcde"]
    for key in keys[:3]:
        assert store.claim(key, "me", ttl=1)
    assert store.claim(keys[3], "someone-else", ttl=30)
    assert store.heartbeat_many(keys, "me", ttl=60) == 3  # the fourth is not ours
    for key in keys[:3]:
        holder = store.holder(key)
        assert holder is not None and holder.owner == "me" and holder.seconds_left > 50
    assert store.holder(keys[3]).owner == "someone-else"  # type: ignore[union-attr]
    store.release(keys[0], "me")
    assert store.heartbeat_many(keys, "me", ttl=60) == 2
    assert store.heartbeat_many([], "me", ttl=60) == 0
