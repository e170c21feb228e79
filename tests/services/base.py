"""Start real service processes on 127.0.0.1 for tests, wait until ready, stop them by pid.

Every service module under tests/services/ builds on `ManagedProcess`; fixtures in
tests/conftest.py own the lifetime (stopped at session end even when tests fail).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


class ServiceError(RuntimeError):
    pass


class Place(Protocol):
    """Where a service runs: this machine (`LOCAL`), or a host of tests/services/netns.py."""

    address: str  # what it binds and what clients dial

    def command(self, argv: Sequence[str]) -> list[str]: ...

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 120,
            env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]: ...

    def write_file(self, path: str, data: bytes) -> None: ...


class LocalPlace:
    """This machine, on 127.0.0.1."""

    address = "127.0.0.1"

    def command(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 120,
            env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout,
                                env={**os.environ, **(env or {})})
        if check and result.returncode != 0:
            raise ServiceError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr[-2000:]!r}")
        return result

    def write_file(self, path: str, data: bytes) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)


LOCAL = LocalPlace()


class ManagedProcess:
    """One child process with its own log file; `start()` waits for `ready()`; `stop()` by pid."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        workdir: Path,
        ready: Callable[[], bool],
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir
        self.ready = ready
        self.env = env
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{name}.log"

    def start(self) -> ManagedProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # the child owns it from here
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.workdir, env=env, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            with contextlib.suppress(Exception):
                if self.ready():
                    return self
            time.sleep(0.05)
        self.stop()
        raise ServiceError(f"{self.name} not ready after {self.timeout}s: {self.tail()}")

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (used by tests that kill a service mid-run)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.proc.wait(5)
