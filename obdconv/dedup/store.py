"""The dedup store: rows of converted layers/manifests per conversion profile, and claims.

Schema (config/schema.*.sql): obdconv writes its own tables `obdconv_layers`/`obdconv_manifests`,
which carry the conversion profile key (`ConversionProfile.key()`) in their primary key, so a result
made one way is never reused for a request made another way — including turboOCI results, which the
reference never deduplicates. The reference tables `overlaybd_layers`/`overlaybd_manifests` are kept
as the reference defines them and are used only for `REFERENCE_PROFILE` (see `uses_reference_tables`):
* read: a request of the reference profile also accepts reference rows, except rows obdconv itself
  mirrored there under another engine version (recognised by a matching `obdconv_*` row of the same
  key and digest but another profile key);
* write: rows of the reference profile are mirrored into the reference tables (INSERT IGNORE: the
  reference never updates rows), so the reference convertor's queries keep finding them; rows of any
  other profile never go there, so the reference's `QueryRow` never gets a row of another profile.

Database down: with `required=False` every operation degrades — lookups return "not found", writes
are skipped, `claim` succeeds (nobody to coordinate with) — after one warning; the store retries
the database every `retry_after` seconds and says when it is back. With `required=True`
(`--db-required`) every failure raises DatabaseError.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import peewee
import pymysql

from obdconv.dedup import claims
from obdconv.dedup.db import DatabaseConfig, connect_database, database, dialect, parse_db_config
from obdconv.dedup.models import ProfileLayer, ProfileManifest, ReferenceLayer, ReferenceManifest
from obdconv.dedup.schema import SCHEMA_VERSION, create_registered_tables, init_schema, schema_version
from obdconv.errors import DatabaseError
from obdconv.request import ConversionProfile

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What the reference convertor produces: native overlaybd, ext4 made by an in-image mkfs on a 64 GB
#: device, ZFile LZ4 in 4 KiB blocks. Requests with exactly these settings (any engine version: the
#: reference rows carry none) also read and write the reference tables. Any other request — turbo,
#: zstd, another block size or vsize, `--mkfs=false` — uses only obdconv's tables, because a
#: reference row cannot say how it was made and the reference's defaults are the only safe reading.
#: (Residual risk: a reference user who converted with a non-default `--vsize`/`--mkfs=false` wrote
#: rows indistinguishable from default ones; the reference itself mixes those up too.)
REFERENCE_PROFILE = ConversionProfile("native", "ext4", 64, True, "lz4", 4096)

REFERRER_SUFFIX = "/referrer"
DB_ERRORS: tuple[type[BaseException], ...] = (peewee.PeeweeException, pymysql.err.MySQLError, sqlite3.Error)


TRANSIENT_RETRIES = 3
_MYSQL_LOCK_ERRORS = (1213, 1205)  # deadlock victim, lock wait timeout


def is_transient(error: BaseException) -> bool:
    """Lock contention, not an outage: retry the statement instead of declaring the database down."""
    first = error.args[0] if error.args else None
    if isinstance(first, int):
        return first in _MYSQL_LOCK_ERRORS
    return "database is locked" in str(first)  # SQLite, after its busy timeout


def uses_reference_tables(profile: ConversionProfile) -> bool:
    """Every field but the engine version as the reference's (so no base layer, no flattening)."""
    return replace(profile, engine_version=REFERENCE_PROFILE.engine_version) == REFERENCE_PROFILE


def manifest_profile_key(profile: ConversionProfile, referrer: bool) -> str:
    """Manifests also depend on `--referrer` (subject/artifactType), which layers do not."""
    return profile.key() + (REFERRER_SUFFIX if referrer else "")


@dataclass(frozen=True)
class LayerRecord:
    host: str
    repo: str
    chain_id: str
    data_digest: str
    data_size: int
    from_reference: bool = False  # found only in `overlaybd_layers`


@dataclass(frozen=True)
class ManifestRecord:
    host: str
    repo: str
    src_digest: str
    media_type: str
    out_digest: str
    data_size: int
    from_reference: bool = False  # found only in `overlaybd_manifests`


def _check_text(name: str, value: str) -> None:
    if not value or len(value) > 255 or not value.isascii():
        raise ValueError(f"dedup {name} must be 1-255 ASCII characters, got {value[:80]!r}")


def _check_digest(name: str, value: str) -> None:
    algo, sep, hexpart = value.partition(":")
    if not sep or not algo or not hexpart or len(value) > 255:
        raise ValueError(f"dedup {name} must look like 'sha256:<hex>', got {value[:80]!r}")


# `{p}` is the driver's parameter marker. "Mirrored" = a reference-table row obdconv wrote itself under
# another profile key (another engine version): not a reference result, so not reused.
_OUR_LAYER = ("SELECT data_digest, data_size FROM obdconv_layers "
              "WHERE host = {p} AND repo = {p} AND chain_id = {p} AND profile = {p}")
_REF_LAYER = "SELECT data_digest, data_size FROM overlaybd_layers WHERE host = {p} AND repo = {p} AND chain_id = {p}"
_MIRRORED_LAYER = ("SELECT 1 FROM obdconv_layers WHERE host = {p} AND repo = {p} AND chain_id = {p} "
                   "AND data_digest = {p} AND profile <> {p} LIMIT 1")
_OUR_LAYERS_ON_HOST = ("SELECT repo, data_digest, data_size FROM obdconv_layers "
                       "WHERE host = {p} AND chain_id = {p} AND profile = {p} ORDER BY repo")
_REF_LAYERS_ON_HOST = "SELECT repo, data_digest, data_size FROM overlaybd_layers WHERE host = {p} AND chain_id = {p} ORDER BY repo"
_OUR_MANIFEST = ("SELECT out_digest, data_size FROM obdconv_manifests "
                 "WHERE host = {p} AND repo = {p} AND src_digest = {p} AND mediatype = {p} AND profile = {p}")
_REF_MANIFEST = ("SELECT out_digest, data_size FROM overlaybd_manifests "
                 "WHERE host = {p} AND repo = {p} AND src_digest = {p} AND mediatype = {p}")
_MIRRORED_MANIFEST = ("SELECT 1 FROM obdconv_manifests WHERE host = {p} AND repo = {p} AND src_digest = {p} "
                      "AND mediatype = {p} AND out_digest = {p} AND profile <> {p} LIMIT 1")
_OUR_MANIFESTS_ON_HOST = ("SELECT repo, out_digest, data_size FROM obdconv_manifests "
                          "WHERE host = {p} AND src_digest = {p} AND mediatype = {p} AND profile = {p} ORDER BY repo")
_REF_MANIFESTS_ON_HOST = ("SELECT repo, out_digest, data_size FROM overlaybd_manifests "
                          "WHERE host = {p} AND src_digest = {p} AND mediatype = {p} ORDER BY repo")


class DedupStore:
    """See the module docstring. Create with `open_store`. Thread-safe (peewee keeps one connection
    per thread). Binds the process-wide `obdconv.dedup.db.database` proxy: one open store per process."""

    def __init__(self, config: DatabaseConfig | None, db: peewee.Database | None, *, required: bool = False,
                 retry_after: float = 10.0) -> None:
        self.config = config
        self._db = db
        self.required = required
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._down_reason: str | None = None
        self._retry_at = 0.0
        self._schema_ready = False

    # --- availability ----------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """False without `--db-type` (reference behaviour: no dedup)."""
        return self._db is not None

    @property
    def available(self) -> bool:
        """False while the database is down (since the last failure, until a retry succeeds) or disabled."""
        return self._db is not None and self._down_reason is None

    def describe(self) -> str:
        return self.config.describe() if self.config is not None else "no dedup database"

    def __repr__(self) -> str:
        return f"DedupStore({self.describe()}, available={self.available}, required={self.required})"

    def _prepare(self) -> None:
        assert self._db is not None
        if database.obj is not self._db:
            database.initialize(self._db)
        self._db.connect(reuse_if_open=True)
        if not self._schema_ready:
            if schema_version(self._db) != SCHEMA_VERSION:
                init_schema(self._db)
            else:
                create_registered_tables(self._db)
            self._schema_ready = True

    def _mark_down(self, what: str, err: BaseException) -> None:
        reason = f"{type(err).__name__}: {err}"
        with self._lock:
            first = self._down_reason is None
            self._down_reason = reason
            self._retry_at = time.monotonic() + self.retry_after
        if self._db is not None:
            # Drop this thread's broken connection so the retry opens a new one.
            try:
                self._db.close()
            except Exception:  # closing a dead connection may fail in many ways; it is dead anyway
                pass
        if first and not self.required:
            log.warning("dedup database unreachable (%s) during %s: %s; converting without dedup",
                        self.describe(), what, reason)

    def _usable(self) -> bool:
        if self._db is None:
            return False
        if self._down_reason is None:
            return True
        if time.monotonic() < self._retry_at and not self.required:
            return False
        try:
            self._prepare()
        except DB_ERRORS as e:
            self._mark_down("reconnect", e)
            return False
        with self._lock:
            self._down_reason = None
        log.warning("dedup database %s reachable again; deduplicating", self.describe())
        return True

    def _run(self, what: str, operation: Callable[[], T], default: T) -> T:
        if not self._usable():
            if self.required and self._db is not None:
                raise DatabaseError(f"dedup database {self.describe()} unavailable ({self._down_reason})")
            return default
        for attempt in range(TRANSIENT_RETRIES + 1):
            try:
                return operation()
            except DB_ERRORS as e:
                if is_transient(e) and attempt < TRANSIENT_RETRIES:
                    # Lock contention between workers (InnoDB deadlock victim, SQLite busy): the
                    # database is fine and the statement is safe to repeat.
                    time.sleep(0.05 * (attempt + 1))
                    continue
                error = e
                break
        self._mark_down(what, error)
        if self.required:
            raise DatabaseError(f"dedup database {self.describe()} failed during {what}: "
                                f"{type(error).__name__}: {error}") from error
        return default

    def _upsert(self, model: type[peewee.Model], values: dict[str, object], preserve: list[peewee.Field]) -> None:
        query = model.insert(**values)
        if dialect(database) == "mysql":
            query = query.on_conflict(preserve=preserve)
        else:
            primary_key = [model._meta.fields[name] for name in model._meta.primary_key.field_names]
            query = query.on_conflict(conflict_target=primary_key, preserve=preserve)
        query.execute()

    # --- layers ----------------------------------------------------------------------------------

    # Lookups are plain SQL (the reference's own query shapes): peewee's query builder cost ~1 ms of
    # CPU per lookup, 20x the query itself on SQLite.

    @staticmethod
    def _rows(template: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        sql = template.replace("{p}", "%s" if dialect(database) == "mysql" else "?")
        return list(database.execute_sql(sql, params).fetchall())

    def get_layer(self, host: str, repo: str, chain_id: str, profile: ConversionProfile) -> LayerRecord | None:
        """The converted layer recorded for `repo` (no registry check: see lookup.find_converted_layer)."""
        def query() -> LayerRecord | None:
            key = profile.key()
            for digest, size in self._rows(_OUR_LAYER, (host, repo, chain_id, key)):
                return LayerRecord(host, repo, chain_id, digest, int(size))
            if not uses_reference_tables(profile):
                return None
            for digest, size in self._rows(_REF_LAYER, (host, repo, chain_id)):
                if not self._rows(_MIRRORED_LAYER, (host, repo, chain_id, digest, key)):
                    return LayerRecord(host, repo, chain_id, digest, int(size), from_reference=True)
            return None
        return self._run("layer lookup", query, None)

    def layers_on_host(self, host: str, chain_id: str, profile: ConversionProfile) -> list[LayerRecord]:
        """Every repository on `host` holding a conversion of `chain_id` (ours first, by repo name)."""
        def query() -> list[LayerRecord]:
            key = profile.key()
            out = [LayerRecord(host, repo, chain_id, digest, int(size))
                   for repo, digest, size in self._rows(_OUR_LAYERS_ON_HOST, (host, chain_id, key))]
            if uses_reference_tables(profile):
                seen = {r.repo for r in out}
                for repo, digest, size in self._rows(_REF_LAYERS_ON_HOST, (host, chain_id)):
                    if repo in seen or self._rows(_MIRRORED_LAYER, (host, repo, chain_id, digest, key)):
                        continue
                    out.append(LayerRecord(host, repo, chain_id, digest, int(size), from_reference=True))
            return out
        return self._run("cross-repo layer lookup", query, [])

    def record_layer(self, host: str, repo: str, chain_id: str, profile: ConversionProfile,
                     data_digest: str, data_size: int) -> None:
        """Remember that blob `data_digest` in `host/repo` is `chain_id` converted with `profile`.

        Contract: call ONLY after the blob is in `host/repo` (pushed, or mounted with a 201): a row is
        a promise to every other worker. Idempotent: an identical row is kept, a row of the same key
        with another digest is replaced in obdconv's table (the blob just pushed is the one known to
        exist); the reference table is only inserted into, never updated (reference semantics).
        """
        for name, value in (("host", host), ("repo", repo)):
            _check_text(name, value)
        _check_digest("chain id", chain_id)
        _check_digest("layer digest", data_digest)

        def write() -> None:
            with database.atomic():
                self._upsert(ProfileLayer, {"host": host, "repo": repo, "chain_id": chain_id, "profile": profile.key(),
                                            "data_digest": data_digest, "data_size": data_size},
                             [ProfileLayer.data_digest, ProfileLayer.data_size])
                if uses_reference_tables(profile):
                    ReferenceLayer.insert(host=host, repo=repo, chain_id=chain_id, data_digest=data_digest,
                                          data_size=data_size).on_conflict_ignore().execute()
        self._run("layer record", write, None)

    def delete_layer(self, host: str, repo: str, chain_id: str, profile: ConversionProfile, data_digest: str) -> None:
        """Forget a stale row (its blob is gone). Only rows still naming `data_digest` are deleted, so a
        fresh row written meanwhile by another worker survives."""
        def delete() -> None:
            ProfileLayer.delete().where((ProfileLayer.host == host) & (ProfileLayer.repo == repo)
                                        & (ProfileLayer.chain_id == chain_id) & (ProfileLayer.profile == profile.key())
                                        & (ProfileLayer.data_digest == data_digest)).execute()
            if uses_reference_tables(profile):
                ReferenceLayer.delete().where((ReferenceLayer.host == host) & (ReferenceLayer.repo == repo)
                                              & (ReferenceLayer.chain_id == chain_id)
                                              & (ReferenceLayer.data_digest == data_digest)).execute()
        self._run("layer delete", delete, None)

    # --- manifests -------------------------------------------------------------------------------

    def get_manifest(self, host: str, repo: str, src_digest: str, media_type: str, profile: ConversionProfile,
                     referrer: bool = False) -> ManifestRecord | None:
        def query() -> ManifestRecord | None:
            key = manifest_profile_key(profile, referrer)
            for digest, size in self._rows(_OUR_MANIFEST, (host, repo, src_digest, media_type, key)):
                return ManifestRecord(host, repo, src_digest, media_type, digest, int(size))
            if referrer or not uses_reference_tables(profile):
                return None
            for digest, size in self._rows(_REF_MANIFEST, (host, repo, src_digest, media_type)):
                if not self._rows(_MIRRORED_MANIFEST, (host, repo, src_digest, media_type, digest, key)):
                    return ManifestRecord(host, repo, src_digest, media_type, digest, int(size), from_reference=True)
            return None
        return self._run("manifest lookup", query, None)

    def manifests_on_host(self, host: str, src_digest: str, media_type: str, profile: ConversionProfile,
                          referrer: bool = False) -> list[ManifestRecord]:
        def query() -> list[ManifestRecord]:
            key = manifest_profile_key(profile, referrer)
            out = [ManifestRecord(host, repo, src_digest, media_type, digest, int(size))
                   for repo, digest, size in self._rows(_OUR_MANIFESTS_ON_HOST, (host, src_digest, media_type, key))]
            if uses_reference_tables(profile) and not referrer:
                seen = {r.repo for r in out}
                for repo, digest, size in self._rows(_REF_MANIFESTS_ON_HOST, (host, src_digest, media_type)):
                    if repo in seen or self._rows(_MIRRORED_MANIFEST, (host, repo, src_digest, media_type, digest, key)):
                        continue
                    out.append(ManifestRecord(host, repo, src_digest, media_type, digest, int(size),
                                              from_reference=True))
            return out
        return self._run("cross-repo manifest lookup", query, [])

    def record_manifest(self, host: str, repo: str, src_digest: str, media_type: str, profile: ConversionProfile,
                        out_digest: str, data_size: int, referrer: bool = False) -> None:
        """Remember that manifest `out_digest` in `host/repo` is `src_digest` converted with `profile`.

        Contract: call ONLY after the manifest was pushed to `host/repo`. Idempotent like `record_layer`.
        """
        for name, value in (("host", host), ("repo", repo), ("media type", media_type)):
            _check_text(name, value)
        _check_digest("source manifest digest", src_digest)
        _check_digest("manifest digest", out_digest)

        def write() -> None:
            with database.atomic():
                self._upsert(ProfileManifest, {"host": host, "repo": repo, "src_digest": src_digest,
                                               "mediatype": media_type, "profile": manifest_profile_key(profile, referrer),
                                               "out_digest": out_digest, "data_size": data_size},
                             [ProfileManifest.out_digest, ProfileManifest.data_size])
                if uses_reference_tables(profile) and not referrer:
                    ReferenceManifest.insert(host=host, repo=repo, src_digest=src_digest, out_digest=out_digest,
                                             data_size=data_size, mediatype=media_type).on_conflict_ignore().execute()
        self._run("manifest record", write, None)

    def delete_manifest(self, host: str, repo: str, src_digest: str, media_type: str, profile: ConversionProfile,
                        out_digest: str, referrer: bool = False) -> None:
        def delete() -> None:
            ProfileManifest.delete().where(
                (ProfileManifest.host == host) & (ProfileManifest.repo == repo) & (ProfileManifest.src_digest == src_digest)
                & (ProfileManifest.mediatype == media_type)
                & (ProfileManifest.profile == manifest_profile_key(profile, referrer))
                & (ProfileManifest.out_digest == out_digest)).execute()
            if uses_reference_tables(profile) and not referrer:
                ReferenceManifest.delete().where(
                    (ReferenceManifest.host == host) & (ReferenceManifest.repo == repo)
                    & (ReferenceManifest.src_digest == src_digest) & (ReferenceManifest.mediatype == media_type)
                    & (ReferenceManifest.out_digest == out_digest)).execute()
        self._run("manifest delete", delete, None)

    # --- claims (see obdconv.dedup.claims) -------------------------------------------------------

    def claim(self, key: str, owner: str, ttl: float = claims.DEFAULT_TTL) -> bool:
        """Atomically take the lease on `key` (free, expired, or already ours). Without a database
        there is nobody to coordinate with, so the claim succeeds."""
        return self._run("claim", lambda: claims.try_claim(database, key, owner, ttl), True)

    def heartbeat(self, key: str, owner: str, ttl: float = claims.DEFAULT_TTL) -> bool:
        return self._run("claim heartbeat", lambda: claims.heartbeat(database, key, owner, ttl), True)

    def heartbeat_many(self, keys: list[str], owner: str, ttl: float = claims.DEFAULT_TTL) -> int:
        """How many of `keys` are still ours after extending them (one statement)."""
        return self._run("claim heartbeat", lambda: claims.heartbeat_many(database, keys, owner, ttl), len(keys))

    def release(self, key: str, owner: str) -> None:
        self._run("claim release", lambda: claims.release(database, key, owner), False)

    def holder(self, key: str) -> claims.ClaimHolder | None:
        return self._run("claim holder", lambda: claims.holder(database, key), None)

    def acquire(self, key: str, owner: str, ttl: float = claims.DEFAULT_TTL) -> claims.Lease | None:
        """The lease on `key` (use `with` to heartbeat and release), or None while someone else holds it."""
        return claims.Lease(self, key, owner, ttl) if self.claim(key, owner, ttl) else None

    def wait_for(self, key: str, owner: str, check_result: Callable[[], T | None], timeout: float,
                 ttl: float = claims.DEFAULT_TTL, poll_interval: float = 0.5) -> claims.WaitOutcome[T]:
        return claims.wait_for(self, key, owner, check_result, timeout, ttl, poll_interval)

    def close_thread(self) -> None:
        """Close the calling thread's connection (peewee keeps one per thread)."""
        self.close()

    def close(self) -> None:
        """Close the calling thread's connection; the store reconnects if used again."""
        if self._db is not None and not self._db.is_closed():
            try:
                self._db.close()
            except DB_ERRORS:
                pass


def open_store(db_type: str, db_str: str, required: bool = False, *, create_schema: bool = True,
               retry_after: float = 10.0) -> DedupStore:
    """The dedup store for `--db-type`/`--db-str` (empty type: a disabled store, no dedup).

    Connects now and creates obdconv's tables if missing (`create_schema`; the statements are
    idempotent). Unreachable: `required` raises DatabaseError; otherwise one warning and a store with
    `available=False` that retries later. Malformed flags raise UsageError either way.
    """
    if not db_type:
        return DedupStore(None, None, required=False)
    config = parse_db_config(db_type, db_str)
    db = connect_database(config)
    store = DedupStore(config, db, required=required, retry_after=retry_after)
    database.initialize(db)
    try:
        db.connect(reuse_if_open=True)
        version = schema_version(db)
        if version != SCHEMA_VERSION:
            if not create_schema:
                raise DatabaseError(f"dedup database {config.describe()} has no obdconv schema "
                                    f"(run `obdconv db init`)")
            init_schema(db)
        else:
            create_registered_tables(db)
        store._schema_ready = True
    except DB_ERRORS as e:
        if required:
            raise DatabaseError(f"dedup database {config.describe()} unreachable: {type(e).__name__}: {e}") from e
        store._mark_down("open", e)
    return store


@contextmanager
def opened_store(db_type: str, db_str: str, required: bool = False) -> Iterator[DedupStore]:
    store = open_store(db_type, db_str, required)
    try:
        yield store
    finally:
        store.close()
