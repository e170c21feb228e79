"""/healthz (the process answers) and /readyz (it can do its job: Redis, the database and at least
one live worker reachable). Not authenticated: they say nothing about requests.

Live workers are found by the fleet's liveness keys (`obdconv:alive:<nodename>`, refreshed by each
worker's lease keeper every lease/3 s, workers/lease.py): one SCAN of the broker's Redis, instead
of a Celery broadcast that would wait for replies.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.problems import Problem
from api.service import Service
from workers.lease import ALIVE_KEY_PREFIX

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_redis(client: Any) -> str:
    try:
        client.ping()
        return "ok"
    except Exception as e:
        return f"unreachable: {type(e).__name__}: {e}"


def _check_database(service: Service) -> str:
    from obdconv.client import status_database_ready
    from obdconv.status import status_database

    try:
        if not status_database_ready(service.celery):
            return "not configured (OBDCONV_DB_TYPE)"
        with status_database.connection_context():
            status_database.execute_sql("SELECT 1")
        return "ok"
    except Exception as e:
        return f"unreachable: {type(e).__name__}: {e}"


def _check_workers(service: Service) -> str:
    try:
        alive = [key for key in service.broker.scan_iter(match=ALIVE_KEY_PREFIX + "*", count=1000)]
    except Exception as e:
        return f"unknown (broker unreachable: {type(e).__name__})"
    return f"ok ({len(alive)} live)" if alive else "no live worker (no obdconv:alive:* key in the broker)"


@router.get("/readyz", summary="Redis, the database and at least one live worker are reachable")
def readyz(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    checks = {"broker": _check_redis(service.broker), "result_backend": _check_redis(service.redis),
              "database": _check_database(service), "workers": _check_workers(service)}
    failing = sorted(name for name, result in checks.items() if not result.startswith("ok"))
    if failing:
        return Problem(503, "NetworkError", f"not ready: {', '.join(failing)}", checks=checks).response("/readyz")
    return JSONResponse({"status": "ready", "checks": checks})
