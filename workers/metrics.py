"""Prometheus metrics of the fleet: every definition is here, and the exporter each worker serves.

Counted where the fleet decides things (tasks/), through the small functions below, so obdconv/
(the core library) knows nothing of Prometheus; none of them ever raises into a task.

| metric                                   | labels          | counted in                                 |
|------------------------------------------|-----------------|--------------------------------------------|
| obdconv_conversions_total                | state, format   | tasks/notify.py, once per request and final state, per output format |
| obdconv_failures_total                   | error_class     | tasks/notify.py, a final state with an error class |
| obdconv_dedup_total                      | level           | `manifest_hit` (per format), `layer_hit` (per reused layer and format), `claim_wait` (a manifest starts waiting for another request's claim): tasks/canvas.py; `cross_repo_mount` (blobs mounted from another repository): tasks/dedup.py |
| obdconv_bytes_read_total                 | stage           | source layer bytes downloaded: `prepare`, `reprepare` (assemble on another worker) |
| obdconv_bytes_written_total              | format          | converted layer bytes uploaded (assemble)  |
| obdconv_stage_duration_seconds           | stage           | histogram of successful runs: prepare, metadata, assemble (per layer), push (per manifest or index) |
| obdconv_callbacks_total                  | outcome         | delivered, retried, failed (tasks/notify.py) |
| obdconv_queue_depth                      | queue           | at scrape time: messages waiting in each shared queue and each `worker.<node>` queue |
| obdconv_live_workers                     |                 | at scrape time: workers whose liveness key is fresh |
| obdconv_live_claims                      |                 | at scrape time: unexpired dedup claims in the database |
| obdconv_fleet_scrape_ok                  | source          | 1 when `redis` / `database` answered the scrape-time queries |

Multiprocess: Celery's prefork pool runs tasks in child processes. `enable_multiprocess` (worker main
process, before the pool forks) points prometheus_client at a per-worker directory, emptied first;
every process writes its samples there, the exporter in the main process sums them
(`MultiProcessCollector`), and a pool process that exits is marked dead (`mark_process_dead`).
Counters keep counting across pool restarts; the counts start from zero when the worker restarts
(Prometheus' rate() handles that).

The scrape-time gauges come from `FleetCollector`, which reads Redis and the database afresh at each
scrape; `register_fleet_collectors(registry, settings)` adds it to any registry (the worker's
exporter here; an API's /metrics too).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from config.settings import Settings
from workers.lease import ALIVE_KEY_PREFIX
from workers.ledger import PRIORITY_SEPARATOR, is_redis_url
from workers.queues import SHARED_QUEUES, WORKER_QUEUE_PREFIX

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DEDUP_LEVELS = ("manifest_hit", "layer_hit", "cross_repo_mount", "claim_wait")
# Seconds: from a small layer's prepare to a big image's metadata pass or a slow registry push.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# kombu's Redis transport keeps priorities 3, 6, 9 in lists of their own (workers/ledger.py).
PRIORITY_STEPS = (3, 6, 9)

CONVERSIONS = Counter("obdconv_conversions_total", "Requests that reached a final state, per output format",
                      ["state", "format"])
FAILURES = Counter("obdconv_failures_total", "Requests that ended with an error, by error class", ["error_class"])
DEDUP = Counter("obdconv_dedup_total", "Dedup outcomes by level", ["level"])
BYTES_READ = Counter("obdconv_bytes_read_total", "Source layer bytes downloaded", ["stage"])
BYTES_WRITTEN = Counter("obdconv_bytes_written_total", "Converted layer bytes uploaded", ["format"])
STAGE_SECONDS = Histogram("obdconv_stage_duration_seconds", "Duration of successful stage runs", ["stage"],
                          buckets=DURATION_BUCKETS)
CALLBACKS = Counter("obdconv_callbacks_total", "Completion callback attempts by outcome", ["outcome"])

F = TypeVar("F", bound=Callable[..., Any])


def _never_raises(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # metrics are advisory: never fail a conversion over them
            log.warning("metrics: %s failed: %s: %s", fn.__name__, type(e).__name__, e)
            return None

    return wrapper  # type: ignore[return-value]


@_never_raises
def count_final(state: str, formats: list[str], error_class: str = "") -> None:
    for fmt in formats or ["unknown"]:
        CONVERSIONS.labels(state, fmt).inc()
    if error_class:
        FAILURES.labels(error_class).inc()


@_never_raises
def count_dedup(level: str, n: int = 1) -> None:
    if n > 0:
        DEDUP.labels(level).inc(n)


@_never_raises
def count_bytes_read(stage: str, n: int) -> None:
    BYTES_READ.labels(stage).inc(max(n, 0))


@_never_raises
def count_bytes_written(fmt: str, n: int) -> None:
    BYTES_WRITTEN.labels(fmt).inc(max(n, 0))


@_never_raises
def count_callback(outcome: str) -> None:
    CALLBACKS.labels(outcome).inc()


@_never_raises
def observe_stage(stage: str, seconds: float) -> None:
    STAGE_SECONDS.labels(stage).observe(seconds)


@contextlib.contextmanager
def stage_timer(stage: str) -> Iterator[None]:
    """Observe the block's duration in obdconv_stage_duration_seconds when it completes (a failing
    or retried run is not a stage duration)."""
    start = time.monotonic()
    yield
    observe_stage(stage, time.monotonic() - start)


# --- scrape-time gauges ---------------------------------------------------------------------------


class FleetCollector(Collector):
    """Queue depths and live workers from the broker's Redis, live claims from the database, read
    at each scrape (short timeouts; a source that does not answer reports obdconv_fleet_scrape_ok 0)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: Any = None

    def _client(self) -> Any:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.settings.broker_url, socket_timeout=3, socket_connect_timeout=2)
        return self._redis

    def _queue_depths(self) -> dict[str, int]:
        client = self._client()
        names = list(SHARED_QUEUES)
        names += sorted({k.decode() for k in client.scan_iter(match=WORKER_QUEUE_PREFIX + "*", _type="list")
                         if PRIORITY_SEPARATOR.encode() not in k})
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.llen(name)
            for step in PRIORITY_STEPS:
                pipe.llen(f"{name}{PRIORITY_SEPARATOR}{step}")
        counts = pipe.execute()
        per = 1 + len(PRIORITY_STEPS)
        return {name: sum(counts[i * per:(i + 1) * per]) for i, name in enumerate(names)}

    def _live_workers(self) -> int:
        return sum(1 for _ in self._client().scan_iter(match=ALIVE_KEY_PREFIX + "*"))

    def _live_claims(self) -> int:
        from obdconv.dedup.claims import count_live
        from obdconv.dedup.db import connect_database, parse_db_config

        # Its own short-lived connection: never the proxy the pool processes' tasks use, and never a
        # connection a forked pool process could inherit.
        db = connect_database(parse_db_config(self.settings.db_type, self.settings.db_str))
        try:
            db.connect()
            if not db.table_exists("obdconv_claims"):
                return 0
            return count_live(db)
        finally:
            db.close()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ok = GaugeMetricFamily("obdconv_fleet_scrape_ok", "1 when the source answered this scrape's queries",
                               labels=["source"])
        if is_redis_url(self.settings.broker_url):
            try:
                depths, workers = self._queue_depths(), self._live_workers()
            except Exception as e:
                log.warning("metrics: cannot read queue depths from Redis: %s: %s", type(e).__name__, e)
                self._redis = None
                ok.add_metric(["redis"], 0)
            else:
                ok.add_metric(["redis"], 1)
                depth = GaugeMetricFamily("obdconv_queue_depth", "Messages waiting in a queue", labels=["queue"])
                for name, count in depths.items():
                    depth.add_metric([name], count)
                yield depth
                yield GaugeMetricFamily("obdconv_live_workers", "Workers whose liveness key is fresh", value=workers)
        if self.settings.db_type:
            try:
                claims = self._live_claims()
            except Exception as e:
                log.warning("metrics: cannot count live claims: %s: %s", type(e).__name__, e)
                ok.add_metric(["database"], 0)
            else:
                ok.add_metric(["database"], 1)
                yield GaugeMetricFamily("obdconv_live_claims", "Dedup claims held right now", value=claims)
        yield ok


def register_fleet_collectors(registry: CollectorRegistry, settings: Settings) -> FleetCollector:
    """Add the scrape-time fleet gauges to `registry` (a worker's exporter, or an API's /metrics)."""
    collector = FleetCollector(settings)
    registry.register(collector)
    return collector


# --- the worker's exporter --------------------------------------------------------------------------


def metrics_dir_for(settings: Settings, nodename: str) -> Path:
    base = Path(settings.metrics_dir) if settings.metrics_dir else Path(tempfile.gettempdir()) / "obdconv-metrics"
    return base / re.sub(r"[^A-Za-z0-9_.@-]", "_", nodename)


def enable_multiprocess(directory: Path) -> None:
    """Make every metric sample created from now on (in this process and the processes it forks)
    live in `directory`, emptied first: what a previous run of this worker left is not ours."""
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob("*.db"):
        leftover.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    # prometheus_client picks its value class at import; samples are created lazily (every metric
    # here has labels), so switching now covers all of them.
    values.ValueClass = values.MultiProcessValue()


def mark_process_dead(pid: int) -> None:
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, directory)


def start_exporter(settings: Settings, directory: Path) -> Any:
    """Serve /metrics of this worker (all its processes, plus the fleet gauges) on
    settings.metrics_address:metrics_port from a daemon thread; returns the server."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    register_fleet_collectors(registry, settings)
    server, _thread = start_http_server(settings.metrics_port, settings.metrics_address, registry)
    return server
