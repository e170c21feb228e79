"""Small-to-medium byte payloads passed between tasks through the result backend's Redis, by key.

Entry lists (prepare -> metadata) and encoded ext4 metadata (metadata -> assemble) can reach
megabytes; carried as task arguments they would bloat broker messages and show in Flower. So a
task stores them under a key (expiring with results) and passes the key. Keys are content- or
request-scoped, so a redelivered task overwrites with the same bytes (idempotent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from obdconv.errors import NetworkError, NotFoundError
from tasks.context import settings
from tasks.progress import backend_client

if TYPE_CHECKING:  # redis is imported where used (worker side only)
    import redis

KEY_PREFIX = "obdconv:data:"


def _client() -> redis.Redis:
    client = backend_client()
    if client is None:
        raise NetworkError("task data transfer needs a Redis result backend (OBDCONV_RESULT_BACKEND)")
    return client


def put_bytes(key: str, data: bytes) -> str:
    import redis

    full = KEY_PREFIX + key
    try:
        _client().set(full, data, ex=settings().result_expires)
    except redis.RedisError as e:
        raise NetworkError(f"result backend: cannot store {key}: {e}") from e
    return full


def get_bytes(full_key: str) -> bytes:
    import redis

    try:
        data = _client().get(full_key)
    except redis.RedisError as e:
        raise NetworkError(f"result backend: cannot read {full_key}: {e}") from e
    if data is None:
        raise NotFoundError(f"task data {full_key} expired or was never stored")
    return bytes(data)
