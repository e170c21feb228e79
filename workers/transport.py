"""The broker transport of the fleet: kombu's Redis transport with its leases on the fleet clock, made
to survive a Redis restart while a worker holds messages. Selected by the app (`broker_transport` in
workers/app.py) for redis:// and rediss:// brokers.

Leases on the fleet clock (workers/clock.py): kombu stamps each delivered message in the
`unacked_index` sorted set with the delivering worker's clock, and every worker's restore sweep hands
back the messages whose stamp is older than the visibility timeout by ITS clock. Across machines whose
clocks differ by more than the lease (`lease_seconds`, 30 s by default), that hands running tasks to a
second worker. Here both the stamp and the sweep's limit use the broker's clock. The lease keeper
(workers/lease.py) renews stamps on the same clock.

Surviving a Redis restart: with kombu/Celery 5.7, when the connection to Redis drops, Celery's first
attempt to close the old channel fails on the dead socket and it then detaches the transport from its
connection; the second close (restoring the unacknowledged messages) and every later ack of a task
that was running (through that old channel) then fail with AttributeError ('NoneType' object has no
attribute 'hostname' / 'client'), which Celery treats as unrecoverable: the worker exits and every
task it held waits for a restart and the lease. tests/faults/test_fleet_faults.py reproduces it. So:
* a channel keeps the connection parameters it was opened with, so acks through it still reach
  Redis once it is back (no task runs twice because its ack was lost);
* unacknowledged messages are not restored through a detached transport: they stay in Redis's
  unacked index (with the append-only file deploy/ configures, across the restart) and the lease
  sweep hands them to a worker only once nobody renews them: never while their task still runs.
  (A warm shutdown still restores them at once, as kombu does.)
"""

from __future__ import annotations

import logging
from contextlib import suppress
from functools import cached_property
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from workers.clock import FleetClock

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    @cached_property
    def clock(self) -> FleetClock:
        # Through the channel's synchronous pool: `channel.client` is the connection the event loop
        # waits on (BRPOP), which no other command may use.
        return FleetClock(redis.Redis(connection_pool=self.channel.pool))

    def append(self, message: Any, delivery_tag: Any) -> None:
        """kombu's `append` (unacked hash + index, one pipeline), stamped on the fleet clock."""
        delivery = message.delivery_info
        stamp = self.clock.now()
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: stamp}) \
                .hset(self.unacked_key, delivery_tag, dumps([message._raw, delivery["exchange"],
                                                             delivery["routing_key"]])) \
                .execute()
            virtual.QoS.append(self, message, delivery_tag)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        """kombu's sweep (every `interval`-th call, under its Redis mutex), with the limit on the
        fleet clock: messages stamped before now - visibility timeout go back to their queue."""
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):
            return
        with self.channel.conn_or_acquire() as client:
            ceil = self.clock.now() - self.visibility_timeout
            with suppress(kombu_redis.MutexHeld), \
                    kombu_redis.Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                visible = client.zrange(self.unacked_index_key, ceil, 0, desc=True, byscore=True,
                                        offset=num and start, num=num, withscores=True)
                for tag, _score in visible or []:
                    self.restore_by_tag(tag, client)

    def restore_unacked(self, client: Any = None) -> Any:
        transport = self.channel.connection
        if client is None and (transport is None or transport.client is None):
            log.warning("broker connection lost: %d unacknowledged message(s) left to the lease sweep",
                        len(self._delivered))
            self._delivered.clear()
            return None
        return super().restore_unacked(client)


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        saved: dict[bool, dict[str, Any]] = self.__dict__.setdefault("_saved_connparams", {})
        transport = self.connection
        if transport is not None and transport.client is not None:
            saved[asynchronous] = super()._connparams(asynchronous)
        elif asynchronous not in saved:  # never opened this way while attached: nothing to reuse
            return super()._connparams(asynchronous)  # type: ignore[no-any-return]
        return dict(saved[asynchronous])


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
