"""The broker transport of the fleet: kombu's Redis transport, made to survive a Redis restart while a
worker holds messages (`broker_transport` in workers/app.py, for redis:// and rediss:// brokers).

Why: with kombu/Celery 5.7, when the connection to Redis drops, Celery's first attempt to close the
old channel fails on the dead socket and it then detaches the transport from its connection; the
second close (restoring the unacknowledged messages) and every later ack of a task that was running
(through that old channel) then fail with AttributeError ('NoneType' object has no attribute
'hostname' / 'client'), which Celery treats as unrecoverable: the worker exits and every task it
held waits for a restart and the lease. tests/faults/test_fleet_faults.py reproduces it.

The fix, in two small overrides:
* a channel keeps the connection parameters it was opened with, so acks through it still reach
  Redis once it is back (no task runs twice because its ack was lost);
* unacknowledged messages are not restored through a detached transport: they stay in Redis's
  unacked index (with the append-only file deploy/ configures, across the restart) and the lease
  sweep (workers/lease.py) hands them to a worker only once nobody renews them: never while their
  task still runs. (A warm shutdown still restores them at once, as kombu does.)
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):  # type: ignore[misc]
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


class RedisTransport(kombu_redis.Transport):  # type: ignore[misc]
    Channel = Channel
