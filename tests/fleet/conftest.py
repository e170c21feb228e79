"""Fleet test fixtures: real Redis, real docker-registry, SQLite, two workers (separate processes,
different node names) and Flower, all on 127.0.0.1 and stopped at the end even on failure."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from config.settings import load_settings
from obdconv.client import status, submit, wait
from obdconv.request import ConversionRequest
from tests.services.base import ManagedProcess
from tests.services.flower import FlowerServer
from tests.services.redis import RedisServer
from tests.services.registry import BASIC_PASSWORD, BASIC_USER, RegistryService, start_registry
from workers.app import create_app
from workers.lease import alive_key
from workers.sample_image import build_sample_image

ROOT = Path(__file__).resolve().parents[2]
CREDENTIAL_REF = "test-private"
LEASE_SECONDS = 18  # the shortest allowed (workers.app.min_lease_seconds): a killed worker's task comes back soon


def push_layout(layout: Path, tag: str, dest: str, creds: str = "") -> None:
    """Copy `oci:layout:tag` to `docker://dest` with skopeo (all platforms, digests preserved)."""
    argv = ["skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false", "-q"]
    if creds:
        argv += ["--dest-creds", creds]
    subprocess.run([*argv, f"oci:{layout}:{tag}", f"docker://{dest}"], check=True, capture_output=True, timeout=60)


@dataclass
class Fleet:
    workdir: Path
    redis: RedisServer
    env: dict[str, str]
    app: Celery
    workers: dict[str, ManagedProcess] = field(default_factory=dict)
    flower: FlowerServer | None = None

    def worker_process(self, name: str, concurrency: int = 2,
                       extra_env: dict[str, str] | None = None) -> ManagedProcess:
        nodename = f"{name}@fleettest"
        client = self.redis.client(0)
        client.delete(alive_key(nodename))
        return ManagedProcess(
            name, [sys.executable, "-m", "obdconv", "worker", "--hostname", nodename, "--concurrency",
                   str(concurrency), "--loglevel", "INFO"],
            self.workdir / "logs", ready=lambda: bool(client.exists(alive_key(nodename))),
            env={**self.env, **(extra_env or {}), "PYTHONPATH": str(ROOT)}, timeout=60,
        )

    def start_worker(self, name: str, concurrency: int = 2,
                     extra_env: dict[str, str] | None = None) -> ManagedProcess:
        proc = self.worker_process(name, concurrency, extra_env).start()
        self.workers[name] = proc
        return proc

    def submit(self, request: ConversionRequest) -> str:
        return submit(request, app=self.app)

    def wait(self, request_id: str, timeout: float = 120) -> dict[str, Any]:
        return wait(request_id, timeout, app=self.app, poll=0.2)

    def status(self, request_id: str) -> dict[str, Any]:
        return status(request_id, app=self.app)

    def runs(self, kind: str) -> dict[str, int]:
        raw = self.redis.client(1).hgetall(f"obdconv:runs:{kind}")
        return {k.decode(): int(v) for k, v in raw.items()}

    def verify(self, converted: str, source: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "obdconv", "verify", "--plain", converted, "--source", source],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)

    def flower_tasks(self) -> dict[str, dict[str, Any]]:
        assert self.flower is not None
        return self.flower.api("/api/tasks")

    def broker_state(self) -> str:
        """Every key of the broker (db 0) and result backend (db 1), for a failure message."""
        lines = []
        for db in (0, 1):
            client = self.redis.client(db)
            for key in sorted(client.scan_iter()):
                kind = client.type(key).decode()
                size = {"list": client.llen, "hash": client.hlen, "zset": client.zcard, "set": client.scard,
                        "string": client.strlen}[kind](key)
                lines.append(f"db{db} {kind:6} {size:6} {key.decode(errors='replace')}")
        return "\n".join(lines)

    def logs_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in (self.workdir / "logs").glob("*.log"))


@pytest.fixture(scope="module")
def private_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryService]:
    workdir = tmp_path_factory.mktemp("private-registry")
    with start_registry(workdir, auth="htpasswd", name="private-registry") as service:
        yield service


def fleet_env(workdir: Path, redis: RedisServer, credentials: Path, **overrides: str) -> dict[str, str]:
    return {
        "OBDCONV_BROKER_URL": redis.url(0),
        "OBDCONV_RESULT_BACKEND": redis.url(1),
        "OBDCONV_DB_TYPE": "sqlite",
        "OBDCONV_DB_STR": str(workdir / "fleet.sqlite"),
        "OBDCONV_SPOOL_DIR": str(workdir / "spool"),
        "OBDCONV_CREDENTIALS_FILE": str(credentials),
        "OBDCONV_LEASE_SECONDS": str(LEASE_SECONDS),
        "OBDCONV_RETRY_BACKOFF_MAX": "4",
        **overrides,
    }


@contextlib.contextmanager
def running_fleet(workdir: Path, credentials: dict[str, dict[str, str]], *, flower: bool = True,
                  workers: Sequence[str] = ("w1", "w2"), redis: RedisServer | None = None,
                  worker_env: dict[str, dict[str, str]] | None = None, **env_overrides: str) -> Iterator[Fleet]:
    """Redis (unless the caller owns one) + `workers` (+ Flower), stopped at the end even on failure.
    `worker_env`: settings of one worker only, by name (e.g. each its own metrics port)."""
    own_redis = redis is None
    redis = redis or RedisServer(workdir / "redis").start()
    credentials_file = workdir / "credentials.json"
    credentials_file.write_text(json.dumps(credentials))
    os.chmod(credentials_file, 0o600)
    env = fleet_env(workdir, redis, credentials_file, **env_overrides)
    fleet = Fleet(workdir, redis, env, create_app(load_settings(env=env)))
    try:
        for name in workers:
            fleet.start_worker(name, extra_env=(worker_env or {}).get(name))
        if flower:
            fleet.flower = FlowerServer(workdir / "logs", env).start()
        yield fleet
    finally:
        if fleet.flower is not None:
            fleet.flower.stop()
        for proc in fleet.workers.values():
            proc.stop(timeout=15)
        if own_redis:
            redis.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, private_registry: RegistryService) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    creds = {CREDENTIAL_REF: {private_registry.host: f"{BASIC_USER}:{BASIC_PASSWORD}"}}
    with running_fleet(workdir, creds) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout with the test images (built once per module)."""
    layout = tmp_path_factory.mktemp("images") / "layout"
    build_sample_image(layout, "multi", layers=4, file_bytes=3 << 20, seed=11)
    build_sample_image(layout, "index", layers=2, file_bytes=256 << 10, seed=12, platforms=("amd64", "arm64"))
    build_sample_image(layout, "big", layers=6, file_bytes=3 << 20, seed=13)
    for n in range(5):
        build_sample_image(layout, f"shared{n}", layers=3, file_bytes=1 << 20, seed=100 + n, shared_layers=2)
    build_sample_image(layout, "private", layers=2, file_bytes=128 << 10, seed=14)
    build_sample_image(layout, "both", layers=2, file_bytes=128 << 10, seed=15)
    return layout


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
