"""The worker's database: the dedup store and, bound to the same connection, the status table.

Opened once per process, after the fork (database connections must not cross processes), by the
pool's start-up hook (workers/startup.py) and again lazily by any task that needs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from obdconv.status import bind_status_database, status_database
from workers.app import app, settings_of

_db_pid: int | None = None
_store: Any = None


def open_worker_database() -> None:
    """Open the dedup store (and with it the status table) once per process (after a fork, again)."""
    global _db_pid, _store
    s = settings_of(app)
    if _db_pid == os.getpid() or not s.db_type:
        return
    from obdconv.dedup.store import open_store

    if s.db_type == "sqlite":
        Path(s.db_str).parent.mkdir(parents=True, exist_ok=True)
    _store = open_store(s.db_type, s.db_str, required=True)
    bind_status_database(status_database.obj)
    _db_pid = os.getpid()


def dedup_store() -> Any:
    """The worker's DedupStore (None without a database)."""
    open_worker_database()
    return _store
