"""kombu's Redis transport with its leases on the fleet clock (workers/clock.py).

kombu stamps each delivered message in the `unacked_index` sorted set with the delivering
worker's clock, and every worker's restore sweep hands back the messages whose stamp is older
than the visibility timeout by ITS clock. Across machines whose clocks differ by more than the
lease (`lease_seconds`, 30 s by default), that hands running tasks to a second worker. Here both
the stamp and the sweep's limit use the broker's clock. The lease keeper (workers/lease.py)
renews stamps on the same clock. Selected by the app (`broker_transport`) for redis:// brokers.
"""

from __future__ import annotations

from contextlib import suppress
from functools import cached_property
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from workers.clock import FleetClock


class QoS(kombu_redis.QoS):
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


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
