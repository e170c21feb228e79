"""Leases on broker messages, worker liveness, and rescue of a dead worker's private queue.

Why: Redis has no consumer-bound acknowledgements. kombu keeps every delivered, not yet acked
message in the `unacked` hash with its delivery time in the `unacked_index` sorted set, and any
worker's periodic sweep restores messages older than the visibility timeout. A long timeout would
keep a dead worker's task waiting for hours; a short one would redeliver long tasks that are still
running. So the worker holding a message renews its score (a lease) every lease/3 seconds: live
tasks are never redelivered, a dead worker's tasks come back `lease_seconds` after it died.

The same thread keeps `obdconv:alive:<nodename>` (TTL = lease) and moves messages waiting in the
private queue (`worker.<nodename>`) of a worker whose alive key expired to the shared `assemble`
queue, where any worker takes them (the assemble task re-prepares a layer whose spool is missing).
It also runs the message ledger's sweep (workers/ledger.py), which re-sends task messages the
broker lost.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable

import redis

from workers.clock import FleetClock
from workers.queues import ASSEMBLE, WORKER_QUEUE_PREFIX, owner_of_worker_queue

log = logging.getLogger(__name__)

ALIVE_KEY_PREFIX = "obdconv:alive:"
UNACKED_INDEX_KEY = "unacked_index"  # kombu's default name (no global_keyprefix configured)
# One worker per lease period scans for orphaned private queues (whoever sets this first): the scan
# visits the broker's whole keyspace, which grows with the fleet, so N workers scanning it every
# period cost Redis O(N^2) (docs/CAPACITY.md).
RESCUE_LOCK_KEY = "obdconv:rescue"
SCAN_COUNT = 1000


def alive_key(nodename: str) -> str:
    return ALIVE_KEY_PREFIX + nodename


def is_worker_alive(client: redis.Redis, nodename: str) -> bool:
    return bool(client.exists(alive_key(nodename)))


def renew_leases(client: redis.Redis, delivery_tags: Iterable[str], now: float | None = None) -> int:
    """Push the delivery time of held messages to `now` (only those still unacked: ZADD XX).
    `now` must be on the clock kombu stamps deliveries with: the fleet clock (workers/transport.py)."""
    tags = list(delivery_tags)
    if not tags:
        return 0
    stamp = time.time() if now is None else now
    return int(client.zadd(UNACKED_INDEX_KEY, dict.fromkeys(tags, stamp), xx=True, ch=True))


def rescue_orphaned_queues(client: redis.Redis, target_queue: str = ASSEMBLE) -> int:
    """Move messages out of private queues whose owner is not alive. Returns how many moved."""
    moved = 0
    for raw_key in client.scan_iter(match=WORKER_QUEUE_PREFIX + "*", count=SCAN_COUNT, _type="list"):
        queue = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
        owner = owner_of_worker_queue(queue)
        if owner is None or is_worker_alive(client, owner):
            continue
        # LMOVE is atomic, so a message is never lost between the two lists. kombu consumes from
        # the right end; moving right -> left keeps them in FIFO order in the shared queue.
        while client.lmove(queue, target_queue, "RIGHT", "LEFT") is not None:
            moved += 1
        if moved:
            log.warning("moved %d waiting task(s) from %s (worker gone) to %s", moved, queue, target_queue)
    return moved


class LeaseKeeper:
    """A daemon thread in the worker's main process: liveness, leases, orphan rescue."""

    def __init__(self, broker_url: str, nodename: str, lease_seconds: int,
                 held_delivery_tags: Callable[[], list[str]],
                 sweep_ledger: Callable[[], object] | None = None) -> None:
        self.client = redis.Redis.from_url(broker_url, socket_timeout=10, socket_connect_timeout=5)
        self.clock = FleetClock(self.client)
        self.nodename = nodename
        self.lease_seconds = max(3, lease_seconds)
        self.held_delivery_tags = held_delivery_tags
        self.sweep_ledger = sweep_ledger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="obdconv-lease", daemon=True)

    def tick(self) -> None:
        now = self.clock.now()
        self.client.set(alive_key(self.nodename), str(now), ex=self.lease_seconds)
        renew_leases(self.client, self.held_delivery_tags(), now)
        period_ms = max(int(self.lease_seconds / 3 * 1000), 1)
        if self.client.set(RESCUE_LOCK_KEY, self.nodename, nx=True, px=period_ms):
            rescue_orphaned_queues(self.client)
        if self.sweep_ledger is not None:
            self.sweep_ledger()

    def _run(self) -> None:
        period = self.lease_seconds / 3
        while not self._stop.is_set():
            try:
                self.tick()
            except redis.RedisError as e:  # broker briefly away: keep trying, the worker reconnects too
                log.warning("lease keeper: %s", e)
            except Exception:  # a re-send failed in kombu: log it, the next tick tries again
                log.exception("lease keeper tick failed")
            self._stop.wait(period)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            self.client.delete(alive_key(self.nodename))
