"""The fleet under faults, with real processes on 127.0.0.1 (tests/faults/fleet.py): registry faults,
a worker SIGKILLed in every stage, MariaDB down and killed, Redis restarted, a full spool.

One fleet serves the module (starting it dominates the cost); requests of one test run at the same
time where they can. Every request that should survive must end as an undisturbed run would: the
same digest, one status row saying SUCCESS, the tag never pointing anywhere else, one dedup row per
layer, nothing referencing a missing blob (`FaultFleet.assert_converted_once`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from config.settings import load_settings
from obdconv.client import submit
from obdconv.errors import DatabaseError
from obdconv.pipeline.prepare import spool_key
from tasks.stages import HOLDER_PREFIX
from tests.faults import storage
from tests.faults.fleet import FaultFleet, fault_fleet
from tests.fleet.conftest import Fleet, wait_until
from tests.services.fault_proxy import FaultProxy
from tests.services.mariadb import MariaDB
from tests.services.redis import RedisServer
from tests.services.registry import RegistryService
from workers.app import create_app
from workers.queues import SHARED_QUEUES

pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.timeout(600)]

PART = 64 << 10
SMALL = {"layers": 2, "file_bytes": 128 << 10}


@pytest.fixture(scope="module")
def ff(registry: RegistryService, proxy: FaultProxy, mariadb: MariaDB,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultFleet]:
    with fault_fleet(tmp_path_factory.mktemp("fault-fleet"), registry, proxy, mariadb) as fleet:
        yield fleet


@pytest.fixture(autouse=True)
def _no_rules_left(proxy: FaultProxy) -> Iterator[None]:
    proxy.clear()
    yield
    proxy.clear()


def failure_row(ff: FaultFleet, request_id: str) -> list[tuple[Any, ...]]:
    """The status rows once the failure is recorded: Celery stores a task's FAILURE before it runs
    the task's `on_failure`, which writes the row, so the row may lag the state `wait` saw."""
    return wait_until(lambda: [r for r in ff.status_rows(request_id) if r[0] == "FAILURE"] or None, 30,
                      f"the FAILURE row of {request_id}")


def test_registry_faults(ff: FaultFleet) -> None:
    """Transient faults in different stages of four requests at once are retried (by the registry
    client, else by the task's retries) and change nothing; a registry that keeps failing one blob
    fails its request with NetworkError naming the registry and the request, and pushes nothing."""
    for seed, name in enumerate(("reg-patch", "reg-resetdl", "reg-429", "reg-slow", "reg-down"), start=70):
        ff.image(name, seed=seed, **SMALL)
    p = ff.proxy
    rules = [
        p.add("status", "/faults/reg-patch/blobs/uploads/.", method="PATCH", times=1, status=503),
        p.add("reset_response_after", f"/faults/reg-resetdl/blobs/{ff.layers('reg-resetdl')[1]}$", method="GET",
              times=1, bytes=PART),
        p.add("status", "/faults/reg-429/manifests/src$", method="GET", times=2, status=429, retry_after=1),
        # A slow registry: late answers, a slow body (the read timeout's own retry is tested with
        # `obdconv convert`: the workers' timeout is 60 s).
        p.add("delay", "/faults/reg-slow/manifests/src$", method="GET", times=1, seconds=3),
        p.add("throttle", f"/faults/reg-slow/blobs/{ff.layers('reg-slow')[0]}$", method="GET", rate=256 << 10),
    ]
    # Down for maintenance, "come back in 30 s": beyond the client's budget, so each of the task's
    # retries fails at once; the request fails when they are spent.
    down = p.add("status", f"/faults/reg-down/blobs/{ff.layers('reg-down')[1]}$", method="GET", status=503,
                 retry_after=30)
    started = time.monotonic()
    ids = {name: ff.fleet.submit(ff.request(name)) for name in ("reg-patch", "reg-resetdl", "reg-429", "reg-slow",
                                                                   "reg-down")}
    finals = {name: ff.fleet.wait(rid, timeout=120) for name, rid in ids.items()}
    for rule in rules:
        assert p.hits(rule) >= 1, p.log()
    for name in ("reg-patch", "reg-resetdl", "reg-429", "reg-slow"):
        ff.assert_converted_once(name, ids[name], finals[name])

    failed = finals["reg-down"]
    assert failed["state"] == "FAILURE", failed
    [(state, _, error_class, message, _)] = failure_row(ff, ids["reg-down"])
    assert (state, error_class) == ("FAILURE", "NetworkError")
    assert f"registry {p.host}" in message and f"GET /v2/faults/reg-down/blobs/{ff.layers('reg-down')[1]}" in message
    assert storage.tag_target(ff.registry, "faults/reg-down", "obd") is None
    assert ff.dedup_rows("reg-down")[1] == []
    # retry_max (5) task retries: bounded, not minutes.
    assert p.hits(down) == 6 and time.monotonic() - started < 90


@contextlib.contextmanager
def consuming_only_private(fleet: Fleet, worker: str) -> Iterator[None]:
    """`worker` takes no task from the shared queues inside (its private queue stays)."""
    node = [f"{worker}@fleettest"]
    for queue in SHARED_QUEUES:
        fleet.app.control.cancel_consumer(queue, destination=node, reply=True, timeout=10)
    # A BRPOP already waiting when the consumer was cancelled still lists the queues until it
    # times out (kombu's brpop_timeout, 1 s).
    time.sleep(2.5)
    try:
        yield
    finally:
        for queue in SHARED_QUEUES:
            fleet.app.control.add_consumer(queue, destination=node, reply=True, timeout=10)


def test_worker_killed_in_every_stage(ff: FaultFleet) -> None:
    """Five requests, each held by the proxy in a different stage on w2 (w1 takes nothing meanwhile):
    plan (manifest GET), prepare (mid-blob download), metadata (reading converted parents back),
    assemble (mid-blob upload), push (manifest PUT). w2 is SIGKILLed with all five in flight and
    restarted at once (as its supervisor would); after the broker's lease w1 and the new w2 finish
    them all as an undisturbed run would, and no stage that had finished before the kill runs again
    (run counters)."""
    names = ("kill-plan", "kill-prepare", "kill-meta", "kill-assemble", "kill-push")
    # Small images: one layer where one will do; two where a layer should finish before the kill.
    layers = {"kill-plan": 1, "kill-prepare": 2, "kill-assemble": 2, "kill-push": 1}
    for seed, name in enumerate(names, start=80):
        if name == "kill-meta":  # its lowest layer was converted before (by `obdconv convert`)
            ff.image("kill-meta-base", repo=name, tag="base", layers=1, file_bytes=128 << 10, seed=seed,
                     shared_layers=1)
            ff.image(name, layers=2, file_bytes=128 << 10, seed=seed, shared_layers=1)
        else:
            ff.image(name, seed=seed, layers=layers[name], file_bytes=128 << 10)
    ff.convert_locally("kill-meta", "base", "obd-base")
    p = ff.proxy
    rules = {
        "kill-plan": p.add("hold", "/faults/kill-plan/manifests/src$", method="GET", times=1),
        "kill-prepare": p.add("stall_response_after", f"/faults/kill-prepare/blobs/{ff.layers('kill-prepare')[1]}$",
                              method="GET", times=1, bytes=PART),
        "kill-meta": p.add("hold", "/faults/kill-meta/blobs/sha256:", method="GET", header="Range", times=1),
        "kill-assemble": p.add("stall_request_after", "/faults/kill-assemble/blobs/uploads/.", method="PATCH",
                               times=1, bytes=PART),
        "kill-push": p.add("hold", "/faults/kill-push/manifests/obd$", method="PUT", times=1),
    }
    fleet = ff.fleet
    prepares, assembles = fleet.runs("prepare"), fleet.runs("assemble")
    with consuming_only_private(fleet, "w1"):
        ids = {name: fleet.submit(ff.request(name)) for name in names}
        for rule in rules.values():
            p.wait_for_hits(rule, timeout=90)
        victim = fleet.workers["w2"]
        victim.kill(signal.SIGKILL)
        victim.proc.wait(10)  # type: ignore[union-attr]
        p.clear()  # the held requests end (reset); their clients are gone with w2
    fleet.start_worker("w2", 8)  # restarted at once, as systemd or Kubernetes would (same name, same spool)
    finals = {name: fleet.wait(rid, timeout=150) for name, rid in ids.items()}
    for name in names:
        ff.assert_converted_once(name, ids[name], finals[name])
    new_prepares = {d: n - prepares.get(d, 0) for d, n in fleet.runs("prepare").items() if n != prepares.get(d, 0)}
    new_assembles = {k: n - assembles.get(k, 0) for k, n in fleet.runs("assemble").items()
                     if n != assembles.get(k, 0)}
    converted = [d for name in names for d in (ff.layers(name)[1:] if name == "kill-meta" else ff.layers(name))]
    assert sorted(new_prepares) == sorted(converted) and set(new_prepares.values()) == {1}, new_prepares
    assert len(new_assembles) == len(converted) and set(new_assembles.values()) == {1}, new_assembles


def retried_database_error(ff: FaultFleet, request_id: str) -> bool:
    """A task of the request met the database down and was retried (Celery's retry log line)."""
    return any("retry:" in line and "DatabaseError" in line and request_id in line
               for line in ff.fleet.logs_text().splitlines())


def test_database_down_at_start(ff: FaultFleet) -> None:
    """MariaDB is down: a client that writes the status row at submit gets a clear DatabaseError;
    a request enqueued by a service without a database of its own is retried by the workers
    (DatabaseError) until MariaDB is back, then completes."""
    ff.image("db-down", seed=90, **SMALL)
    no_db = create_app(load_settings(env={**ff.fleet.env, "OBDCONV_DB_TYPE": ""}))
    ff.db.process.stop()
    try:
        with pytest.raises(DatabaseError, match=f"127.0.0.1:{ff.db.port}"):
            ff.fleet.submit(ff.request("db-down"))
        request_id = submit(ff.request("db-down"), app=no_db)
        wait_until(lambda: retried_database_error(ff, request_id), 60, "a worker to retry a DatabaseError")
    finally:
        ff.db.process.start()
    ff.assert_converted_once("db-down", request_id, ff.fleet.wait(request_id, timeout=120))


def test_database_killed_mid_run(ff: FaultFleet) -> None:
    """MariaDB is SIGKILLed while a request prepares (held mid-blob by the proxy) and the request
    goes on while it is down; it is restarted (crash recovery) a few seconds later. The request
    completes; its status row, dedup rows and claims are as after an undisturbed run."""
    ff.image("db-kill", seed=91, **SMALL)
    rule = ff.proxy.add("stall_response_after", f"/faults/db-kill/blobs/{ff.layers('db-kill')[1]}$",
                        method="GET", times=1, bytes=PART)
    request_id = ff.fleet.submit(ff.request("db-kill"))
    ff.proxy.wait_for_hits(rule)
    ff.make_commits_durable()
    ff.db.process.kill(signal.SIGKILL)
    ff.db.process.proc.wait(10)  # type: ignore[union-attr]
    try:
        ff.proxy.clear()  # the download breaks and resumes; later stages need the database
        wait_until(lambda: retried_database_error(ff, request_id), 60, "a task to retry a DatabaseError")
    finally:
        ff.db.process.start()
    ff.assert_converted_once("db-kill", request_id, ff.fleet.wait(request_id, timeout=120))
    assert ff.query("SELECT `key`, owner FROM obdconv_claims WHERE owner LIKE %s", f"%{request_id}%") == []


def test_redis_killed_with_append_only_file(ff: FaultFleet) -> None:
    """Redis persisted as deploy/ runs it (AOF, fsync every second) is SIGKILLed while a request
    uploads a layer (held mid-blob by the proxy); the upload goes on while Redis is down (the task
    then needs it) and Redis is restarted on its file 1.5 s later: the request completes as
    undisturbed (deploy/README.md: a restart loses at most the last second, the ledger re-sends)."""
    ff.image("redis-aof", seed=92, **SMALL)
    rule = ff.proxy.add("stall_request_after", "/faults/redis-aof/blobs/uploads/.", method="PATCH", times=1,
                        bytes=PART)
    request_id = ff.fleet.submit(ff.request("redis-aof"))
    ff.proxy.wait_for_hits(rule)
    ff.redis.process.kill(signal.SIGKILL)
    ff.redis.process.proc.wait(10)  # type: ignore[union-attr]
    try:
        ff.proxy.clear()  # the upload breaks and is sent again in a new session
        time.sleep(1.5)
    finally:
        ff.redis.process.start()
    ff.assert_converted_once("redis-aof", request_id, ff.fleet.wait(request_id, timeout=120))


def partial_layers(ff: FaultFleet) -> set[str]:
    return {f"{node.name}/{p.name}" for node in ff.spool.iterdir() if node.is_dir() for p in node.iterdir()
            if p.name.startswith(".prep")}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs as the workers' spool")
def test_spool_full(ff: FaultFleet) -> None:
    """The workers' spool (a 48 MiB tmpfs) has 1 MiB left and a layer needs 3: the request fails
    with an error naming the worker's spool directory, leaves no partial layer in it and pushes
    nothing; once there is room again the same request succeeds as undisturbed."""
    assert ff.spool_is_tmpfs
    ff.image("spool-full", seed=93, layers=1, file_bytes=3 << 20)
    filler = ff.spool / "filler"
    free = os.statvfs(ff.spool).f_bavail * os.statvfs(ff.spool).f_frsize
    with open(filler, "wb") as f:
        f.truncate(0)
        os.posix_fallocate(f.fileno(), 0, free - (1 << 20))
    before = partial_layers(ff)  # (a prepare SIGKILLed earlier left one: the spool's eviction removes it)
    try:
        request_id = ff.fleet.submit(ff.request("spool-full"))
        final = ff.fleet.wait(request_id, timeout=120)
        assert final["state"] == "FAILURE", final
        [(state, _, error_class, message, _)] = failure_row(ff, request_id)
        assert state == "FAILURE" and "No space left on device" in message, (error_class, message)
        assert str(ff.spool) in message, message
        assert partial_layers(ff) == before  # no partial layer of this request left behind
        assert storage.tag_target(ff.registry, "faults/spool-full", "obd") is None
    finally:
        filler.unlink()
    request_id = ff.fleet.submit(ff.request("spool-full"))
    ff.assert_converted_once("spool-full", request_id, ff.fleet.wait(request_id, timeout=120))


# Last: after this the workers' remote control (pidbox) may not answer, as in tests/fleet.
def test_redis_restart_without_persistence(ff: FaultFleet) -> None:
    """Redis without persistence restarted mid-request: as deploy/README.md says, the request in
    flight is forgotten: its status row stays RUNNING, or says FAILURE with Redis's ConnectionError
    when one of its tasks was finishing just then (Celery's chord bookkeeping is not retried), never
    a false SUCCESS or another error; the fleet serves new requests: the same request submitted
    again converts as undisturbed once the forgotten one's claims expire, also when a layer's
    holder record outlived its entry list."""
    ff.image("redis-none", seed=94, **SMALL)
    ff.redis.stop()
    ff.redis = RedisServer(ff.workdir / "redis-none", port=ff.redis.port).start()  # empty, no AOF
    rule = ff.proxy.add("stall_response_after", f"/faults/redis-none/blobs/{ff.layers('redis-none')[1]}$",
                        method="GET", times=1, bytes=PART)
    lost = ff.fleet.submit(ff.request("redis-none"))
    ff.proxy.wait_for_hits(rule, timeout=90)
    ff.redis.process.kill(signal.SIGKILL)
    ff.redis.process.proc.wait(10)  # type: ignore[union-attr]
    ff.redis.process.start()
    ff.proxy.clear()
    time.sleep(3)  # the held prepare finishes meanwhile; nothing is left to carry the request on
    forgotten = [(r[0], r[2]) for r in ff.status_rows(lost)]
    assert forgotten in ([("RUNNING", "")], [("FAILURE", "ConnectionError")]), forgotten
    assert ff.fleet.status(lost)["state"] == forgotten[0][0]
    # A prepare that stored its entry list before the restart and its holder record after it leaves
    # a record pointing at nothing (seen in this test when the restart fell between the two
    # writes): make that state certain, for the layer whose prepare the restart interrupted.
    backend = ff.redis.client(1)
    holder = backend.get(HOLDER_PREFIX + spool_key(ff.layers("redis-none")[1], "lz4", 4096))
    assert holder is not None
    backend.delete(json.loads(holder)["entries_key"])
    again = ff.fleet.submit(ff.request("redis-none"))
    ff.assert_converted_once("redis-none", again, ff.fleet.wait(again, timeout=120))
    assert [(r[0], r[2]) for r in ff.status_rows(lost)] == forgotten
