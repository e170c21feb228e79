"""The bearer-token dependency of /v1/conversions: who is calling, and may they call again now.

401 (AuthError) without a valid token, 429 (NetworkError, `Retry-After`) past the token's rate
limit. The token itself is never logged or stored: only its name (request.state.token_name).
"""

from __future__ import annotations

import redis
from fastapi import Request

from api.problems import Problem
from api.service import Service
from api.tokens import ApiToken
from obdconv.errors import NetworkError


def authenticated(request: Request) -> ApiToken:
    service: Service = request.app.state.service
    token = service.tokens.authenticate(request.headers.get("authorization", ""))
    if token is None:
        raise Problem(401, "AuthError", "a valid bearer token is required (Authorization: Bearer <token>)",
                      headers={"WWW-Authenticate": 'Bearer realm="obdconv"'})
    try:
        allowed, retry_after = service.limiter.hit(token.name, token.rate_limit)
    except redis.RedisError as e:
        raise NetworkError(f"rate limit: Redis unreachable ({type(e).__name__})") from e
    if not allowed:
        service.metrics.rate_limited.labels(token.name).inc()
        raise Problem(429, "NetworkError", f"token {token.name!r} is over its rate limit of "
                                           f"{service.limiter.limit_of(token.rate_limit)} requests per {service.limiter.window} s",
                      headers={"Retry-After": str(retry_after)})
    request.state.token_name = token.name
    return token


def require_repository(token: ApiToken, repository: str, field: str) -> None:
    """403 unless the token's patterns allow `repository`."""
    if not token.allows(repository):
        raise Problem(403, "AuthError", f"token {token.name!r} may not use {field} {repository!r} "
                                        f"(its patterns: {', '.join(token.repositories)})")
