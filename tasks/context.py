"""What a task needs from the worker it runs on: settings, its node name and spool, the database,
and registry repositories opened with credentials resolved HERE (never sent in task arguments).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from config.credentials import credentials_resolver_for
from config.settings import Settings
from obdconv.errors import NotFoundError
from obdconv.registry import open_repository as open_registry_repository
from obdconv.registry.options import RegistryOptions
from obdconv.request import RegistryAccess
from workers.app import app, settings_of
from workers.startup import spool_dir_for


def settings() -> Settings:
    return settings_of(app)


def spool_dir(nodename: str) -> Path:
    return spool_dir_for(settings().spool_dir, nodename)


def registry_host(repository: str) -> str:
    """The host part of "host[:port]/name" ("" for an `oci:` layout, which needs no login)."""
    if repository.startswith("oci:"):
        return ""
    return repository.split("/", 1)[0]


def open_repository(repository: str, access: RegistryAccess, credentials_file: str | None = None) -> Any:
    """A Repository for `repository`, logged in with the worker's credentials for `access.credential_ref`
    (from `credentials_file`, default the settings': the HTTP API passes its own)."""
    resolver = credentials_resolver_for(registry_host(repository),
                                        settings().credentials_file if credentials_file is None else credentials_file)
    options = RegistryOptions.from_access(access, resolver)
    return open_registry_repository(repository, options)


def failure_message(exc: BaseException, request: dict[str, Any], node: str) -> str:
    """The message a failure is recorded with: which worker it happened on (a fleet spans machines),
    and why a path may be missing there."""
    message = f"{exc} (on worker {node})"
    paths = [r for r in (request.get("repository", ""), request.get("output_repository", "")) if r.startswith("oci:")]
    if isinstance(exc, NotFoundError) and paths:
        message += (f"; {' and '.join(paths)} is read or written by whichever worker runs each task: an oci: "
                    "layout must be on storage every worker mounts at the same path (or use a registry)")
    return message
