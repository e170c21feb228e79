"""Progress of a running conversion: per task in Celery task state (Flower shows it) and per
request in a small Redis hash `obdconv:progress:<request_id>` in the result backend, which
`obdconv status` reads (fields `<stage>:<layer>` -> {"done", "total", "host"}); and per manifest in
`obdconv:manifests:<request_id>` (field: manifest digest -> {"stage", "platform", "layers": [digests]}),
which the HTTP API uses to group layer progress by manifest.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from typing import Any

import redis
from celery import Task
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tasks.context import settings
from workers.ledger import is_redis_url

PROGRESS_KEY_PREFIX = "obdconv:progress:"
MANIFESTS_KEY_PREFIX = "obdconv:manifests:"
MIN_INTERVAL = 0.5  # seconds between two updates of the same task (bounded broker/backend load)
RESTART_RETRIES = 20  # backoff 0.1 s doubling up to 1 s: Redis may be gone ~15 s


def progress_key(request_id: str) -> str:
    return PROGRESS_KEY_PREFIX + request_id


@lru_cache(maxsize=8)
def redis_client(url: str, outlast_restarts: bool = False) -> redis.Redis:
    """A (cached) Redis client. `outlast_restarts` (workers): a command that cannot reach Redis is
    tried again for ~15 s, as Celery's own result backend does, so a task in flight outlives a
    Redis restart (deploy/ runs it with an append-only file) instead of failing its request."""
    retry: dict[str, Any] = {}
    if outlast_restarts:
        retry = {"retry": Retry(ExponentialBackoff(cap=1.0, base=0.1), RESTART_RETRIES),
                 "retry_on_error": [redis.ConnectionError, redis.TimeoutError]}
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, **retry)


def client_for(url: str) -> redis.Redis | None:
    """A (cached) Redis client for a result backend URL; None when the backend is not Redis."""
    return redis_client(url) if is_redis_url(url) else None


def backend_client() -> redis.Redis | None:
    """The worker's client of the result backend (outlives a Redis restart)."""
    url = settings().result_backend
    return redis_client(url, outlast_restarts=True) if is_redis_url(url) else None


def manifests_key(request_id: str) -> str:
    return MANIFESTS_KEY_PREFIX + request_id


def read_progress(client: redis.Redis, request_id: str) -> dict[str, dict[str, Any]]:
    raw = client.hgetall(progress_key(request_id))
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def read_manifest_stages(client: redis.Redis, request_id: str) -> dict[str, dict[str, Any]]:
    raw = client.hgetall(manifests_key(request_id))
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def record_manifest_stage(job: dict[str, Any], stage: str) -> None:
    """The stage a manifest of the request is at, with its layers (advisory: never raises)."""
    manifest = job.get("manifest")
    client = backend_client()
    if not manifest or client is None or not job.get("request_id"):
        return
    descriptor = manifest.get("descriptor") or {}
    value = {"stage": stage, "platform": descriptor.get("platform"),
             "layers": [layer.get("digest") for layer in manifest.get("layers", [])]}
    try:
        key = manifests_key(job["request_id"])
        client.hset(key, descriptor.get("digest", ""), json.dumps(value))
        client.expire(key, settings().result_expires)
    except (redis.RedisError, OSError):
        pass


class ProgressReporter:
    """A `(done, total)` callback for one stage of one layer; throttled; never raises."""

    def __init__(self, task: Task, job: dict[str, Any], stage: str, layer: str = "") -> None:
        self.task = task
        self.request_id = job.get("request_id", "")
        self.stage = stage
        self.layer = layer
        self.last = 0.0

    def __call__(self, done: int, total: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < MIN_INTERVAL and done < total:
            return
        self.last = now
        meta = {"request_id": self.request_id, "stage": self.stage, "layer": self.layer,
                "bytes_done": done, "bytes_total": total, "host": self.task.request.hostname}
        try:
            if self.task.request.id:
                self.task.update_state(state="PROGRESS", meta=meta)
            client = backend_client()
            if client is not None and self.request_id:
                key = progress_key(self.request_id)
                field = f"{self.stage}:{self.layer}" if self.layer else self.stage
                client.hset(key, field, json.dumps({"done": done, "total": total,
                                                    "host": self.task.request.hostname}))
                client.expire(key, settings().result_expires)
        except (redis.RedisError, OSError):
            pass  # progress is advisory; never fail a conversion over it

    def done(self, total: int) -> None:
        self(total, total, force=True)
