"""What every route of one API process shares: settings, the fleet's Celery app (for sending only),
Redis, the operator's files, the limits; and the two things every entry point does the same way:
check a repository name and enqueue a request.

Stateless: all shared state lives in Redis and the database, so any number of replicas answer alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis
from kombu.exceptions import OperationalError

from api.files import WatchedToml
from api.idempotency import IdempotencyStore
from api.metrics import ApiMetrics
from api.ratelimit import RateLimiter
from api.rules import RuleSet, rules_file
from api.secrets import EventSecrets, secrets_file
from api.tokens import TokenStore
from config.settings import Settings
from obdconv.errors import BadInputError, NetworkError, UsageError
from obdconv.registry.reference import parse_reference
from obdconv.request import ConversionRequest

log = logging.getLogger(__name__)


@dataclass
class Service:
    settings: Settings
    celery: Any  # workers.app's Celery app built from `settings`: the API only sends and reads results
    redis: redis.Redis  # the result backend's Redis: progress, cancel flags, the API's own keys
    broker: redis.Redis  # the broker's Redis: worker liveness keys
    tokens: TokenStore
    limiter: RateLimiter
    idempotency: IdempotencyStore
    metrics: ApiMetrics
    rules: WatchedToml[RuleSet]
    secrets: WatchedToml[EventSecrets]

    def rule_set(self) -> RuleSet:
        return self.rules.get()

    def event_secrets(self) -> EventSecrets:
        return self.secrets.get()


def build_service(settings: Settings) -> Service:
    from tasks.progress import client_for
    from workers.app import create_app as create_celery_app

    backend = client_for(settings.result_backend)
    if backend is None:
        raise UsageError("the HTTP API needs a Redis result backend (OBDCONV_RESULT_BACKEND=redis://...)")
    broker = redis.Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=3)
    return Service(
        settings=settings,
        celery=create_celery_app(settings),
        redis=backend,
        broker=broker,
        tokens=TokenStore(settings.api_tokens_file),
        limiter=RateLimiter(backend, settings.api_rate_limit, settings.api_rate_window),
        idempotency=IdempotencyStore(backend, settings.api_idempotency_ttl),
        metrics=ApiMetrics(),
        rules=rules_file(settings.api_rules_file),
        secrets=secrets_file(settings.api_event_secrets_file),
    )


def normalize_repository(value: str, field: str) -> str:
    """`value` as "host[:port]/name" (or `oci:PATH`), or a UsageError saying why it is not one."""
    try:
        ref = parse_reference(value)
    except BadInputError as e:
        raise UsageError(f"{field} {value!r} is not a repository: {e}") from None
    if ref.tag or ref.digest:
        raise UsageError(f"{field} {value!r} names a tag or digest; give the repository alone "
                         "(and the source as input_tag or input_digest)")
    return ref.name


def enqueue(service: Service, request: ConversionRequest, request_id: str) -> None:
    """Validate (the same checks as `obdconv submit`), write the PENDING row, send `obdconv.convert`."""
    from obdconv.client import submit

    try:
        submit(request, request_id=request_id, app=service.celery)
    except (OperationalError, redis.RedisError, ConnectionError) as e:
        raise NetworkError(f"cannot queue the request: the broker is unreachable ({type(e).__name__})") from e
