"""The fleet's clock: the broker's Redis server time, one clock for every worker of a fleet.

Why: workers compare times other workers wrote. The broker's leases (kombu's `unacked_index`
holds when each message was delivered or last renewed; every worker's restore sweep hands back
the ones older than the lease), the message ledger's timestamps, retry delays (a countdown
becomes an absolute ETA in the message, waited for by whichever worker receives it) and the start
of a request's wait for a claim. On each worker's own clock, a worker 2 minutes behind has every
message it holds handed back by the others within seconds (its tasks run twice), one 2 minutes
ahead hands back everybody's, and a 1 s retry delay set on one becomes 2 minutes on another.

Each process measures the offset between the Redis server's clock (TIME) and its own around one
round trip, and adds it. The offset is measured again every `REFRESH_SECONDS` (one TIME call),
so a host whose clock is stepped is followed; until a first measurement succeeds (Redis not
reachable yet) it is 0. Redis key expiry, the database's claim leases (obdconv/dedup/claims.py)
and Celery's chord claims already use their server's clock.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import redis

from workers.ledger import is_redis_url

log = logging.getLogger(__name__)

REFRESH_SECONDS = 30.0
# Offsets this large are worth a warning: the host's clock (NTP) needs looking at.
WARN_OFFSET_SECONDS = 5.0


class FleetClock:
    """`now()` = this process's clock + (Redis server clock - this process's clock)."""

    def __init__(self, client: redis.Redis, refresh: float = REFRESH_SECONDS) -> None:
        self.client = client
        self.refresh = refresh
        self._offset = 0.0
        self._measured_at: float | None = None  # time.monotonic() of the last measurement
        self._lock = threading.Lock()

    def measure(self) -> float:
        """One TIME round trip; the server's time is taken as of its midpoint."""
        before = time.time()
        seconds, micros = self.client.time()
        after = time.time()
        offset = seconds + micros / 1e6 - (before + after) / 2
        if abs(offset) > WARN_OFFSET_SECONDS and abs(offset - self._offset) > 1:
            log.warning("this host's clock is %.1f s off the broker's (Redis) clock; the fleet uses the broker's",
                        -offset)
        self._offset = offset
        return offset

    def offset(self) -> float:
        now = time.monotonic()
        if self._measured_at is None or now - self._measured_at >= self.refresh:
            with self._lock:
                if self._measured_at is None or now - self._measured_at >= self.refresh:
                    try:
                        self.measure()
                    except (redis.RedisError, OSError) as e:  # keep the last offset; try again soon
                        log.debug("fleet clock: cannot read the broker's time: %s", e)
                    self._measured_at = now
        return self._offset

    def now(self) -> float:
        offset = self.offset()  # first: measuring it may take a round trip
        return time.time() + offset


@lru_cache(maxsize=8)
def clock_for(broker_url: str) -> FleetClock:
    return FleetClock(redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=3))


def fleet_clock() -> FleetClock | None:
    """The clock of this process's fleet (the app's broker); None when the broker is not Redis."""
    from workers.app import app, settings_of  # (workers.app imports this module)

    url = settings_of(app).broker_url
    return clock_for(url) if is_redis_url(url) else None


def fleet_time() -> float:
    clock = fleet_clock()
    return clock.now() if clock is not None else time.time()


def fleet_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery's default task strategy, reading a message's ETA on the fleet clock: the ETA was set
    on the fleet clock by the sender (FleetCelery.now), and the worker waits for it on its own
    clock, so shift it by this host's offset. (Set as `FleetTask.Strategy`.)"""
    from celery.utils.time import timezone
    from celery.worker.strategy import default

    from workers.app import settings_of

    url = settings_of(app).broker_url
    if not is_redis_url(url):
        return default(task, app, consumer, **kwargs)
    clock = clock_for(url)

    def to_system_tz(eta: datetime) -> datetime:
        return timezone.to_system(eta) - timedelta(seconds=clock.offset())

    return default(task, app, consumer, to_system_tz=to_system_tz, **kwargs)
