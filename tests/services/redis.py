"""A real redis-server on 127.0.0.1 for tests (pytest plugin: `pytest_plugins = ["tests.services.redis"]`).

`redis_server` (session): one server, no persistence; tests use distinct database numbers or
flush what they use. `RedisServer.start(workdir)` for tests that need their own (e.g. to restart it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.services.base import LOCAL, ManagedProcess, Place, free_port


class RedisServer:
    """`place`: where it runs (default this machine; a netns host keeps its files in `data_dir`
    on that host, and is checked from there: the test process never dials a host itself).
    `appendonly=True`: the persistence deploy/ configures (append-only file, fsync every second),
    so a restart on the same `workdir` comes back with what was written."""

    def __init__(self, workdir: Path, port: int | None = None, place: Place = LOCAL,
                 data_dir: str = "", appendonly: bool = False) -> None:
        self.port = port or (free_port() if place is LOCAL else 6379)
        self.workdir = workdir
        self.place = place
        self.host = place.address
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if appendonly else ["--appendonly", "no"]
        self.process = ManagedProcess(
            f"redis-{self.port}",
            place.command(["redis-server", "--port", str(self.port), "--bind", self.host, "--save", "",
                           *persistence, "--dir", data_dir or str(workdir),
                           # off loopback, Redis without a password refuses clients unless told this
                           *(["--protected-mode", "no"] if place is not LOCAL else [])]),
            workdir, ready=self._ping, timeout=20,
        )

    def _ping(self) -> bool:
        if self.place is not LOCAL:
            return self.cli("PING") == "PONG"
        return bool(self.client().ping())

    def cli(self, *command: str, db: int = 0) -> str:
        """One command through redis-cli run at the server's place (--raw output, stripped)."""
        argv = ["redis-cli", "--raw", "-h", self.host, "-p", str(self.port), "-n", str(db), *command]
        return self.place.run(argv, timeout=30).stdout.decode().strip()

    def client(self, db: int = 0) -> redis.Redis:
        if self.place is not LOCAL:
            raise RuntimeError("the test process does not dial a netns host: use .cli(), run on its place")
        return redis.Redis(host=self.host, port=self.port, db=db, socket_timeout=5)

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

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
