"""The message ledger (workers/ledger.py) against a real Redis: what a sweep re-sends and what it
must never re-send, and a real Celery publish -> loss -> re-send round trip through the broker."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import redis

from config.settings import load_settings
from tests.services.redis import RedisServer
from workers.app import create_app
from workers.ledger import (
    MAX_RESENDS,
    MISSING_KEY,
    PUBLISHED_KEY,
    LedgerEntry,
    MessageLedger,
    ledger_of,
    message_key,
    republish,
)
from workers.queues import CONTROL, TASK_FINISH

pytestmark = pytest.mark.services

GRACE = 10.0


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis_server.client(10)
    c.flushdb()
    yield c
    c.flushdb()


def entry(task_id: str) -> LedgerEntry:
    return LedgerEntry(task_id, TASK_FINISH, "", CONTROL, {"id": task_id, "task": TASK_FINISH},
                       {"correlation_id": task_id}, [[], {"job": {"request_id": "r"}}, {}])


def queue_payload(task_id: str) -> str:
    """A queue item as kombu's Redis transport stores it (only the parts the sweep reads matter)."""
    return json.dumps({"body": "", "headers": {"id": task_id, "root_id": "r"}, "properties": {}})


def published(ledger: MessageLedger, task_id: str, at: float) -> None:
    ledger.record(entry(task_id))
    ledger.mark_published(task_id, now=at)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[LedgerEntry] = []

    def __call__(self, e: LedgerEntry) -> None:
        self.sent.append(e)


def test_a_message_held_nowhere_is_resent_only_after_two_observations_grace_apart(client: redis.Redis) -> None:
    ledger, resend = MessageLedger(client), Recorder()
    published(ledger, "lost", at=1000.0)
    assert ledger.sweep(resend, GRACE, "w1", now=1005.0) == []  # younger than the grace: not a suspect
    assert client.hget(MISSING_KEY, "lost") is None
    assert ledger.sweep(resend, GRACE, "w1", now=1011.0) == []  # first time seen missing: only noted
    assert float(client.hget(MISSING_KEY, "lost")) == 1011.0
    assert ledger.sweep(resend, GRACE, "w1", now=1015.0) == []  # not yet missing for a whole grace
    assert ledger.sweep(resend, GRACE, "w1", now=1021.0) == ["lost"]
    assert [e.task_id for e in resend.sent] == ["lost"] and resend.sent[0].resends == 1
    assert resend.sent[0].body == entry("lost").body and resend.sent[0].headers == entry("lost").headers
    # The ledger now counts from the re-send: the next sweeps leave it alone for a grace again.
    assert ledger.entry("lost").resends == 1  # type: ignore[union-attr]
    assert client.zscore(PUBLISHED_KEY, "lost") == 1021.0 and client.hget(MISSING_KEY, "lost") is None
    assert ledger.sweep(resend, GRACE, "w1", now=1025.0) == []


@pytest.mark.parametrize("where", ["queue", "priority-queue", "worker-queue", "unacked"])
def test_a_message_the_broker_holds_is_never_resent(client: redis.Redis, where: str) -> None:
    ledger, resend = MessageLedger(client), Recorder()
    published(ledger, "held", at=1000.0)
    published(ledger, "lost", at=1000.0)
    if where == "unacked":
        client.hset("unacked", "tag-1", json.dumps([json.loads(queue_payload("held")), "", CONTROL]))
    else:
        key = {"queue": CONTROL, "priority-queue": CONTROL + "\x06\x163", "worker-queue": "worker.w9@h"}[where]
        client.lpush(key, queue_payload("other"), queue_payload("held"), "not json")
    client.hset(MISSING_KEY, "held", "900.0")  # wrongly suspected earlier (e.g. seen mid-move)
    for now in (1011.0, 1030.0, 1050.0):
        ledger.sweep(resend, GRACE, "w1", now=now)
    assert [e.task_id for e in resend.sent] == ["lost"]
    assert client.hget(MISSING_KEY, "held") is None


def test_a_forgotten_message_is_not_resent_and_leaves_nothing(client: redis.Redis) -> None:
    ledger, resend = MessageLedger(client), Recorder()
    published(ledger, "done", at=1000.0)
    ledger.sweep(resend, GRACE, "w1", now=1011.0)
    ledger.forget("done")
    # after_task_publish of a fast task can land after its forget: an id without a message is dropped
    ledger.mark_published("late", now=1000.0)
    ledger.sweep(resend, GRACE, "w1", now=1030.0)
    assert resend.sent == []
    assert client.zcard(PUBLISHED_KEY) == 0 and client.hlen(MISSING_KEY) == 0
    assert not client.exists(message_key("done"))


def test_a_task_that_replaced_itself_does_not_forget_its_replacement(client: redis.Redis) -> None:
    """convert[R] replaces itself with convert_manifest[R]: the replacement is recorded under the
    same id before convert's postrun; that postrun must not drop the replacement's entry."""
    ledger, resend = MessageLedger(client), Recorder()
    published(ledger, "R", at=1000.0)  # convert[R] (entry task name TASK_FINISH in this test)
    replacement = LedgerEntry("R", "obdconv.convert_manifest", "", CONTROL, {"id": "R"}, {}, [[], {}, {}])
    ledger.record(replacement)
    ledger.mark_published("R", now=1001.0)
    assert not ledger.forget("R", TASK_FINISH)  # the replaced task ends
    assert ledger.entry("R") == replacement
    ledger.sweep(resend, GRACE, "w1", now=1012.0)
    assert ledger.sweep(resend, GRACE, "w1", now=1023.0) == ["R"]  # still protected: lost, re-sent
    assert resend.sent[0].task_name == "obdconv.convert_manifest"
    assert ledger.forget("R", "obdconv.convert_manifest")  # the replacement ends
    assert ledger.entry("R") is None and client.zcard(PUBLISHED_KEY) == 0


def test_a_message_lost_again_and_again_is_given_up(client: redis.Redis) -> None:
    ledger, resend = MessageLedger(client), Recorder()
    published(ledger, "cursed", at=0.0)
    now = 0.0
    for _ in range(3 * (MAX_RESENDS + 2)):
        now += GRACE + 1
        ledger.sweep(resend, GRACE, "w1", now=now)
    assert len(resend.sent) == MAX_RESENDS
    assert ledger.entry("cursed") is None and client.zcard(PUBLISHED_KEY) == 0


def test_only_one_sweeper_at_a_time(client: redis.Redis) -> None:
    ledger = MessageLedger(client)
    published(ledger, "lost", at=0.0)
    client.set("obdconv:ledger:sweep", "w2", px=60_000)  # w2 is sweeping right now
    assert ledger.sweep(Recorder(), GRACE, "w1", now=100.0) == []
    assert client.hget(MISSING_KEY, "lost") is None  # w1 did not even look
    client.delete("obdconv:ledger:sweep")
    ledger.sweep(Recorder(), GRACE, "w1", now=100.0)
    assert client.hget(MISSING_KEY, "lost") is not None
    assert not client.exists("obdconv:ledger:sweep")  # released after the sweep


def test_celery_publish_is_recorded_and_a_lost_message_comes_back_identical(redis_server: RedisServer) -> None:
    client = redis_server.client(11)
    client.flushdb()
    try:
        app = create_app(load_settings(env={"OBDCONV_BROKER_URL": redis_server.url(11),
                                            "OBDCONV_RESULT_BACKEND": redis_server.url(12)}))
        ledger = ledger_of(app)
        assert ledger is not None
        app.send_task(TASK_FINISH, kwargs={"job": {"request_id": "req-1"}}, task_id="task-1", queue=CONTROL)
        recorded = ledger.entry("task-1")
        assert recorded is not None and recorded.task_name == TASK_FINISH and recorded.routing_key == CONTROL
        assert client.zscore(PUBLISHED_KEY, "task-1") is not None
        original = client.rpop(CONTROL)  # what a worker's BRPOP does; the worker then dies
        assert original is not None and task_id_and_body(original)[0] == "task-1"
        assert client.llen(CONTROL) == 0

        t0 = float(client.zscore(PUBLISHED_KEY, "task-1"))
        assert ledger.sweep(lambda e: republish(app, e), 5.0, "w1", now=t0 + 6) == []
        assert ledger.sweep(lambda e: republish(app, e), 5.0, "w1", now=t0 + 12) == ["task-1"]
        again = client.rpop(CONTROL)
        assert again is not None
        assert task_id_and_body(again) == task_id_and_body(original)
        assert json.loads(again)["headers"] == json.loads(original)["headers"]
    finally:
        client.flushdb()
        redis_server.client(12).flushdb()


def task_id_and_body(raw: bytes) -> tuple[str, object]:
    payload = json.loads(raw)
    return payload["headers"]["id"], json.loads(base64.b64decode(payload["body"]))
