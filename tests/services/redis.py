"""A real redis-server on 127.0.0.1 for tests (pytest plugin: `pytest_plugins = ["tests.services.redis"]`).

`redis_server` (session): one server, no persistence; tests use distinct database numbers or
flush what they use. `RedisServer.start(workdir)` for tests that need their own (e.g. to restart it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.services.base import ManagedProcess, free_port


class RedisServer:
    """`appendonly=True`: the persistence deploy/ configures (append-only file, fsync every second),
    so a restart on the same `workdir` comes back with what was written."""

    def __init__(self, workdir: Path, port: int | None = None, appendonly: bool = False) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if appendonly else ["--appendonly", "no"]
        self.process = ManagedProcess(
            f"redis-{self.port}",
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *persistence, "--dir", str(workdir)],
            workdir, ready=self._ping, timeout=20,
        )

    def _ping(self) -> bool:
        return bool(self.client().ping())

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=5)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()
