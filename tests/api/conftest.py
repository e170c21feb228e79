"""Fixtures of the HTTP API tests: real Redis, SQLite, docker-registry and the API itself as
uvicorn processes on 127.0.0.1 (two replicas sharing Redis and the database). Workers only where a
test needs conversions to run (test_e2e_events.py, through tests/fleet/conftest.py's `running_fleet`)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.services.api import ApiServer, write_api_files
from tests.services.redis import RedisServer
from tests.services.registry import RegistryService, start_registry

TOKEN_TEAM = "tok-team-4d1c0e5b9a7f2e63"  # may use 127.0.0.1:*/{team,e2e,manual}/* (no rule for manual/*)
TOKEN_OTHER = "tok-other-8b2f6a1d3c9e0f47"  # may use 127.0.0.1:*/other/*
TOKEN_LIMITED = "tok-limited-5e9a2c7b1d3f8064"  # a tight rate limit is shared by the replicas
DISTRIBUTION_SECRET = "Bearer dist-secret-0c3a9f2e"
HARBOR_SECRET = "Basic aGFyYm9yOmhvb2stc2VjcmV0"
LIMITED_RATE = 5  # requests per RATE_WINDOW of TOKEN_LIMITED
RATE_WINDOW = 3600


def tokens() -> list[dict[str, Any]]:
    return [{"name": "team", "token": TOKEN_TEAM,
             "repositories": ["127.0.0.1:*/team/*", "127.0.0.1:*/e2e/*", "127.0.0.1:*/manual/*"]},
            {"name": "other", "token": TOKEN_OTHER, "repositories": ["127.0.0.1:*/other/*"]},
            {"name": "limited", "token": TOKEN_LIMITED, "repositories": ["127.0.0.1:*/limited/*"],
             "rate_limit": LIMITED_RATE}]


RULES = """
[[rules]]
name = "team"
repository = "team/*"
overlaybd_tag = "{tag}-obd"
turbo_tag = "{tag}-turbo"

[[rules]]
name = "e2e"
repository = "e2e/*"
overlaybd_tag = "{tag}-obd"

[[rules]]
name = "harbor"
repository = "hb/*"
overlaybd_tag = "{tag}-obd"
plain = true

[[rules]]
name = "long"
repository = "long/*"
overlaybd_tag = "{tag}-converted-by-obdconv"
"""


@dataclass
class Intake:
    """An API without workers: two replicas, their Redis and database, a registry to push to."""

    workdir: Path
    redis: RedisServer
    registry: RegistryService
    apis: list[ApiServer]
    env: dict[str, str]

    @property
    def api(self) -> ApiServer:
        return self.apis[0]

    def queued(self) -> int:
        """Messages waiting in the fleet's `control` queue (nothing consumes them here)."""
        return int(self.redis.client(0).llen("control"))

    def rows(self) -> list[dict[str, Any]]:
        with sqlite3.connect(self.env["OBDCONV_DB_STR"]) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM obdconv_requests")]

    def redis_dump(self) -> str:
        """Every key and value of the broker and result backend databases, as text."""
        out = []
        for db in (0, 1):
            client = self.redis.client(db)
            for key in client.scan_iter():
                out.append(f"{key!r} {redis_value(client, key)!r}")
        return "\n".join(out)


def redis_value(client: redis.Redis, key: bytes) -> Any:
    kind = client.type(key).decode()
    if kind == "string":
        return client.get(key)
    if kind == "hash":
        return client.hgetall(key)
    if kind == "list":
        return client.lrange(key, 0, -1)
    if kind == "set":
        return client.smembers(key)
    if kind == "zset":
        return client.zrange(key, 0, -1)
    return b""


def api_env(workdir: Path, server: RedisServer, **overrides: str) -> dict[str, str]:
    env = {"OBDCONV_BROKER_URL": server.url(0), "OBDCONV_RESULT_BACKEND": server.url(1),
           "OBDCONV_DB_TYPE": "sqlite", "OBDCONV_DB_STR": str(workdir / "status.sqlite"),
           "OBDCONV_CREDENTIALS_FILE": str(workdir / "credentials.json"), "OBDCONV_API_RATE_LIMIT": "1000",
           "OBDCONV_API_RATE_WINDOW": str(RATE_WINDOW)}
    env.update(write_api_files(workdir / "conf", tokens(), RULES,
                               {"distribution": DISTRIBUTION_SECRET, "harbor": HARBOR_SECRET}))
    env.update(overrides)
    return env


def start_all(servers: list[ApiServer]) -> None:
    """Start replicas at once (each takes seconds to import its libraries)."""
    with ThreadPoolExecutor(len(servers)) as pool:
        for future in [pool.submit(server.start) for server in servers]:
            future.result()


@pytest.fixture(scope="package")
def intake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Intake]:
    """Shared by the intake and event tests (each measures what it changed, not totals)."""
    workdir = tmp_path_factory.mktemp("api-intake")
    server = RedisServer(workdir / "redis").start()
    apis: list[ApiServer] = []
    registry = None
    try:
        registry = start_registry(workdir / "registry")
        env = api_env(workdir, server)
        apis = [ApiServer(workdir / "logs", env, name=f"api{n}") for n in range(2)]
        start_all(apis)
        yield Intake(workdir, server, registry, apis, env)
    finally:
        for api in apis:
            api.stop()
        if registry is not None:
            registry.stop()
        server.stop()


def flush_api_state(client: redis.Redis) -> None:
    for key in client.scan_iter(match="obdconv:api:*"):
        client.delete(key)


def problem(response: Any) -> dict[str, Any]:
    """The RFC 9457 body of an error answer (and the checks every problem answer must pass)."""
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    body = json.loads(response.text)
    assert body["status"] == response.status_code
    assert body["type"] == "urn:obdconv:problem:" + body["error_class"]
    assert body["detail"]
    return body
