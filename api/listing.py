"""Reading requests back: one request's durable status with live progress, and the filtered,
paginated list, each limited to what the caller's token may see.

A token sees a request when its patterns allow the request's source repository (kept in the status
row's `request_json`). The list is ordered newest first by (submission time, request id), a total
order that does not change as requests progress, and paginated by an opaque cursor holding the
last item's key (keyset pagination: no item is skipped or shown twice while new requests arrive).
Token patterns and the repository filter narrow the SQL query by their literal prefix (a LIKE on
`source`); the exact glob is then applied to each row.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any

import peewee

from api.problems import Problem
from api.service import Service
from api.tokens import ApiToken
from obdconv.errors import DatabaseError, UsageError
from obdconv.status import FINAL_STATES, PENDING, RUNNING, ConversionStatus, status_database

STATES = (PENDING, RUNNING, *sorted(FINAL_STATES))
MAX_LIMIT = 500
_SORT = peewee.fn.COALESCE(ConversionStatus.submitted_at, ConversionStatus.started_at, 0.0)


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_since(value: str) -> float:
    """Unix seconds or an RFC 3339 / ISO 8601 time (UTC when it names no zone)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"since {value!r}: expected Unix seconds or an RFC 3339 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _literal_prefix(pattern: str) -> str:
    cut = min((i for i, c in enumerate(pattern) if c in "*?"), default=len(pattern))
    return pattern[:cut]


def repository_of(row: ConversionStatus) -> str:
    try:
        repository = json.loads(row.request_json or "{}").get("repository", "")
    except ValueError:
        repository = ""
    if repository:
        return str(repository)
    source = row.source or ""  # repository + ":tag" or "@digest" (obdconv.client.source_of)
    return source.rsplit("@", 1)[0] if "@" in source else source.rsplit(":", 1)[0]


def summary_of(row: ConversionStatus) -> dict[str, Any]:
    return {
        "request_id": row.request_id, "state": row.state, "stage": row.stage, "source": row.source,
        "submitted_at": rfc3339(row.submitted_at), "started_at": rfc3339(row.started_at),
        "finished_at": rfc3339(row.finished_at), "updated_at": rfc3339(row.updated_at),
        "outputs": json.loads(row.outputs_json or "{}"),
        "error": {"class": row.error_class, "message": row.error_message} if row.error_class else None,
        "status_url": f"/v1/conversions/{row.request_id}",
    }


def _bound(service: Service) -> None:
    from obdconv.client import status_database_ready

    if not status_database_ready(service.celery):
        raise Problem(503, "DatabaseError", "no status database is configured (OBDCONV_DB_TYPE)")


def visible_row(service: Service, token: ApiToken, request_id: str) -> ConversionStatus:
    """The request's status row if `token` may see it; 404 otherwise (whether it exists or not)."""
    _bound(service)
    try:
        with status_database.connection_context():
            row = ConversionStatus.get_or_none(ConversionStatus.request_id == request_id)
    except peewee.PeeweeException as e:
        raise DatabaseError(f"status database: cannot read {request_id}: {e}") from e
    if row is None or not token.allows(repository_of(row)):
        raise Problem(404, "NotFoundError", f"no conversion request {request_id!r} (for this token)")
    return row


def encode_cursor(sort_key: float, request_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([sort_key, request_id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        key, request_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return float(key), str(request_id)
    except (ValueError, TypeError, binascii.Error):
        raise UsageError("cursor: not a cursor this API returned") from None


def list_visible(service: Service, token: ApiToken, *, states: list[str], repository: str, since: float | None,
                 limit: int, cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the requests `token` may see, newest first, and the cursor of the next page."""
    for state in states:
        if state not in STATES:
            raise UsageError(f"state {state!r}: expected one of {', '.join(STATES)}")
    if not 1 <= limit <= MAX_LIMIT:
        raise UsageError(f"limit {limit}: expected 1..{MAX_LIMIT}")
    after = decode_cursor(cursor) if cursor else None
    _bound(service)
    query = ConversionStatus.select(ConversionStatus, _SORT.alias("sort_key"))
    if states:
        query = query.where(ConversionStatus.state.in_(states))
    if since is not None:
        query = query.where(_SORT >= since)
    if repository:  # source = repository + ":tag" or "@digest"
        query = query.where(ConversionStatus.source.startswith(repository + ":")
                            | ConversionStatus.source.startswith(repository + "@"))
    prefixes = sorted({_literal_prefix(p) for p in token.repositories})
    if all(prefixes):  # a pattern starting with a wildcard could match anything: no narrowing
        narrowed = ConversionStatus.source.startswith(prefixes[0])
        for prefix in prefixes[1:]:
            narrowed = narrowed | ConversionStatus.source.startswith(prefix)
        query = query.where(narrowed)
    batch = max(100, 2 * limit)
    found: list[ConversionStatus] = []
    try:
        with status_database.connection_context():
            while len(found) <= limit:
                page = query
                if after is not None:
                    page = page.where((_SORT < after[0])
                                      | ((_SORT == after[0]) & (ConversionStatus.request_id < after[1])))
                rows = list(page.order_by(_SORT.desc(), ConversionStatus.request_id.desc()).limit(batch))
                for row in rows:
                    after = (float(row.sort_key), row.request_id)
                    repo = repository_of(row)
                    if token.allows(repo) and (not repository or repo == repository):
                        found.append(row)
                        if len(found) > limit:
                            break
                if len(rows) < batch:
                    break
    except peewee.PeeweeException as e:
        raise DatabaseError(f"status database: cannot list requests: {e}") from e
    next_cursor = None
    if len(found) > limit:
        last = found[limit - 1]
        next_cursor = encode_cursor(float(last.sort_key), last.request_id)
    return [summary_of(row) for row in found[:limit]], next_cursor


def progress_of(layers: dict[str, dict[str, Any]], manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Group the per-layer progress hash (`<stage>:<layer>` -> {done, total, host}) by manifest
    (`obdconv:manifests:<id>`: digest -> {stage, platform, layers}); `done`/`total` of a manifest
    are the bytes its layers' prepare read so far / in all."""
    by_layer: dict[str, dict[str, Any]] = {}
    for field, value in layers.items():
        stage, _, layer = field.partition(":")
        by_layer.setdefault(layer, {})[stage] = value
    out: dict[str, Any] = {"manifests": [], "other": []}
    placed: set[str] = set()
    for digest, info in sorted(manifests.items()):
        entries = []
        done = total = 0
        for layer in info.get("layers") or []:
            stages = by_layer.get(layer, {})
            placed.add(layer)
            entries.append({"digest": layer, "stages": stages})
            done += int(stages.get("prepare", {}).get("done", 0))
            total += int(stages.get("prepare", {}).get("total", 0))
        out["manifests"].append({"digest": digest, "platform": info.get("platform"), "stage": info.get("stage", ""),
                                 "done": done, "total": total, "layers": entries})
    out["other"] = [{"digest": layer, "stages": stages} for layer, stages in sorted(by_layer.items())
                    if layer not in placed]
    return out


def status_of(service: Service, token: ApiToken, request_id: str) -> dict[str, Any]:
    """The durable status merged with the fleet's live state and progress (obdconv.client.status)."""
    import redis

    from obdconv.client import status
    from tasks.progress import read_manifest_stages

    visible_row(service, token, request_id)
    current = status(request_id, app=service.celery)
    try:
        manifests = read_manifest_stages(service.redis, request_id)
    except redis.RedisError:
        manifests = {}
    out = {key: current.get(key) for key in ("request_id", "state", "stage", "source", "outputs", "error",
                                             "celery_state")}
    for key in ("submitted_at", "started_at", "finished_at", "updated_at"):
        out[key] = rfc3339(current.get(key))
    out["status_url"] = f"/v1/conversions/{request_id}"
    out["progress"] = progress_of(current.get("progress") or {}, manifests)
    return out
