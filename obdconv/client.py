"""A small Python client for the fleet: submit a conversion, read its status, wait for it.

    from obdconv.client import submit, status, wait
    request_id = submit(ConversionRequest("registry:5000/app", input_tag="v1", overlaybd_tag="v1-obd"))
    result = wait(request_id, timeout=600)   # {"state": "SUCCESS", "outputs": {...}, ...}

Final states: SUCCESS, FAILURE, CANCELLED, and PARTIAL: some requested format could not be built
(e.g. turboOCI for an image with a zstd layer) while the others were; each missing one is in `outputs`
as {"tag", "error": {"class", "message"}}. Ask `ConversionRequest(all_or_nothing=True)` to get FAILURE
instead. `mkfs=False` (with `base_layer`, a path on the workers) and `flatten=True` work as in
`obdconv convert`.

To be told when it ends instead of polling: `ConversionRequest(..., callback_url="https://ci.example/hook",
callback_secret_ref="ci-hooks")` (a signed POST from the fleet, see tasks/README.md; the key itself
stays on the workers), or subscribe to the Redis channel `obdconv:events`.

Requests go to the Celery task `obdconv.convert` by name (tasks/README.md documents the schema), so
this module needs only the Celery app's connection settings, not the task code. Credentials are
never sent: put a `credential_ref` in `request.access`; workers resolve it from their own config.
The request id is the id of the root task; the durable status record (obdconv.status) is written
here at submit time when a database is configured, and read back by `status`/`wait`.
"""

from __future__ import annotations

import ipaddress
import json
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from obdconv.errors import DatabaseError, UsageError
from obdconv.pipeline.validate import validate_request
from obdconv.request import ConversionRequest

if TYPE_CHECKING:
    from celery import Celery

FINAL = frozenset({"SUCCESS", "FAILURE", "CANCELLED", "PARTIAL", "REVOKED"})  # obdconv.status + Celery's


def _app(app: Celery | None) -> Celery:
    if app is not None:
        return app
    from workers.app import app as default_app  # the Celery app lives outside the core library

    return default_app


_bound_to: tuple[object, str, str] | None = None


def _status_db_ready(app: Celery) -> bool:
    """Bind the status model to the database in `app`'s settings (re-bound if something else in
    this process pointed the shared proxy elsewhere). False when no database is configured."""
    global _bound_to
    from obdconv.status import open_status_database, status_database
    from workers.app import settings_of

    s = settings_of(app)
    if not s.db_type:
        return False
    if _bound_to is None or _bound_to[0] is not status_database.obj or _bound_to[1:] != (s.db_type, s.db_str):
        db = open_status_database(s.db_type, s.db_str)
        _bound_to = (db, s.db_type, s.db_str)
    return True


def status_database_ready(app: Celery) -> bool:
    """Bind the durable status table for readers other than `status` (the HTTP API's listing)."""
    return _status_db_ready(app)


def source_of(request: ConversionRequest) -> str:
    ref = ":" + request.input_tag if request.input_tag else "@" + request.input_digest  # the tag wins
    return request.repository + ref


def is_loopback_host(host: str) -> bool:
    """`host` ("name", "name:port", "[v6]:port", "v6") names the machine it is used on."""
    name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host
    for candidate in (name, name.rsplit(":", 1)[0]):
        if candidate == "localhost" or candidate.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(candidate).is_loopback
        except ValueError:
            continue
    return False


def check_registry_for_fleet(request: ConversionRequest, broker_url: str) -> None:
    """Refuse a registry named by a loopback address when the workers are on other machines: the
    request would be read by each worker as its OWN machine's registry (nothing there, or another
    one). A fleet whose broker is on this machine (127.0.0.1) may use one."""
    from urllib.parse import urlparse

    from obdconv.registry.reference import parse_reference

    broker_host = urlparse(broker_url).hostname
    if not broker_host or is_loopback_host(broker_host):
        return
    for repository in (request.repository, request.output_repository):
        if not repository or repository.startswith("oci:"):
            continue
        host = parse_reference(repository).host
        if is_loopback_host(host):
            raise UsageError(f"{repository}: {host} would mean each worker's own machine (the fleet's broker is "
                             f"{broker_host}, so the workers are elsewhere); name the registry by an address "
                             "the workers reach")


def submit(request: ConversionRequest, *, request_id: str | None = None, app: Celery | None = None) -> str:
    """Enqueue a conversion; returns its request id (a UUID unless given)."""
    if not request.profiles():
        raise UsageError("nothing to do: give an output tag (overlaybd_tag and/or turbo_tag)")
    if not (request.input_tag or request.input_digest):
        raise UsageError("give an input tag or digest")
    validate_request(request)  # the local runner's checks, before anything is queued
    celery_app = _app(app)
    from workers.app import settings_of

    check_registry_for_fleet(request, settings_of(celery_app).broker_url)
    request_id = request_id or str(uuid.uuid4())
    body = request.to_dict()
    if _status_db_ready(celery_app):
        from obdconv.status import record_submitted

        record_submitted(request_id, source_of(request), body)
    from workers.queues import CONTROL, TASK_CONVERT

    celery_app.send_task(TASK_CONVERT, kwargs={"job": {"request_id": request_id, "request": body}},
                         task_id=request_id, queue=CONTROL,
                         kwargsrepr=json.dumps({"request_id": request_id, "source": source_of(request)}))
    return request_id


def _celery_state(celery_app: Celery, request_id: str) -> dict[str, Any]:
    meta = celery_app.backend.get_task_meta(request_id)
    state = meta.get("status", "PENDING")
    out: dict[str, Any] = {"celery_state": state}
    result = meta.get("result")
    if state == "SUCCESS" and isinstance(result, dict):
        out["outputs"] = result.get("outputs", result)
        # The task succeeded; the request may still be PARTIAL (some format impossible).
        out["request_state"] = result.get("state", "SUCCESS")
    elif state == "FAILURE":
        if isinstance(result, BaseException):
            out["error"] = {"class": type(result).__name__, "message": str(result)}
        elif isinstance(result, dict):
            out["error"] = {"class": result.get("exc_type", "Error"), "message": str(result.get("exc_message", ""))}
    return out


def status(request_id: str, *, app: Celery | None = None) -> dict[str, Any]:
    """State of a request: the durable record when a database is configured, merged with the live
    Celery state and per-layer progress from the result backend."""
    celery_app = _app(app)
    record: dict[str, Any] | None = None
    try:
        if _status_db_ready(celery_app):
            from obdconv.status import get_status

            record = get_status(request_id)
    except DatabaseError:
        record = None
    live: dict[str, Any] = {}
    progress: dict[str, Any] = {}
    try:
        live = _celery_state(celery_app, request_id)
        from tasks.progress import client_for, read_progress
        from workers.app import settings_of

        client = client_for(settings_of(celery_app).result_backend)
        if client is not None:
            progress = read_progress(client, request_id)
    except Exception as e:  # backend down or result expired: the durable record still answers
        live = {"celery_state": "UNKNOWN", "backend_error": f"{type(e).__name__}: {e}"}
    out: dict[str, Any] = dict(record or {"request_id": request_id, "state": "UNKNOWN", "stage": "",
                                           "outputs": {}, "error": None})
    cstate = live.get("celery_state", "PENDING")
    if out["state"] not in ("SUCCESS", "FAILURE", "CANCELLED", "PARTIAL"):  # obdconv.status.FINAL_STATES
        if cstate in ("SUCCESS", "FAILURE"):
            out["state"] = live.get("request_state", cstate)
            out["outputs"] = live.get("outputs", out.get("outputs", {}))
            out["error"] = live.get("error")
        elif record is None and cstate != "PENDING":
            out["state"] = "RUNNING"
        elif record is None:
            out["state"] = "PENDING"
    out["celery_state"] = cstate
    out["progress"] = progress
    return out


def wait(request_id: str, timeout: float | None = None, *, poll: float = 0.5, app: Celery | None = None,
         on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Poll `status` until the request finishes or `timeout` seconds pass (then the last status is
    returned with state still not final)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        current = status(request_id, app=app)
        if on_progress is not None:
            on_progress(current)
        if current["state"] in FINAL:
            return current
        if deadline is not None and time.monotonic() >= deadline:
            return current
        time.sleep(poll)
