"""deploy/prometheus and deploy/grafana: the alert rules pass promtool's checks and unit tests, the
scrape config is valid, every dashboard query is valid PromQL, and every obdconv metric the rules
and the dashboard use is one the fleet exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from config.settings import load_settings
from tests.services.redis import RedisServer
from workers import metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "obdconv-dashboard.json"
PROMTOOL = shutil.which("promtool")

if PROMTOOL is None and os.environ.get("CI") == "true":
    raise RuntimeError("promtool is missing in CI: scripts/setup.sh installs Debian's prometheus package")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (scripts/setup.sh installs "
                                                              "Debian's prometheus package)")


def promtool(*args: str, cwd: Path = PROMETHEUS) -> str:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = [t["expr"] for p in panels for t in p["targets"]]
    assert queries and all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in panels)
    return queries


@needs_promtool
def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    assert "SUCCESS: 7 rules found" in promtool("check", "rules", "alerts.yml")
    promtool("test", "rules", "alerts.test.yml")
    promtool("check", "config", "prometheus.yml")


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": q}
                                                         for i, q in enumerate(dashboard_queries())]}]}
    (tmp_path / "queries.yml").write_text(json.dumps(rules))  # JSON is YAML
    assert f"SUCCESS: {len(rules['groups'][0]['rules'])} rules found" in promtool(
        "check", "rules", "queries.yml", cwd=tmp_path)


def exported_names(redis_server: RedisServer, tmp_path: Path) -> set[str]:
    names = set()
    for metric in (metrics.CONVERSIONS, metrics.FAILURES, metrics.DEDUP, metrics.BYTES_READ, metrics.BYTES_WRITTEN,
                   metrics.CALLBACKS):
        names.add(metric._name + "_total")
    names |= {metrics.STAGE_SECONDS._name + suffix for suffix in ("_bucket", "_count", "_sum")}
    registry = CollectorRegistry()
    metrics.register_fleet_collectors(registry, load_settings(env={
        "OBDCONV_BROKER_URL": redis_server.url(8), "OBDCONV_DB_TYPE": "sqlite",
        "OBDCONV_DB_STR": str(tmp_path / "db.sqlite")}))
    names |= {s.name for m in registry.collect() for s in m.samples}
    return names


def test_rules_and_dashboard_use_only_exported_metrics(redis_server: RedisServer, tmp_path: Path) -> None:
    exported = exported_names(redis_server, tmp_path)
    assert {"obdconv_queue_depth", "obdconv_live_workers", "obdconv_live_claims"} <= exported
    used = set(re.findall(r"\bobdconv_[a-z_]+", (PROMETHEUS / "alerts.yml").read_text()))
    used |= {m for q in dashboard_queries() for m in re.findall(r"\bobdconv_[a-z_]+", q)}
    assert used and used <= exported, used - exported
