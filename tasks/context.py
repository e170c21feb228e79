"""What a task needs from the worker it runs on: settings, its node name and spool, the database,
and registry repositories opened with credentials resolved HERE (never sent in task arguments).
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from config.credentials import credentials_resolver_for
from config.settings import Settings
from obdconv.pipeline.request import RegistryAccess
from obdconv.status import bind_status_database, status_database
from workers.app import app, settings_of
from workers.startup import spool_dir_for

_db_pid: int | None = None
_store: Any = None


def settings() -> Settings:
    return settings_of(app)


def open_worker_database() -> None:
    """Open the dedup store (and with it the status table) once per process (after a fork, again)."""
    global _db_pid, _store
    s = settings()
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


def spool_dir(nodename: str) -> Path:
    return spool_dir_for(settings().spool_dir, nodename)


def registry_host(repository: str) -> str:
    """The host part of "host[:port]/name" ("" for an `oci:` layout, which needs no login)."""
    if repository.startswith("oci:"):
        return ""
    return repository.split("/", 1)[0]


@lru_cache(maxsize=1)
def _open_repository_function() -> Any:
    for module_name in ("obdconv.registry", "obdconv.registry.repository", "obdconv.registry.open"):
        module = importlib.import_module(module_name)
        if hasattr(module, "open_repository"):
            return module.open_repository
    raise ImportError("obdconv.registry has no open_repository")


def open_repository(repository: str, access: RegistryAccess) -> Any:
    """A Repository for `repository`, logged in with the worker's credentials for `access.credential_ref`."""
    from obdconv.registry.options import RegistryOptions

    resolver = credentials_resolver_for(registry_host(repository), settings().credentials_file)
    options = RegistryOptions.from_access(access, resolver)
    return _open_repository_function()(repository, options)
