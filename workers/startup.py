"""Worker start-up hooks (imported by the worker through `app.conf.imports`).

* after setup: the worker also consumes its private queue `worker.<nodename>` (assemble routing);
* in the main process, once ready: the lease keeper (workers/lease.py), which also sweeps the
  message ledger (workers/ledger.py);
* in every pool process: the database (status records and dedup tables), opened after the fork
  because database connections must not be shared across processes;
* in the main process, before the pool forks: the final-state listener of tasks/notify.py (events,
  metrics, completion callbacks);
* with `metrics_port` set: in the main process, before the pool forks, Prometheus multiprocess mode
  and the /metrics exporter (workers/metrics.py); a pool process that exits is marked dead.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from celery import signals

from workers import metrics
from workers.app import settings_of
from workers.database import open_worker_database
from workers.lease import LeaseKeeper
from workers.ledger import is_redis_url, sweeper_for
from workers.queues import worker_queue

log = logging.getLogger(__name__)

_keeper: LeaseKeeper | None = None


def spool_dir_for(base: str, nodename: str) -> Path:
    """Each worker has its own spool: the prepared data it holds is what its private queue serves."""
    return Path(base) / re.sub(r"[^A-Za-z0-9_.@-]", "_", nodename)


@signals.celeryd_after_setup.connect
def _consume_private_queue(sender: str, instance: Any, **_: Any) -> None:
    instance.app.amqp.queues.select_add(worker_queue(sender))
    log.info("worker %s also consumes %s", sender, worker_queue(sender))


def _held_delivery_tags() -> list[str]:
    from celery.worker import state

    tags = []
    for request in list(state.requests.values()):
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        if tag:
            tags.append(str(tag))
    return tags


@signals.worker_ready.connect
def _start_lease_keeper(sender: Any, **_: Any) -> None:
    global _keeper
    settings = settings_of(sender.app)
    if not is_redis_url(settings.broker_url):
        return  # leases are a Redis-transport mechanism; other brokers have real consumer acks
    _keeper = LeaseKeeper(settings.broker_url, sender.hostname, settings.lease_seconds, _held_delivery_tags,
                          sweeper_for(sender.app, sender.hostname, grace=settings.lease_seconds / 3)).start()


@signals.worker_shutdown.connect
def _stop_lease_keeper(**_: Any) -> None:
    if _keeper is not None:
        _keeper.stop()


@signals.worker_init.connect
def _announce_final_states(**_: Any) -> None:
    from tasks import notify  # tasks import this module: not at the top

    notify.install()  # in the main process, before the pool forks: every pool process has it


@signals.worker_init.connect
def _start_metrics(sender: Any, **_: Any) -> None:
    settings = settings_of(sender.app)
    if settings.metrics_port <= 0:
        return
    directory = metrics.metrics_dir_for(settings, sender.hostname)
    metrics.enable_multiprocess(directory)
    try:
        metrics.start_exporter(settings, directory)
    except OSError as e:  # e.g. the port is taken: the worker still converts, without /metrics
        log.error("metrics exporter on %s:%d did not start: %s", settings.metrics_address, settings.metrics_port, e)
        return
    log.info("metrics of %s on http://%s:%d/metrics (samples in %s)", sender.hostname, settings.metrics_address,
             settings.metrics_port, directory)


@signals.worker_process_shutdown.connect
def _pool_process_exits(pid: int, **_: Any) -> None:
    metrics.mark_process_dead(pid)


@signals.worker_process_init.connect
def _open_database(**_: Any) -> None:
    open_worker_database()
