"""`Idempotency-Key`: a retried POST gets the request id of the first one, on any replica.

The key (scoped by token name, so two clients never collide) maps in Redis to the request id and
a fingerprint of the request body: `obdconv:api:idempotency:<sha256(token name, key)>` ->
{"request_id", "fingerprint"}, for `api_idempotency_ttl` seconds. The first POST reserves it with
SET NX before anything is queued; a retry with the same body gets the same request id (and queues
nothing); the same key with a different body is refused (422). A POST whose enqueue failed gives
its reservation back, so its retry can go through.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import redis

from api.problems import Problem

IDEMPOTENCY_KEY_PREFIX = "obdconv:api:idempotency:"
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, as the IETF draft's examples

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class IdempotencyStore:
    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.client = client
        self.ttl = max(1, ttl)

    @staticmethod
    def _redis_key(scope: str, key: str) -> str:
        if not _KEY.match(key):
            raise Problem(400, "UsageError", "Idempotency-Key must be 1-255 visible ASCII characters")
        return IDEMPOTENCY_KEY_PREFIX + hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()

    def reserve(self, scope: str, key: str, body_fingerprint: str, request_id: str) -> str | None:
        """None: reserved for `request_id` (go on and enqueue). Otherwise the request id an earlier
        POST with this key and the same body got."""
        redis_key = self._redis_key(scope, key)
        value = json.dumps({"request_id": request_id, "fingerprint": body_fingerprint})
        if self.client.set(redis_key, value, nx=True, ex=self.ttl):
            return None
        raw = self.client.get(redis_key)
        if raw is None:  # expired in between: take it now
            return self.reserve(scope, key, body_fingerprint, request_id)
        earlier = json.loads(raw)
        if earlier["fingerprint"] != body_fingerprint:
            raise Problem(422, "UsageError", "this Idempotency-Key was used with a different request body; "
                          "use a new key for a new request")
        return str(earlier["request_id"])

    def release(self, scope: str, key: str, body_fingerprint: str, request_id: str) -> None:
        value = json.dumps({"request_id": request_id, "fingerprint": body_fingerprint})
        self.client.eval(_RELEASE_LUA, 1, self._redis_key(scope, key), value)
