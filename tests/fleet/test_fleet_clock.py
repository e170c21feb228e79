"""The fleet clock (workers/clock.py, workers/transport.py) against a real Redis, on a host whose
own clock is 2 minutes off (time.time shifted here; tests/multihost does it with libfaketime)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import kombu.transport.redis
import pytest
import redis
from kombu import Connection, Exchange, Queue

from config.settings import load_settings
from tests.services.redis import RedisServer
from workers.app import create_app
from workers.clock import FleetClock, clock_for, fleet_strategy
from workers.transport import TRANSPORT

pytestmark = pytest.mark.services

SKEW = 120.0
DB = 11


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis_server.client(DB)
    c.flushdb()
    yield c
    c.flushdb()


def server_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds + micros / 1e6)


@pytest.fixture(params=[-SKEW, SKEW], ids=["behind", "ahead"])
def skewed(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[float]:
    real = time.time
    clock_for.cache_clear()  # the clocks measured with another skew
    monkeypatch.setattr(time, "time", lambda: real() + request.param)
    yield float(request.param)
    clock_for.cache_clear()


def test_the_clock_is_the_brokers(client: redis.Redis, skewed: float) -> None:
    clock = FleetClock(client)
    assert abs(clock.now() - server_time(client)) < 1.0
    assert abs(clock.offset() + skewed) < 1.0
    unreachable = FleetClock(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5))
    assert abs(unreachable.now() - time.time()) < 1.0  # until the broker answers: the host's own


def test_retry_etas_are_set_and_read_on_the_fleet_clock(redis_server: RedisServer, skewed: float) -> None:
    app = create_app(load_settings(env={"OBDCONV_BROKER_URL": redis_server.url(DB),
                                        "OBDCONV_RESULT_BACKEND": redis_server.url(DB)}))
    assert abs(app.now().timestamp() - server_time(redis_server.client(DB))) < 1.0
    # A message due in 1 s by the fleet clock is due in 1 s by this host's clock too.
    captured = {}

    def default(task: object, app: object, consumer: object, *, to_system_tz: object) -> object:
        captured["to_system_tz"] = to_system_tz
        return None

    import celery.worker.strategy

    original = celery.worker.strategy.default
    celery.worker.strategy.default = default  # type: ignore[assignment]
    try:
        fleet_strategy(None, app, None)
    finally:
        celery.worker.strategy.default = original
    eta = app.now() + timedelta(seconds=1)
    local = captured["to_system_tz"](eta.astimezone(UTC))  # type: ignore[operator]
    assert abs(local.timestamp() - (time.time() + 1)) < 1.0


def test_leases_are_stamped_and_swept_on_the_fleet_clock(redis_server: RedisServer, client: redis.Redis,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A message one worker holds is stamped with the broker's time, and a sweep by a worker whose
    clock runs 2 minutes ahead does not hand it back (kombu's own transport would: it compares
    the sweeping worker's clock with the stamp)."""
    queue = Queue("clocktest", Exchange("clocktest"), routing_key="clocktest")
    options = {"visibility_timeout": 30}
    with Connection(redis_server.url(DB), transport=TRANSPORT, transport_options=options) as conn:
        conn.Producer().publish({"n": 1}, exchange=queue.exchange, routing_key="clocktest", declare=[queue])
        channel = conn.default_channel
        real = time.time

        def host_clock(offset: float) -> None:  # (kombu bound `time` at import: shift that too)
            monkeypatch.setattr(time, "time", lambda: real() + offset)
            monkeypatch.setattr(kombu.transport.redis, "time", lambda: real() + offset)

        host_clock(-SKEW)  # the worker that takes it: behind
        message = queue(channel).get(no_ack=False)
        assert message is not None
        ((tag, stamp),) = client.zrange("unacked_index", 0, -1, withscores=True)
        assert abs(stamp - server_time(client)) < 1.0
        host_clock(SKEW)  # a sweeping worker: ahead
        clock_for.cache_clear()
        if hasattr(channel.qos, "clock"):
            channel.qos.clock.refresh = 0  # measure its offset again now
        channel.qos.restore_visible(interval=1)
        assert client.zscore("unacked_index", tag) is not None  # still held
        assert client.llen("clocktest") == 0
        # ...while a lease that really expired (by the broker's clock) is handed back.
        client.zadd("unacked_index", {tag: server_time(client) - 31})
        channel.qos.restore_visible(interval=1)
        assert client.llen("clocktest") == 1


def test_app_uses_the_fleet_transport_for_redis_brokers() -> None:
    assert create_app(load_settings(env={"OBDCONV_BROKER_URL": "redis://127.0.0.1:1/0"})).conf.broker_transport \
        == TRANSPORT
    other = create_app(load_settings(env={"OBDCONV_BROKER_URL": "memory://"}))
    assert other.conf.broker_transport in (None, "")
    assert abs(other.now().timestamp() - datetime.now(UTC).timestamp()) < 1.0
