"""The Celery app of the fleet (`celery -A workers worker`, `celery -A workers flower`).

Configured from config.settings (environment / optional TOML file). Reliability choices, and why:
* `task_acks_late` + `task_reject_on_worker_lost`: a task is acknowledged only when it finished,
  so a crashed pool process or worker hands its task back to the broker (tasks are idempotent).
* `worker_prefetch_multiplier = 1`: a worker holds at most one waiting message per pool slot, so a
  heavy layer never sits behind another heavy layer on a busy worker while others are idle.
* Redis `visibility_timeout` is a *lease* (settings.lease_seconds) that the worker holding a
  message renews while it runs (workers/lease.py). So no live task is ever redelivered however
  long it takes (the effective timeout is above the longest task), and a dead worker's messages
  are restored by the surviving workers' periodic sweep within lease + sweep interval (< 1 min).
* Events on (`worker_send_task_events`, `task_send_sent_event`) so Flower sees every task.
* The broker transport is kombu's Redis transport with a fix that lets a worker outlive a Redis
  restart while it holds messages (workers/transport.py).
* Every task message the app sends is kept in a ledger (workers/ledger.py) until its task ran, and
  re-sent if the broker lost it (kombu's Redis transport can, when a worker dies mid-delivery).
* Times that cross machines are on the broker's clock (workers/clock.py): lease stamps (the
  transport in workers/transport.py), ETAs of delayed retries (`FleetCelery.now` when sending,
  `FleetTask.Strategy` when receiving), the ledger. Hosts whose clocks disagree by minutes neither
  take each other's running tasks nor wait minutes for a 1 s retry.
"""

from __future__ import annotations

import importlib
import math
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

from celery import Celery
from celery.loaders.app import AppLoader

from config.settings import Settings, load_settings
from obdconv.errors import UsageError
from workers.clock import clock_for
from workers.ledger import LedgerAMQP, is_redis_url
from workers.queues import CONTROL, TASK_ROUTES, shared_queues
from workers.transport import TRANSPORT

# How often surviving workers scan for expired leases (seconds); with throttle 1 every tick scans.
UNACKED_RESTORE_INTERVAL = 5

# Celery's Redis result backend hands a finished chord's callback to ONE worker through a claim
# in Redis. A worker that dies after claiming and before publishing the callback leaves the claim
# to expire; the chord part it was running is redelivered (its message was never acked) and its
# re-run claims and publishes the callback, but only if the claim expired by then. So the earliest
# redelivery (2/3 of a lease after death: leases are renewed every lease/3) must come after the
# longest claim, which Celery derives from these settings (celery.backends.redis
# `on_chord_part_return`): max(5, 2 * join timeout), extended before publishing to
# (publish retries + 1) * connection timeout + retry waits + max(connection timeout, 1).
CHORD_JOIN_TIMEOUT = 3.0  # Celery's default
BROKER_CONNECTION_TIMEOUT = 2  # seconds (Celery's default 4 would make the claim 21 s)
PUBLISH_RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 1}


def chord_dispatch_claim_seconds() -> int:
    """The longest a dead worker's chord dispatch claim can live, from the settings above."""
    p = PUBLISH_RETRY_POLICY
    waits = sum(min(p["interval_start"] + p["interval_step"] * n, p["interval_max"]) for n in range(p["max_retries"]))
    publish = (p["max_retries"] + 1) * BROKER_CONNECTION_TIMEOUT + waits + max(BROKER_CONNECTION_TIMEOUT, 1)
    return max(5, int(2 * CHORD_JOIN_TIMEOUT), math.ceil(publish))


def min_lease_seconds() -> int:
    return math.ceil(1.5 * chord_dispatch_claim_seconds()) + 1


class InstalledModulesLoader(AppLoader):
    """Celery's loader imports the task modules (`imports`, `--include`, config modules) with the
    working directory put first on sys.path (celery.utils.imports.cwd_in_path), so a `peewee.py`
    there would run in the worker. This one imports them like any other module: installed code
    only (see obdconv/interpreter.py)."""

    def import_from_cwd(self, module: str, imp: Any = None, package: str | None = None) -> ModuleType:
        return (imp or self.import_module)(module, package=package)  # type: ignore[no-any-return]

    def find_module(self, module: str) -> ModuleType:
        return importlib.import_module(module)


def celery_config(settings: Settings) -> dict[str, object]:
    if settings.lease_seconds < min_lease_seconds():
        raise UsageError(f"lease_seconds {settings.lease_seconds} is too short: a chord whose dispatching worker "
                         f"died would never finish; use at least {min_lease_seconds()}")
    transport_options = {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": UNACKED_RESTORE_INTERVAL,
        "unacked_restore_throttle": 1,
        # The sweep holds a Redis mutex for milliseconds; kombu's default expiry of 300 s means a
        # worker killed while holding it stops every other worker's sweep for five minutes, so a
        # dead worker's tasks would not come back within the lease. Keep the expiry short.
        "unacked_mutex_expire": 10,
        # Fail fast when Redis vanishes instead of hanging on a dead socket.
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
    }
    config: dict[str, object] = {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "broker_transport_options": transport_options,
        "result_backend_transport_options": {"socket_timeout": 30, "socket_connect_timeout": 5},
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": BROKER_CONNECTION_TIMEOUT,
        "task_publish_retry_policy": PUBLISH_RETRY_POLICY,
        "result_chord_join_timeout": CHORD_JOIN_TIMEOUT,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_queues": shared_queues(),
        "task_default_queue": CONTROL,
        "task_routes": TASK_ROUTES,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": max(1, settings.task_time_limit - 60),
        "result_expires": settings.result_expires,
        "result_extended": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # kombu's Redis transport with its leases on the broker's clock, fixed so a worker survives
        # a Redis restart (workers/transport.py)
        config["broker_transport"] = TRANSPORT
    return config


class FleetCelery(Celery):
    def now(self) -> datetime:
        """Celery's "now" (a retry countdown becomes ETA = now + countdown) on the fleet clock."""
        settings: Settings | None = getattr(self, "obdconv_settings", None)
        if settings is None or not is_redis_url(settings.broker_url):
            return super().now()
        stamp = clock_for(settings.broker_url).now()
        return datetime.fromtimestamp(stamp, UTC).astimezone(self.timezone)


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or load_settings()
    celery_app = FleetCelery("obdconv", set_as_current=True, amqp=LedgerAMQP, loader=InstalledModulesLoader)
    celery_app.config_from_object(celery_config(settings))
    celery_app.obdconv_settings = settings  # type: ignore[attr-defined]
    # Registers the tasks (tasks/) and the worker start-up hooks (workers/startup.py).
    celery_app.conf.imports = ("tasks.stages", "tasks.canvas", "tasks.notify", "workers.startup")
    return celery_app


def settings_of(celery_app: Celery) -> Settings:
    return celery_app.obdconv_settings  # type: ignore[attr-defined,no-any-return]


app = create_app()
