"""The message ledger: every task message obdconv publishes is re-sent if the broker loses it.

Why: kombu's Redis transport takes a message off its queue with BRPOP and only then records it as
unacknowledged (`unacked` hash + `unacked_index`). A worker killed in between (a window of
microseconds, but fleets kill workers all the time) loses that message: it is in no queue and in
no unacked set, so no redelivery mechanism can find it, and the request it belonged to (a chord
waiting for that one task) never finishes. The fix here does not depend on kombu internals: we
remember what we sent, and re-send what nobody holds.

* `before_task_publish` (every message sent through a `LedgerAMQP` app: submit, chords, retries,
  chord callbacks) stores the message under `obdconv:ledger:msg:<task id>` (TTL a week);
  `after_task_publish` adds the id to `obdconv:ledger:published` (a sorted set, score = time).
* `task_postrun` / `task_revoked` forget it (not on RETRY: the retry message replaced it).
* `MessageLedger.sweep` (run by the lease keeper of every worker, one at a time under a Redis lock)
  looks at published messages older than `grace`: one that is in no queue list and not in the
  unacked hash is marked missing; still missing at least `grace` later, it is re-sent, exactly as
  first published (same task id, same chord links). The two observations `grace` apart make a
  message that is just moving between lists (the BRPOP window, a kombu restore) never look lost.
  Tasks are idempotent, and a lost message never ran (a running task's message is in `unacked`
  until it is acked), so a re-send cannot count a chord part twice.

Messages sent by other programs (another service enqueueing `obdconv.convert` by name) are not in
the ledger; every message obdconv's own tasks send after that is.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import redis
from celery import Celery, signals
from celery.app.amqp import AMQP

from workers.queues import SHARED_QUEUES, WORKER_QUEUE_PREFIX

log = logging.getLogger(__name__)

MESSAGE_KEY_PREFIX = "obdconv:ledger:msg:"
PUBLISHED_KEY = "obdconv:ledger:published"
MISSING_KEY = "obdconv:ledger:missing"
SWEEP_LOCK_KEY = "obdconv:ledger:sweep"
UNACKED_KEY = "unacked"  # kombu's default name (no global_keyprefix configured)
# kombu's Redis transport stores priorities > 0 in "<queue>\x06\x16<priority>" lists.
PRIORITY_SEPARATOR = "\x06\x16"
MESSAGE_TTL_SECONDS = 7 * 24 * 3600
# A message that keeps vanishing (e.g. a task name no worker knows is rejected without running)
# is given up after this many re-sends, with an error in the log.
MAX_RESENDS = 5
LIST_PAGE = 1000

# Forget a message atomically, unless a task name is given and the recorded message is another
# task's (compare and delete).
FORGET_LUA = """
local raw = redis.call('GET', KEYS[1])
if raw and ARGV[2] ~= '' and cjson.decode(raw)['task_name'] ~= ARGV[2] then
    return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""


def is_redis_url(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "unix://"))


@dataclass(frozen=True)
class LedgerEntry:
    """One task message as published: enough to publish it again, byte for byte the same task."""

    task_id: str
    task_name: str
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: Any
    resends: int = 0

    def to_json(self) -> str:
        return json.dumps({
            "task_id": self.task_id, "task_name": self.task_name, "exchange": self.exchange,
            "routing_key": self.routing_key, "headers": self.headers, "properties": self.properties,
            "body": self.body, "resends": self.resends,
        }, default=str)

    @classmethod
    def from_json(cls, raw: str | bytes) -> LedgerEntry:
        d = json.loads(raw)
        return cls(d["task_id"], d["task_name"], d["exchange"], d["routing_key"], d["headers"],
                   d["properties"], d["body"], int(d.get("resends", 0)))


def message_key(task_id: str) -> str:
    return MESSAGE_KEY_PREFIX + task_id


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _task_id(payload: object) -> str | None:
    headers = payload.get("headers") if isinstance(payload, dict) else None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) else None


def task_id_of_payload(raw: bytes | str) -> str | None:
    """The task id of a kombu Redis message payload (a queue item), or None if it is not one."""
    try:
        return _task_id(json.loads(raw))
    except ValueError:
        return None


def task_id_of_unacked(raw: bytes | str) -> str | None:
    """The task id of a value of kombu's `unacked` hash: JSON [payload, exchange, routing_key]."""
    try:
        return _task_id(json.loads(raw)[0])
    except (ValueError, IndexError, KeyError, TypeError):
        return None


def is_task_queue(name: str) -> bool:
    base = name.split(PRIORITY_SEPARATOR, 1)[0]
    return base in SHARED_QUEUES or base.startswith(WORKER_QUEUE_PREFIX)


class MessageLedger:
    """The ledger's Redis operations (the broker's Redis, so it shares the messages' fate). Its
    times are on the broker's clock: the sweeping worker compares them with times other workers
    wrote (workers/clock.py)."""

    def __init__(self, client: redis.Redis) -> None:
        from workers.clock import FleetClock  # (workers.clock imports this module)

        self.client = client
        self.clock = FleetClock(client)

    @classmethod
    def from_url(cls, url: str) -> MessageLedger:
        return cls(redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5))

    # -- publisher side ------------------------------------------------------------------------

    def record(self, entry: LedgerEntry) -> None:
        """Before the message is published (so a consumer that forgets it early wins)."""
        self.client.set(message_key(entry.task_id), entry.to_json(), ex=MESSAGE_TTL_SECONDS)

    def mark_published(self, task_id: str, now: float | None = None) -> None:
        """After the broker took the message: from now on the sweep may look for it."""
        self.client.zadd(PUBLISHED_KEY, {task_id: self.clock.now() if now is None else now})

    def forget(self, task_id: str, task_name: str | None = None) -> bool:
        """The task ran (or was revoked): nothing to re-send. With `task_name`, only if the ledger's
        message is that task's: a task that replaces itself (Celery's `replace`) publishes its
        replacement under its own id before it ends, and that new message must stay protected."""
        return bool(self._forget_script(keys=[message_key(task_id), PUBLISHED_KEY, MISSING_KEY],
                                        args=[task_id, task_name or ""]))

    @cached_property
    def _forget_script(self) -> Any:
        return self.client.register_script(FORGET_LUA)

    def entry(self, task_id: str) -> LedgerEntry | None:
        raw = self.client.get(message_key(task_id))
        return LedgerEntry.from_json(raw) if raw is not None else None

    # -- sweeper side --------------------------------------------------------------------------

    def held_task_ids(self, candidates: set[str]) -> set[str]:
        """Which of `candidates` the broker holds: waiting in a task queue, or delivered and unacked.

        Queues are read before the unacked hash, in the order a message moves (queue -> unacked),
        so a message that moves while we look is seen in one place or the other, unless it is in
        the BRPOP window itself, which the second observation of the sweep covers."""
        found: set[str] = set()
        for raw_key in self.client.scan_iter(_type="list"):
            key = _decode(raw_key)
            if not is_task_queue(key):
                continue
            for start in range(0, int(self.client.llen(key)), LIST_PAGE):
                for item in self.client.lrange(key, start, start + LIST_PAGE - 1):
                    task_id = task_id_of_payload(item)
                    if task_id in candidates:
                        found.add(task_id)
        for _, value in self.client.hscan_iter(UNACKED_KEY):
            task_id = task_id_of_unacked(value)
            if task_id in candidates:
                found.add(task_id)
        return found

    def sweep(self, resend: Callable[[LedgerEntry], None], grace: float, owner: str,
              now: float | None = None) -> list[str]:
        """Re-send lost messages; returns the task ids re-sent. Only one sweeper at a time runs
        (a lock that expires after `grace`), the others return [] at once."""
        now = self.clock.now() if now is None else now
        if not self.client.set(SWEEP_LOCK_KEY, owner, nx=True, px=max(1, int(grace * 1000))):
            return []
        try:
            return self._sweep_locked(resend, grace, now)
        finally:
            if _decode(self.client.get(SWEEP_LOCK_KEY) or b"") == owner:
                self.client.delete(SWEEP_LOCK_KEY)

    def _sweep_locked(self, resend: Callable[[LedgerEntry], None], grace: float, now: float) -> list[str]:
        old = {_decode(t) for t in self.client.zrangebyscore(PUBLISHED_KEY, "-inf", now - grace)}
        missing_since = {_decode(k): float(v) for k, v in self.client.hgetall(MISSING_KEY).items()}
        gone = [t for t in missing_since if t not in old]
        if gone:  # forgotten or re-published since: no longer a suspect
            self.client.hdel(MISSING_KEY, *gone)
        if not old:
            return []
        held = self.held_task_ids(old)
        if held & missing_since.keys():
            self.client.hdel(MISSING_KEY, *(held & missing_since.keys()))
        resent: list[str] = []
        for task_id in sorted(old - held):
            entry = self.entry(task_id)
            if entry is None:  # it ran and was forgotten after we listed it
                self.client.zrem(PUBLISHED_KEY, task_id)
                self.client.hdel(MISSING_KEY, task_id)
                continue
            first_seen = missing_since.get(task_id)
            if first_seen is None:
                self.client.hset(MISSING_KEY, task_id, str(now))
                continue
            if now - first_seen < grace:
                continue
            if entry.resends >= MAX_RESENDS:
                log.error("task %s (%s) was lost %d times; giving up on it", task_id, entry.task_name, entry.resends)
                self.forget(task_id)
                continue
            log.warning("task %s (%s) is in no queue and held by no worker since %.0f s: re-sending it",
                        task_id, entry.task_name, now - first_seen)
            again = dataclasses.replace(entry, resends=entry.resends + 1)
            # Ledger first, then the broker: if the task runs and forgets itself at once, the
            # entry is gone as it should be; if publishing fails, the next sweep tries again.
            self.record(again)
            self.mark_published(task_id, now)
            self.client.hdel(MISSING_KEY, task_id)
            resend(again)
            resent.append(task_id)
        return resent


def republish(app: Celery, entry: LedgerEntry) -> None:
    """Publish a ledger entry again through `app`'s broker, as Celery first published it."""
    with app.connection_for_write() as conn:
        conn.Producer().publish(
            entry.body, exchange=entry.exchange, routing_key=entry.routing_key, headers=entry.headers,
            serializer="json", retry=False, **entry.properties)  # a failure: the next sweep tries again


# -- wiring into Celery --------------------------------------------------------------------------

# The ledger of the app that is publishing right now. Celery's publish signals do not say which
# app sent a message; several apps (with different brokers) can live in one process (tests do).
_publishing_ledger: contextvars.ContextVar[MessageLedger | None] = contextvars.ContextVar(
    "obdconv_publishing_ledger", default=None)


class LedgerAMQP(AMQP):
    """Celery's AMQP helper, with every task message it sends recorded in the message ledger.

    Wraps the sender Celery builds in `_create_task_sender` (the one hook where the publishing app
    is known); the recording itself uses the public publish signals below."""

    @cached_property
    def ledger(self) -> MessageLedger | None:
        url = str(self.app.conf.broker_url or "")
        return MessageLedger.from_url(url) if is_redis_url(url) else None

    def _create_task_sender(self) -> Callable[..., Any]:
        send = super()._create_task_sender()
        ledger = self.ledger
        if ledger is None:
            return send  # type: ignore[no-any-return]

        def send_task_message(*args: Any, **kwargs: Any) -> Any:
            token = _publishing_ledger.set(ledger)
            try:
                return send(*args, **kwargs)
            finally:
                _publishing_ledger.reset(token)

        return send_task_message


def ledger_of(app: Celery) -> MessageLedger | None:
    return getattr(app.amqp, "ledger", None)


@signals.before_task_publish.connect
def _record_message(sender: str, body: Any, exchange: str, routing_key: str, headers: dict[str, Any],
                    properties: dict[str, Any], **_: Any) -> None:
    ledger = _publishing_ledger.get()
    if ledger is None or not headers.get("id"):
        return
    try:
        ledger.record(LedgerEntry(headers["id"], sender, exchange or "", routing_key or "", headers,
                                  dict(properties or {}), body))
    except redis.RedisError as e:  # the publish that follows will fail loudly if Redis is gone
        log.warning("message ledger: cannot record %s: %s", headers["id"], e)


@signals.after_task_publish.connect
def _mark_published(headers: dict[str, Any], **_: Any) -> None:
    ledger = _publishing_ledger.get()
    if ledger is None or not headers.get("id"):
        return
    try:
        ledger.mark_published(headers["id"])
    except redis.RedisError as e:
        log.warning("message ledger: cannot mark %s published: %s", headers["id"], e)


def _forget(task: Any, task_id: str | None) -> None:
    ledger = ledger_of(task.app) if task is not None else None
    if ledger is None or not task_id:
        return
    try:
        ledger.forget(task_id, task.name)
    except redis.RedisError as e:  # the entry expires; a sweep finds the task gone from the ledger
        log.warning("message ledger: cannot forget %s: %s", task_id, e)


@signals.task_postrun.connect
def _forget_finished(sender: Any = None, task_id: str | None = None, state: str | None = None, **_: Any) -> None:
    if state != "RETRY":  # a retry published a new message under the same id: keep that one
        _forget(sender, task_id)


@signals.task_revoked.connect
def _forget_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    _forget(sender, getattr(request, "id", None))


def sweeper_for(app: Celery, nodename: str, grace: float) -> Callable[[], Iterable[str]] | None:
    """The lease keeper's periodic call: sweep `app`'s ledger, re-sending through `app`."""
    ledger = ledger_of(app)
    if ledger is None:
        return None
    return lambda: ledger.sweep(lambda entry: republish(app, entry), grace, nodename)
