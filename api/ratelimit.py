"""Per-token rate limit, shared by every API replica through Redis.

A fixed window: `obdconv:api:rate:<token name>:<window number>` counts the token's requests in the
current window of `api_rate_window` seconds (INCR, expiring with the window); past `api_rate_limit`
(or the token's own `rate_limit`) the request is refused with 429 and `Retry-After` (the seconds left in the window). Fixed windows
allow a burst of up to twice the limit across a window boundary, which is fine for protecting the
fleet's queue from one runaway client; the count costs one round trip per request.
"""

from __future__ import annotations

import time

import redis

RATE_KEY_PREFIX = "obdconv:api:rate:"


class RateLimiter:
    def __init__(self, client: redis.Redis, limit: int, window: int) -> None:
        self.client = client
        self.limit = limit
        self.window = max(1, window)

    def limit_of(self, override: int | None) -> int:
        return self.limit if override is None else override

    def hit(self, name: str, override: int | None = None, now: float | None = None) -> tuple[bool, int]:
        """Count one request of token `name` (limit: `override`, or the default): (allowed, seconds
        until the window ends)."""
        limit = self.limit_of(override)
        if limit <= 0:
            return True, 0
        now = time.time() if now is None else now
        number = int(now // self.window)
        key = f"{RATE_KEY_PREFIX}{name}:{number}"
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, self.window + 1)
        count, _ = pipe.execute()
        retry_after = max(1, int((number + 1) * self.window - now + 0.999))
        return int(count) <= limit, retry_after
