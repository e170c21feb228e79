"""Eviction of a worker's spool (prepared layers), safe against tasks using them.

Layout of `<spool_dir>/<nodename>/`: one directory per prepared layer (`<spool key>/`, see
obdconv.pipeline.prepare), `.prep-*` directories of prepares in progress (or crashed), `scratch/`
(metadata passes; kept ones with `reserve`), and `.locks/<spool key>.lock`.

In use: a task using a prepared layer holds a SHARED flock on its lock file (`layer_in_use`) and
marks the layer used (mtime of its `prepared.json`). The evictor takes an EXCLUSIVE non-blocking
flock: it fails while any task holds the layer, so a layer in use is never evicted; a task arriving
after an eviction finds no spool and prepares again. Lock files are kept (a few bytes per layer):
removing one while another process opens it would let two processes lock different files.

Policy (settings `spool_max_age`, `spool_max_bytes`; 0 = no limit): evict layers not used for
`spool_max_age` seconds, then least recently used ones while the spool is above `spool_max_bytes`.
Leftover `.prep-*` and `scratch/*` entries older than `spool_max_age` are removed too.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCKS_DIR = ".locks"
MARKER = "prepared.json"


def _lock_path(spool: Path, key: str) -> Path:
    locks = spool / LOCKS_DIR
    locks.mkdir(parents=True, exist_ok=True)
    return locks / f"{key}.lock"


@contextlib.contextmanager
def layer_in_use(spool: Path, key: str) -> Iterator[None]:
    """Hold the prepared layer `key` against eviction for the block, and mark it used."""
    fd = os.open(_lock_path(spool, key), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits while an eviction of this layer is in progress
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.utime(spool / key / MARKER)  # last use = now (also when prepared just now)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    key: str
    size: int
    last_used: float


def _tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def spool_entries(spool: Path) -> list[SpoolEntry]:
    """The complete prepared layers in `spool`, least recently used first."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for child in spool.iterdir():
            if child.name.startswith(".") or child.name == "scratch" or not child.is_dir():
                continue
            try:
                used = (child / MARKER).stat().st_mtime
            except OSError:
                continue  # not a complete spool (being installed): not ours to judge
            out.append(SpoolEntry(child.name, _tree_size(child), used))
    return sorted(out, key=lambda e: (e.last_used, e.key))


def _evict(spool: Path, key: str) -> bool:
    """Remove prepared layer `key` unless a task holds it. True if removed."""
    fd = os.open(_lock_path(spool, key), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # in use
        # Rename first, so a reader never sees a half-deleted spool (load_prepared finds none).
        doomed = spool / f".evict-{key}-{os.getpid()}"
        try:
            os.rename(spool / key, doomed)
        except OSError:
            return False
        shutil.rmtree(doomed, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def _remove_stale_work(spool: Path, max_age: float, now: float) -> None:
    candidates = [p for p in spool.glob(".prep-*")] + [p for p in spool.glob(".evict-*")]
    candidates += list((spool / "scratch").glob("*")) if (spool / "scratch").is_dir() else []
    for path in candidates:
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > max_age:
                shutil.rmtree(path, ignore_errors=True)


def evict_spool(spool: Path, max_bytes: int, max_age: float, now: float | None = None) -> list[str]:
    """Apply the policy to `spool`; returns the keys evicted (oldest first)."""
    now = time.time() if now is None else now
    evicted: list[str] = []
    entries = spool_entries(spool)
    total = sum(e.size for e in entries)
    for entry in entries:  # least recently used first
        too_old = max_age > 0 and now - entry.last_used > max_age
        too_big = max_bytes > 0 and total > max_bytes
        if not (too_old or too_big):
            continue
        if _evict(spool, entry.key):
            evicted.append(entry.key)
            total -= entry.size
    if max_age > 0:
        _remove_stale_work(spool, max_age, now)
    if evicted:
        log.info("spool %s: evicted %d prepared layer(s), %d bytes left", spool, len(evicted), total)
    return evicted
