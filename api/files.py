"""Operator-managed TOML files (tokens, rules, event secrets), re-read when they change.

The operator edits the file in place (or a Secret/ConfigMap volume swaps it); every replica
notices within a second, with no restart. A file that turns invalid keeps the last good version
in force (logged); one invalid at start-up stops the API with a UsageError naming the problem.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from obdconv.errors import UsageError

log = logging.getLogger(__name__)

T = TypeVar("T")

# parse(data, path, mode) -> the file's meaning; raises UsageError naming what is wrong.
Parser = Callable[[dict[str, Any], Path, int], T]


def require_private(path: Path, mode: int, what: str) -> None:
    """Files holding secrets must be readable by their owner only (like ssh keys)."""
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"{what} {path} has mode {stat.S_IMODE(mode):o}; it holds secrets and must be 0600")


class WatchedToml(Generic[T]):
    def __init__(self, path: str | os.PathLike[str], parse: Parser[T], empty: T, what: str,
                 interval: float = 1.0) -> None:
        self.path = Path(path) if str(path) else None
        self.parse = parse
        self.empty = empty
        self.what = what
        self.interval = interval
        self._lock = threading.Lock()
        self._value = empty
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._load(first=True)

    def _signature(self) -> tuple[tuple[int, int, int], int] | None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size), st.st_mode

    def _load(self, first: bool = False) -> None:
        if self.path is None:
            return
        found = self._signature()
        if found is None:
            if self._stamp is not None or first:
                log.warning("%s %s does not exist: none configured", self.what, self.path)
            self._value, self._stamp = self.empty, None
            return
        stamp, mode = found
        if stamp == self._stamp:
            return
        try:
            data = tomllib.loads(self.path.read_text())
            value = self.parse(data, self.path, mode)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, UsageError) as e:
            message = e if isinstance(e, UsageError) else f"{self.what} {self.path} is not readable TOML: {e}"
            if first:
                raise UsageError(str(message)) from None
            log.error("%s; keeping the previous version", message)
            self._stamp = stamp  # do not re-read a broken file every second
            return
        self._value, self._stamp = value, stamp
        if not first:
            log.info("%s %s reloaded", self.what, self.path)

    def get(self) -> T:
        now = time.monotonic()
        if now - self._checked >= self.interval:
            with self._lock:
                if now - self._checked >= self.interval:
                    self._checked = now
                    self._load()
        return self._value
