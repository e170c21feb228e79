"""The metrics module without a fleet: the scrape-time fleet gauges against a real Redis and a real
SQLite claims table, a source that is down, and multiprocess counting across forked processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from config.settings import load_settings
from obdconv.dedup.store import open_store
from tests.services.base import free_port
from tests.services.redis import RedisServer
from workers.ledger import PRIORITY_SEPARATOR
from workers.metrics import register_fleet_collectors

ROOT = Path(__file__).resolve().parents[2]


def gauges(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in registry.collect() for s in m.samples}


def test_queue_depths_workers_and_claims_are_read_at_scrape_time(redis_server: RedisServer, tmp_path: Path) -> None:
    client = redis_server.client(7)
    client.flushdb()
    db_path = tmp_path / "fleet.sqlite"
    settings = load_settings(env={"OBDCONV_BROKER_URL": redis_server.url(7), "OBDCONV_DB_TYPE": "sqlite",
                                  "OBDCONV_DB_STR": str(db_path)})
    store = open_store("sqlite", str(db_path), required=True)
    try:
        registry = CollectorRegistry()
        register_fleet_collectors(registry, settings)
        empty = gauges(registry)
        assert empty[("obdconv_queue_depth", (("queue", "prepare"),))] == 0
        assert empty[("obdconv_live_workers", ())] == 0 and empty[("obdconv_live_claims", ())] == 0

        client.rpush("prepare", b"m1", b"m2")
        client.rpush(f"prepare{PRIORITY_SEPARATOR}6", b"m3")  # kombu's list for priority 6
        client.rpush("worker.w1@host", b"m4")
        client.set("obdconv:alive:w1@host", 1, ex=30)
        client.set("obdconv:alive:w2@host", 1, ex=30)
        assert store.claim("layer|h|c1|p", "fleet:r1:aa", ttl=60)
        assert store.claim("layer|h|c2|p", "fleet:r1:aa", ttl=60)
        assert store.claim("layer|h|c3|p", "fleet:r2:bb", ttl=-10)  # a lease that expired 10 s ago
        now = gauges(registry)
        assert now[("obdconv_queue_depth", (("queue", "prepare"),))] == 3
        assert now[("obdconv_queue_depth", (("queue", "worker.w1@host"),))] == 1
        assert now[("obdconv_queue_depth", (("queue", "control"),))] == 0
        assert now[("obdconv_live_workers", ())] == 2
        assert now[("obdconv_live_claims", ())] == 2
        assert now[("obdconv_fleet_scrape_ok", (("source", "redis"),))] == 1
        assert now[("obdconv_fleet_scrape_ok", (("source", "database"),))] == 1
    finally:
        store.close()
        client.flushdb()


def test_a_source_that_is_down_reports_zero_instead_of_failing_the_scrape(tmp_path: Path) -> None:
    settings = load_settings(env={"OBDCONV_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
                                  "OBDCONV_DB_TYPE": "mysql",
                                  "OBDCONV_DB_STR": f"u:p@tcp(127.0.0.1:{free_port()})/x?timeout=1s"})
    registry = CollectorRegistry()
    register_fleet_collectors(registry, settings)
    samples = gauges(registry)
    assert samples[("obdconv_fleet_scrape_ok", (("source", "redis"),))] == 0
    assert samples[("obdconv_fleet_scrape_ok", (("source", "database"),))] == 0
    assert not any(name == "obdconv_queue_depth" for name, _ in samples)


@pytest.mark.skipif(sys.platform != "linux", reason="fork-based multiprocess mode, as Celery's prefork pool")
def test_counts_of_forked_processes_add_up_in_the_parent(tmp_path: Path) -> None:
    # In a fresh interpreter: what the worker's main process does before its pool forks, then two
    # "pool processes" count and exit; the parent's exporter registry sees the sum.
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from prometheus_client import CollectorRegistry, multiprocess
        from workers import metrics
        directory = Path({str(tmp_path / 'mp')!r})
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"left over by a previous run")
        metrics.enable_multiprocess(directory)
        for n in (3, 4):
            pid = os.fork()
            if pid == 0:
                metrics.count_bytes_read("prepare", n)
                metrics.observe_stage("prepare", 0.2)
                os._exit(0)
            os.waitpid(pid, 0)
            metrics.mark_process_dead(pid)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(directory))
        got = {{(s.name, tuple(sorted(s.labels.items()))): s.value for m in registry.collect() for s in m.samples}}
        print(got[("obdconv_bytes_read_total", (("stage", "prepare"),))],
              got[("obdconv_stage_duration_seconds_count", (("stage", "prepare"),))])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["7.0", "2.0"]
