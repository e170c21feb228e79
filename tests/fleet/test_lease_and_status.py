"""Broker leases and orphan rescue against a real Redis; the durable status record on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

from obdconv.status import (
    ConversionStatus,
    get_status,
    open_status_database,
    record_failure,
    record_running,
    record_submitted,
    record_success,
)
from tasks.canvas import lanes
from tests.services.redis import RedisServer
from workers.lease import (
    RESCUE_LOCK_KEY,
    UNACKED_INDEX_KEY,
    LeaseKeeper,
    alive_key,
    is_worker_alive,
    renew_leases,
    rescue_orphaned_queues,
)

pytestmark = pytest.mark.services


@pytest.fixture
def client(redis_server: RedisServer):  # type: ignore[no-untyped-def]
    c = redis_server.client(9)
    c.flushdb()
    yield c
    c.flushdb()


def test_renew_only_touches_held_unacked_messages(client) -> None:  # type: ignore[no-untyped-def]
    client.zadd(UNACKED_INDEX_KEY, {"held": 100.0, "other": 100.0})
    assert renew_leases(client, ["held", "gone"], now=5000.0) == 1
    assert client.zscore(UNACKED_INDEX_KEY, "held") == 5000.0
    assert client.zscore(UNACKED_INDEX_KEY, "other") == 100.0
    assert client.zscore(UNACKED_INDEX_KEY, "gone") is None  # acked meanwhile: not resurrected


def test_rescue_moves_only_dead_workers_queues(client) -> None:  # type: ignore[no-untyped-def]
    client.set(alive_key("live@h"), "1", ex=30)
    client.lpush("worker.live@h", "m-live")
    client.lpush("worker.dead@h", "m1", "m2")
    assert is_worker_alive(client, "live@h") and not is_worker_alive(client, "dead@h")
    assert rescue_orphaned_queues(client) == 2
    assert client.llen("worker.dead@h") == 0
    assert client.lrange("worker.live@h", 0, -1) == [b"m-live"]
    # FIFO kept: m1 was pushed first, so it is consumed (popped from the right) first.
    assert client.lrange("assemble", 0, -1) == [b"m2", b"m1"]


def test_one_worker_per_period_scans_for_orphans(redis_server: RedisServer, client) -> None:  # type: ignore[no-untyped-def]
    """The rescue scan visits the whole keyspace: N workers scanning it every period would cost
    Redis O(N^2). Every keeper ticks (liveness, leases), one of them scans."""
    client.lpush("worker.dead@h", "m1")
    keepers = [LeaseKeeper(redis_server.url(9), f"w{i}@h", 30, list) for i in range(5)]
    scans_before = client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
    for keeper in keepers:
        keeper.tick()
    assert client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0) - scans_before == 1
    assert client.lrange("assemble", 0, -1) == [b"m1"]
    assert all(is_worker_alive(client, f"w{i}@h") for i in range(5))
    assert 0 < client.pttl(RESCUE_LOCK_KEY) <= 10_000  # the next period, someone scans again


def test_status_record_lifecycle(tmp_path: Path) -> None:
    open_status_database("sqlite", str(tmp_path / "status.sqlite"))
    record_submitted("r1", "reg/app:v1", {"repository": "reg/app"})
    assert get_status("r1")["state"] == "PENDING"
    record_running("r1", "prepare")
    s = get_status("r1")
    assert (s["state"], s["stage"]) == ("RUNNING", "prepare") and s["started_at"] is not None
    record_success("r1", {"native": {"digest": "sha256:ab"}})
    record_running("r1", "prepare")  # a late redelivered task cannot reopen a finished request
    record_submitted("r1", "reg/app:v1", {})  # nor can a re-submit with the same id
    s = get_status("r1")
    assert s["state"] == "SUCCESS" and s["outputs"] == {"native": {"digest": "sha256:ab"}}
    assert ConversionStatus.select().where(ConversionStatus.request_id == "r1").count() == 1

    record_failure("r2", "NetworkError", "registry down")
    record_failure("r2", "ChordError", "dependency failed")  # a consequence, not the cause
    assert get_status("r2")["error"] == {"class": "NetworkError", "message": "registry down"}
    assert get_status("missing") is None


def test_failure_message_quoting_huge_input_is_bounded(tmp_path: Path) -> None:
    """A message quoting a 100 KB tar path would not fit MySQL's TEXT (the write would fail and
    the cause be lost): it is stored cut, saying how much was cut."""
    open_status_database("sqlite", str(tmp_path / "status.sqlite"))
    message = "entry 0 '" + "a" * 100_000 + "': a name is longer than 255 bytes"
    record_failure("r3", "BadInputError", message)
    stored = get_status("r3")["error"]["message"]
    assert stored.startswith("entry 0 'aaaa") and len(stored.encode()) < 65535 // 4
    assert stored.endswith(f"... ({len(message) - len(stored.partition('...')[0])} more characters)")


@pytest.mark.parametrize("items, limit, expected", [
    (list(range(5)), 2, [[0, 2, 4], [1, 3]]),
    (list(range(3)), 0, [[0], [1], [2]]),
    (list(range(3)), -1, [[0], [1], [2]]),
    (list(range(2)), 8, [[0], [1]]),
    ([7], 1, [[7]]),
])
def test_lanes_bound_concurrency(items: list[int], limit: int, expected: list[list[int]]) -> None:
    assert lanes(items, limit) == expected


def test_sample_image_is_deterministic_and_shares_base_layers(tmp_path: Path) -> None:
    import json

    from workers.sample_image import build_sample_image

    a = build_sample_image(tmp_path / "a", layers=3, seed=5, shared_layers=2)
    b = build_sample_image(tmp_path / "b", layers=3, seed=5, shared_layers=2)
    c = build_sample_image(tmp_path / "c", layers=3, seed=6, shared_layers=2)
    assert a == b and a != c

    def layers(root: Path, digest: str) -> list[str]:
        doc = json.loads((root / "blobs" / "sha256" / digest.split(":")[1]).read_text())
        return [x["digest"] for x in doc["layers"]]

    la, lc = layers(tmp_path / "a", a), layers(tmp_path / "c", c)
    assert la[:2] == lc[:2] and la[2] != lc[2]
