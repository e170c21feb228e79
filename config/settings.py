"""Fleet settings: documented defaults, overridden by an optional TOML file, overridden by the
environment (`OBDCONV_*`). Workers, the client and the CLI all read them through `load_settings()`.

| setting              | env                            | default                                   |
|----------------------|--------------------------------|-------------------------------------------|
| broker_url           | OBDCONV_BROKER_URL             | redis://127.0.0.1:6379/0                  |
| result_backend       | OBDCONV_RESULT_BACKEND         | redis://127.0.0.1:6379/1                  |
| db_type              | OBDCONV_DB_TYPE                | sqlite  ("sqlite" or "mysql"; "" = none)  |
| db_str               | OBDCONV_DB_STR                 | /var/lib/obdconv/obdconv.sqlite           |
| spool_dir            | OBDCONV_SPOOL_DIR              | /var/tmp/obdconv/spool                    |
| credentials_file     | OBDCONV_CREDENTIALS_FILE       | /etc/obdconv/credentials.json (optional)  |
| task_time_limit      | OBDCONV_TASK_TIME_LIMIT        | 7200 s (hard limit of the longest task)   |
| lease_seconds        | OBDCONV_LEASE_SECONDS          | 30 s (broker redelivery of a dead worker; >= 18) |
| result_expires       | OBDCONV_RESULT_EXPIRES         | 86400 s                                   |
| retry_max            | OBDCONV_RETRY_MAX              | 5 retries of a NetworkError               |
| retry_backoff_max    | OBDCONV_RETRY_BACKOFF_MAX      | 120 s                                     |
| worker_concurrency   | OBDCONV_WORKER_CONCURRENCY     | 0 (= number of CPUs)                      |
| claim_timeout        | OBDCONV_CLAIM_TIMEOUT          | 600 s (longest wait for another request's claim) |
| claim_ttl            | OBDCONV_CLAIM_TTL              | 300 s (a claim nobody heartbeats expires) |
| spool_max_bytes      | OBDCONV_SPOOL_MAX_BYTES        | 64 GiB per worker spool (0 = no limit)    |
| spool_max_age        | OBDCONV_SPOOL_MAX_AGE          | 172800 s since last use (0 = no limit)    |
| callback_secrets_file| OBDCONV_CALLBACK_SECRETS_FILE  | /etc/obdconv/callback-secrets.json (optional) |
| callback_retries     | OBDCONV_CALLBACK_RETRIES       | 8 retries of a failed callback POST       |
| callback_backoff     | OBDCONV_CALLBACK_BACKOFF       | 2 s before the first retry, doubled each time |
| callback_backoff_max | OBDCONV_CALLBACK_BACKOFF_MAX   | 600 s (longest wait between two attempts) |
| callback_timeout     | OBDCONV_CALLBACK_TIMEOUT       | 10 s to connect, and again to answer      |
| metrics_port         | OBDCONV_METRICS_PORT           | 0 (= no exporter) Prometheus port of a worker |
| metrics_address      | OBDCONV_METRICS_ADDRESS        | 0.0.0.0                                   |
| metrics_dir          | OBDCONV_METRICS_DIR            | "" (= <tmp>/obdconv-metrics/<nodename>)   |
| api_listen           | OBDCONV_API_LISTEN             | 127.0.0.1:8080 (`obdconv api`: host:port) |
| api_tokens_file      | OBDCONV_API_TOKENS_FILE        | /etc/obdconv/api-tokens.toml              |
| api_rate_limit       | OBDCONV_API_RATE_LIMIT         | 120 requests per token per window (0 = no limit) |
| api_rate_window      | OBDCONV_API_RATE_WINDOW        | 60 s                                      |
| api_idempotency_ttl  | OBDCONV_API_IDEMPOTENCY_TTL    | 86400 s an Idempotency-Key is remembered  |
| api_rules_file       | OBDCONV_API_RULES_FILE         | /etc/obdconv/api-rules.toml (optional)    |
| api_event_secrets_file | OBDCONV_API_EVENT_SECRETS_FILE | /etc/obdconv/api-event-secrets.toml     |
| api_distribution_header | OBDCONV_API_DISTRIBUTION_HEADER | Authorization                         |
| api_event_dedup_ttl  | OBDCONV_API_EVENT_DEDUP_TTL    | 604800 s a pushed digest is one request   |

Dedup claims (tasks/claims.py): a request claims each manifest and layer it converts; every task
of the request heartbeats its claims while it runs, so `claim_ttl` must exceed the longest time a
request's next task can wait in a queue (a longer wait lets another request take the claim over and
convert the same thing in parallel: wasted work, same bytes). A request waiting for another's
claim gives up after `claim_timeout` with ClaimTimeoutError (retried like any DatabaseError).

Completion callbacks (tasks/notify.py): one POST per final state, retried `callback_retries` times
after `callback_backoff` * 2^n seconds (jittered, at most `callback_backoff_max`); the HMAC key is
named by the request and resolved here (config/callback_secrets.py). Metrics (workers/metrics.py):
each worker's main process serves /metrics on `metrics_port`; its pool processes write their
samples under `metrics_dir` (Prometheus multiprocess mode), emptied when the worker starts, so two
workers on one machine need different ports and directories (the default directory is per node name).

Spool eviction (tasks/spool.py), after each prepare on that worker: prepared layers unused for
`spool_max_age`, then the least recently used ones until the spool is under `spool_max_bytes`.
A prepared layer some task is using right now (prepare, assemble) is never evicted; evicting one a
later assemble wanted only costs a re-prepare there (the assemble task falls back to it).

The HTTP API (`obdconv api`, api/README.md) reads all of the above (it submits and reads status
like the client) plus the `api_*` settings: where it listens; the bearer tokens file (TOML: per
token a name, the token's sha256 and the repository patterns it may use); the per-token rate limit
(shared by every replica through Redis); how long an `Idempotency-Key` maps to its request; the
registry-event rules file (TOML, api/rules.py); the event secrets file (TOML, mode 0600:
`distribution = "..."` compared with the header `api_distribution_header` of the registry's
notifications, `harbor = "..."` compared with the `Authorization` header Harbor sends); and how
long a pushed digest stays one request when its event is delivered again. No secret is a setting:
tokens and event secrets live in their own files.

The file is TOML with the same names as keys (top level or under `[obdconv]`); its path comes from
`OBDCONV_CONFIG_FILE` or the `path` argument. Secrets do not belong here: registry credentials live
in the credentials file (see config/credentials.py), database passwords in `db_str` of the worker's
own environment/file only.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from obdconv.errors import UsageError

ENV_PREFIX = "OBDCONV_"
CONFIG_FILE_ENV = "OBDCONV_CONFIG_FILE"


@dataclass(frozen=True, slots=True)
class Settings:
    # URLs and DSNs may carry passwords (redis://:pw@host, user:pw@tcp(...)): kept out of repr.
    broker_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    result_backend: str = field(default="redis://127.0.0.1:6379/1", repr=False)
    db_type: str = "sqlite"
    db_str: str = field(default="/var/lib/obdconv/obdconv.sqlite", repr=False)
    spool_dir: str = "/var/tmp/obdconv/spool"
    credentials_file: str = "/etc/obdconv/credentials.json"
    task_time_limit: int = 7200
    lease_seconds: int = 30
    result_expires: int = 86400
    retry_max: int = 5
    retry_backoff_max: int = 120
    worker_concurrency: int = 0
    claim_timeout: int = 600
    claim_ttl: int = 300
    spool_max_bytes: int = 64 << 30
    spool_max_age: int = 172800
    callback_secrets_file: str = "/etc/obdconv/callback-secrets.json"
    callback_retries: int = 8
    callback_backoff: int = 2
    callback_backoff_max: int = 600
    callback_timeout: int = 10
    metrics_port: int = 0
    metrics_address: str = "0.0.0.0"
    metrics_dir: str = ""
    api_listen: str = "127.0.0.1:8080"
    api_tokens_file: str = "/etc/obdconv/api-tokens.toml"
    api_rate_limit: int = 120
    api_rate_window: int = 60
    api_idempotency_ttl: int = 86400
    api_rules_file: str = "/etc/obdconv/api-rules.toml"
    api_event_secrets_file: str = "/etc/obdconv/api-event-secrets.toml"
    api_distribution_header: str = "Authorization"
    api_event_dedup_ttl: int = 604800

    @property
    def visibility_timeout(self) -> int:
        """The broker's visibility timeout = the lease a worker renews while it holds a message
        (workers/lease.py). A held message is never redelivered however long its task runs; a
        message held by a dead worker is redelivered `lease_seconds` after its last renewal."""
        return self.lease_seconds

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)


def _coerce(name: str, raw: Any, kind: type) -> Any:
    if kind is int:
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise UsageError(f"setting {name}: expected an integer, got {raw!r}") from None
    return str(raw)


def _field_types() -> dict[str, type]:
    # `from __future__ import annotations` makes field.type a string; map it back.
    return {f.name: int if f.type in ("int", int) else str for f in fields(Settings)}


def load_settings(path: str | os.PathLike[str] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Defaults <- TOML file (`path` or $OBDCONV_CONFIG_FILE, if given) <- environment."""
    env = os.environ if env is None else env
    types = _field_types()
    values: dict[str, Any] = {}
    file_path = path or env.get(CONFIG_FILE_ENV)
    if file_path:
        try:
            data = tomllib.loads(Path(file_path).read_text())
        except FileNotFoundError:
            raise UsageError(f"settings file {file_path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"settings file {file_path} is not valid TOML: {e}") from None
        section = data.get("obdconv", data)
        for key, raw in section.items():
            if key not in types:
                raise UsageError(f"settings file {file_path}: unknown setting {key!r}")
            values[key] = _coerce(key, raw, types[key])
    for name, kind in types.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw, kind)
    return Settings(**values)
