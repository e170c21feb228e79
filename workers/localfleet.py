"""A whole fleet on this machine, for `obdconv fleet` and demos: Redis, the database (SQLite
file, or the MySQL/MariaDB named by the settings), N workers and Flower, each a child process
with its own log file in the fleet directory, stopped by pid in reverse order. If the fleet's own
process dies without stopping them (SIGKILL, a crash), the kernel sends each child SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from obdconv.errors import NetworkError, UsageError
from obdconv.interpreter import python_command
from obdconv.termination import signal_when_parent_dies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_bytes()[-n:].decode(errors="replace")
        return ""


@dataclass
class LocalFleet:
    directory: Path
    workers: int = 2
    concurrency: int = 1
    flower_user: str = "admin"
    flower_password: str = "obdconv"
    redis_port: int = 0
    flower_port: int = 0
    db_type: str = "sqlite"
    db_str: str = ""
    flower: bool = True
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).resolve()
        self.redis_port = self.redis_port or free_port()
        self.flower_port = self.flower_port or free_port()
        if self.db_type == "sqlite" and not self.db_str:
            self.db_str = str(self.directory / "obdconv.sqlite")

    def env(self) -> dict[str, str]:
        """The environment every fleet process (and a client talking to it) uses."""
        return {
            "OBDCONV_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "OBDCONV_RESULT_BACKEND": f"redis://127.0.0.1:{self.redis_port}/1",
            "OBDCONV_DB_TYPE": self.db_type,
            "OBDCONV_DB_STR": self.db_str,
            "OBDCONV_SPOOL_DIR": str(self.directory / "spool"),
        }

    def _spawn(self, name: str, argv: list[str], ready_port: int | None = None, timeout: float = 30) -> Child:
        log_path = self.directory / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.directory, env={**os.environ, **self.env()},
                                    start_new_session=True, preexec_fn=signal_when_parent_dies(signal.SIGTERM))
        child = Child(name, proc, log_path)
        self.children.append(child)
        if ready_port is not None:
            deadline = time.monotonic() + timeout
            while not _port_open(ready_port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise NetworkError(f"{name} did not start: {child.tail()}")
                time.sleep(0.1)
        return child

    def start(self) -> LocalFleet:
        if self.workers < 1:
            raise UsageError("a fleet needs at least one worker")
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._start_children()
        except BaseException:  # e.g. a worker that exits at start, or SIGTERM: stop what did start
            self.stop()
            raise
        return self

    def _start_children(self) -> None:
        self._spawn("redis", ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
                    ready_port=self.redis_port)
        for i in range(1, self.workers + 1):
            self._spawn(f"worker{i}", python_command("-m", "obdconv", "worker", "--hostname", f"w{i}@%h",
                                                     "--concurrency", str(self.concurrency)))
        if self.flower:
            self._spawn("flower", python_command("-m", "obdconv", "flower", "--address=127.0.0.1",
                                                 f"--port={self.flower_port}",
                                                 f"--basic-auth={self.flower_user}:{self.flower_password}"),
                        ready_port=self.flower_port)
        self.wait_for_workers()

    def wait_for_workers(self, timeout: float = 60) -> None:
        import redis

        from workers.lease import ALIVE_KEY_PREFIX

        client = redis.Redis(host="127.0.0.1", port=self.redis_port, db=0)
        deadline = time.monotonic() + timeout
        while len(client.keys(ALIVE_KEY_PREFIX + "*")) < self.workers:
            for child in self.children:
                if child.proc.poll() is not None:
                    raise NetworkError(f"{child.name} exited: {child.tail()}")
            if time.monotonic() > deadline:
                raise NetworkError("workers did not become ready in time")
            time.sleep(0.2)

    def flower_url(self) -> str:
        return f"http://{self.flower_user}:{self.flower_password}@127.0.0.1:{self.flower_port}"

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGTERM)
                try:
                    child.proc.wait(15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.proc.pid, signal.SIGKILL)
                    child.proc.wait(5)
        self.children.clear()

    def __enter__(self) -> LocalFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
