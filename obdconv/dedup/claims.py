"""Claims (leases) on in-flight conversions, so two workers never convert the same thing at once.

A claim is a row of `obdconv_claims(key, owner, expires_at, heartbeat_at, created_at)`:
* `try_claim` INSERTs the row; if the key exists it UPDATEs it only WHERE the lease has expired (or
  the caller already owns it). Both are single statements, so exactly one of any number of racing
  threads/processes/workers wins (the primary key, and the database's row lock for the UPDATE).
* Times are the DATABASE's clock (`UTC_TIMESTAMP(6)` on MySQL — UTC so the session time zone of a
  client cannot shift it; `strftime(... 'now')` on SQLite), never a worker's, so workers with skewed
  clocks agree on expiry.
* The holder heartbeats (`Lease` does it from a background thread every ttl/3) to extend the lease;
  a crashed holder stops heartbeating and its lease expires after `ttl`; anyone may then take it over.

Keys (see `layer_claim_key`, `manifest_claim_key`):
* layer: (registry host, source chain id, profile) — NOT the repository: a layer converted for one
  repository is reused by every other repository on that host through a cross-repo mount, so a second
  repository waits for the first instead of converting the same chain in parallel.
* manifest: (registry host, repository, source manifest digest, output media type, profile key incl.
  referrer mode) — per repository, because pushing a manifest is per repository.

Protocol for a converter (see `wait_for`):
    outcome = store.wait_for(key, owner, check_result, timeout)
    if outcome.result is not None: reuse it
    else:
        with outcome.lease:     # heartbeats while converting, releases at exit (also on error)
            convert, push, then record the result row BEFORE leaving the block,
            so waiters find the result instead of taking over and converting again.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Protocol, TypeVar

import peewee

from obdconv.dedup.db import dialect
from obdconv.errors import DatabaseError
from obdconv.request import ConversionProfile

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_KEY_LENGTH = 255
DEFAULT_TTL = 120.0


class ClaimTimeoutError(DatabaseError):
    """Waited `timeout` seconds for another worker's conversion of the same thing; retry later."""


def _bounded_key(kind: str, parts: list[str]) -> str:
    key = "|".join([kind, *parts])
    if len(key) <= MAX_KEY_LENGTH and key.isascii():
        return key
    # Rare (very long host/repository names): keep the key within the column, still unique.
    return f"{kind}|sha256:{hashlib.sha256(key.encode()).hexdigest()}"


def layer_claim_key(host: str, chain_id: str, profile: ConversionProfile) -> str:
    return _bounded_key("layer", [host, chain_id, profile.key()])


def manifest_claim_key(host: str, repo: str, src_digest: str, media_type: str, profile_key: str) -> str:
    return _bounded_key("manifest", [host, repo, src_digest, media_type, profile_key])


# --- SQL on the database clock -------------------------------------------------------------------


def _now(dialect_name: str) -> str:
    if dialect_name == "mysql":
        return "UTC_TIMESTAMP(6)"
    return "strftime('%Y-%m-%d %H:%M:%f', 'now')"


def _now_plus(dialect_name: str, seconds: float) -> str:
    # `seconds` is a float we format ourselves, so inlining it cannot inject SQL.
    if dialect_name == "mysql":
        return f"(UTC_TIMESTAMP(6) + INTERVAL {round(seconds * 1_000_000)} MICROSECOND)"
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', '{seconds:+.3f} seconds')"


def _sql(db: peewee.Database, template: str) -> str:
    """Template with `{p}` for parameters and `{k}` for the quoted `key` column (a reserved word)."""
    d = dialect(db)
    return template.replace("{p}", "%s" if d == "mysql" else "?").replace("{k}", "`key`" if d == "mysql" else '"key"')


def try_claim(db: peewee.Database, key: str, owner: str, ttl: float) -> bool:
    """Take the lease on `key` for `ttl` seconds if it is free, expired, or already ours."""
    d = dialect(db)
    try:
        db.execute_sql(_sql(db, "INSERT INTO obdconv_claims ({k}, owner, expires_at, heartbeat_at, created_at) "
                                f"VALUES ({{p}}, {{p}}, {_now_plus(d, ttl)}, {_now(d)}, {_now(d)})"), (key, owner))
        return True
    except peewee.IntegrityError:
        pass  # held (or held once): take it over only if expired
    cursor = db.execute_sql(_sql(db, f"UPDATE obdconv_claims SET owner = {{p}}, expires_at = {_now_plus(d, ttl)}, "
                                     f"heartbeat_at = {_now(d)}, created_at = {_now(d)} "
                                     f"WHERE {{k}} = {{p}} AND (expires_at < {_now(d)} OR owner = {{p}})"),
                            (owner, key, owner))
    return cursor.rowcount == 1


def heartbeat(db: peewee.Database, key: str, owner: str, ttl: float) -> bool:
    """Extend our lease to now + ttl. False: the lease is no longer ours (taken over or released)."""
    d = dialect(db)
    cursor = db.execute_sql(_sql(db, f"UPDATE obdconv_claims SET expires_at = {_now_plus(d, ttl)}, "
                                     f"heartbeat_at = {_now(d)} WHERE {{k}} = {{p}} AND owner = {{p}}"),
                            (key, owner))
    return cursor.rowcount == 1


def heartbeat_many(db: peewee.Database, keys: list[str], owner: str, ttl: float) -> int:
    """`heartbeat` of several of our leases in one statement (a task holding all of a request's
    claims: one query, not one per claim). Returns how many are still ours."""
    if not keys:
        return 0
    d = dialect(db)
    marks = ", ".join(["{p}"] * len(keys))
    cursor = db.execute_sql(_sql(db, f"UPDATE obdconv_claims SET expires_at = {_now_plus(d, ttl)}, "
                                     f"heartbeat_at = {_now(d)} WHERE {{k}} IN ({marks}) AND owner = {{p}}"),
                            (*keys, owner))
    return int(cursor.rowcount)


def release(db: peewee.Database, key: str, owner: str) -> bool:
    """Drop our lease. False when it was not ours any more."""
    cursor = db.execute_sql(_sql(db, "DELETE FROM obdconv_claims WHERE {k} = {p} AND owner = {p}"), (key, owner))
    return cursor.rowcount == 1


def release_owners(db: peewee.Database, owner_prefix: str) -> int:
    """Drop every lease whose owner starts with `owner_prefix` (a cancelled fleet request's claims,
    held under one owner per manifest). Returns how many were dropped."""
    # '!' escapes LIKE's wildcards: a backslash would need different quoting in MySQL and SQLite.
    pattern = owner_prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"
    cursor = db.execute_sql(_sql(db, "DELETE FROM obdconv_claims WHERE owner LIKE {p} ESCAPE '!'"), (pattern,))
    return int(cursor.rowcount)


@dataclass(frozen=True)
class ClaimHolder:
    owner: str
    seconds_left: float  # by the database clock; negative once expired


def holder(db: peewee.Database, key: str) -> ClaimHolder | None:
    """Who holds `key` and for how long still (database clock)."""
    d = dialect(db)
    if d == "mysql":
        sql = "SELECT owner, TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at) / 1e6 FROM obdconv_claims WHERE `key` = %s"
    else:
        sql = ("SELECT owner, (julianday(expires_at) - julianday('now')) * 86400.0 "
               'FROM obdconv_claims WHERE "key" = ?')
    row = db.execute_sql(sql, (key,)).fetchone()
    return ClaimHolder(row[0], float(row[1])) if row is not None else None


def count_live(db: peewee.Database) -> int:
    """How many claims are held right now (not expired by the database clock): for monitoring."""
    row = db.execute_sql(f"SELECT COUNT(*) FROM obdconv_claims WHERE expires_at >= {_now(dialect(db))}").fetchone()
    return int(row[0])


# --- leases held by this process -----------------------------------------------------------------


class ClaimBackend(Protocol):
    """What `Lease`/`wait_for` need; `DedupStore` implements it (degrading when the DB is down)."""

    def claim(self, key: str, owner: str, ttl: float = DEFAULT_TTL) -> bool: ...
    def heartbeat(self, key: str, owner: str, ttl: float = DEFAULT_TTL) -> bool: ...
    def release(self, key: str, owner: str) -> None: ...
    def close_thread(self) -> None: ...


class Lease:
    """A claim we hold. As a context manager it heartbeats from a background thread every
    `interval` (default ttl/3) and releases at exit. `lost` is set if a heartbeat finds the lease
    taken over (we were presumed dead): the holder should stop and not record results."""

    def __init__(self, backend: ClaimBackend, key: str, owner: str, ttl: float,
                 interval: float | None = None) -> None:
        self.backend = backend
        self.key = key
        self.owner = owner
        self.ttl = ttl
        self.interval = interval if interval is not None else max(ttl / 3.0, 0.05)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._released = False

    def __enter__(self) -> Lease:
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat:{self.key[:40]}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def _beat(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                if not self.backend.heartbeat(self.key, self.owner, self.ttl):
                    log.warning("lost the claim on %s (another worker took it over)", self.key)
                    self.lost.set()
                    return
        finally:
            # This thread's own database connection: close it rather than leave it to the garbage
            # collector (MySQL would log an aborted connection per lease).
            self.backend.close_thread()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if not self._released:
            self._released = True
            self.backend.release(self.key, self.owner)


@dataclass
class WaitOutcome(Generic[T]):
    """Either `result` (someone's finished conversion) or `lease` (ours to convert; hold it with `with`)."""

    result: T | None = None
    lease: Lease | None = None


def wait_for(backend: ClaimBackend, key: str, owner: str, check_result: Callable[[], T | None],
             timeout: float, ttl: float = DEFAULT_TTL, poll_interval: float = 0.5) -> WaitOutcome[T]:
    """Return the result of whoever converts `key`, or the lease to convert it ourselves.

    Loop: a result exists -> return it; else try to claim (free or expired lease) -> ours, but check
    the result once more (the holder may have recorded it and released between our two steps);
    else someone holds it: poll until `timeout`, then raise ClaimTimeoutError. Never returns a lease
    while another live holder has one, so the same thing is never converted in parallel.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = check_result()
        if found is not None:
            return WaitOutcome(result=found)
        if backend.claim(key, owner, ttl):
            found = check_result()
            if found is not None:
                backend.release(key, owner)
                return WaitOutcome(result=found)
            return WaitOutcome(lease=Lease(backend, key, owner, ttl))
        if time.monotonic() >= deadline:
            raise ClaimTimeoutError(f"waited {timeout:.0f}s for another worker converting {key}")
        time.sleep(poll_interval)
