"""What an interrupted run leaves behind, and how a later run tells it from live work and removes it.

A run killed with SIGKILL (or a machine losing power) runs no cleanup. Everything it would have
removed carries a mark of its owner that the kernel drops when the owner dies: an exclusive
`flock` on the file or directory itself (temporary files and directories being written), or on
the run's record file (the paths a run removes at its end). So a later run removes a leftover
only when

* no live process holds its lock (a flock is released when its holder dies, whatever the pid
  became since), and
* it was last modified before the sweeping run started (a temporary just created by another run,
  not yet locked, is never taken for a leftover).

Users: `OCILayoutRepository` (partial `.upload-*` blobs), the local runner (`RunRecord`: prepared
layers, metadata work directories, `.prep-*` spools being written).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

RECORD_PREFIX = ".obdconv-run-"


def hold(path: str | os.PathLike[str]) -> int:
    """An fd holding an exclusive flock on `path` (a file or a directory) until closed."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _unowned(path: Path) -> bool:
    """No live process holds `path`'s lock (checked by taking it for a moment)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def is_leftover(path: Path, started: float) -> bool:
    """Unlocked, and last modified before `started` (a time.time() value)."""
    try:
        modified = path.lstat().st_mtime
    except OSError:
        return False
    return modified < started and _unowned(path)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_leftovers(directory: Path, prefixes: Iterable[str], started: float) -> list[Path]:
    """Remove the entries of `directory` named with one of `prefixes` that are leftovers."""
    removed: list[Path] = []
    prefixes = tuple(prefixes)
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        path = directory / name
        if name.startswith(prefixes) and is_leftover(path, started):
            remove(path)
            removed.append(path)
    if removed:
        log.warning("removed %d leftover(s) of an interrupted run in %s", len(removed), directory)
    return removed


class RunRecord:
    """The paths one run removes at its end, listed (before each is made) in
    `<directory>/.obdconv-run-<pid>-<nonce>`, a file the run holds locked while it lives.

    `RunRecord.start(directory, *dirs)` first removes what dead runs recorded there (and their
    records), then starts this run's record; `directory` and `dirs` that do not exist yet are this
    run's to remove at its end if empty. `add(path)` lists a path to remove; `finish()` drops the
    record (the run removed its paths itself) and removes the directories it made if empty."""

    def __init__(self, path: Path, fd: int, made: list[Path]) -> None:
        self.path = path
        self._fd: int | None = fd
        self.made = made

    @classmethod
    def start(cls, directory: Path, *dirs: Path) -> RunRecord:
        inherited = sweep_records(directory)  # a dead run's directories not empty yet are ours to remove
        made = [d for d in (*dirs, directory) if not d.exists() or d.absolute() in inherited]  # innermost first
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{RECORD_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        record = cls(path, fd, made)
        for d in made:
            record._write(EMPTY_DIR_MARK, d)
        return record

    def add(self, path: Path) -> None:
        self._write("", path)

    def _write(self, mark: str, path: Path) -> None:
        if self._fd is not None:
            os.write(self._fd, (mark + str(Path(path).absolute()) + "\n").encode("utf-8", "surrogateescape"))

    def finish(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            release(self._fd)
            self._fd = None
            _remove_empty(self.made)


EMPTY_DIR_MARK = "?"  # record line prefix: remove this directory only if it is empty


def _remove_empty(directories: Iterable[Path]) -> None:
    for d in directories:
        with contextlib.suppress(OSError):
            d.rmdir()


def sweep_records(directory: Path) -> set[Path]:
    """Remove the paths listed by records in `directory` whose runs are dead, then the records.
    Returns the directories those runs made that are not empty yet (and so still there)."""
    left: set[Path] = set()
    try:
        names = [n for n in os.listdir(directory) if n.startswith(RECORD_PREFIX)]
    except OSError:
        return left
    for name in names:
        record = directory / name
        try:
            fd = os.open(record, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its run is alive
            lines = [x for x in record.read_bytes().decode("utf-8", "surrogateescape").splitlines() if x]
            paths = [Path(x) for x in lines if not x.startswith(EMPTY_DIR_MARK)]
            for path in paths:
                remove(path)
            record.unlink(missing_ok=True)
            made = [Path(x[len(EMPTY_DIR_MARK):]) for x in lines if x.startswith(EMPTY_DIR_MARK)]
            _remove_empty(made)
            left.update(d for d in made if d.exists())
            if paths:
                log.warning("removed %d leftover(s) of an interrupted run (%s)", len(paths), record)
        finally:
            os.close(fd)
    return left
