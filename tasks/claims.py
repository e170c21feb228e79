"""Dedup claims held by a fleet request while its tasks run (see obdconv/pipeline/reuse.py).

A manifest's conversion spans several tasks on several workers (prepare, metadata, assemble,
push), so no single process can hold its claims the way the local runner does. Instead:
* the claims are taken (without waiting: `Reuse(wait=False)`) by `obdconv.convert_manifest` under
  an owner name stable for (request, manifest): `claim_owner(...)`; their keys travel in the job
  (`job["reuse"]["claims"]`, with the owner);
* every task of that manifest heartbeats them while it runs (`held_claims(job)`), extending each
  lease to now + `claim_ttl`;
* push_manifest releases them after recording the results, so waiters find the results;
  a failed request releases them in `FleetTask.on_failure`;
* a redelivered task (its worker died) has the same owner, so it re-takes its own expired claim;
  if the whole request is gone, nobody heartbeats and the lease expires after `claim_ttl`: a
  waiting request then takes it over and converts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from obdconv.errors import DatabaseError
from tasks.context import settings
from workers.database import dedup_store

log = logging.getLogger(__name__)


def request_owner_prefix(request_id: str) -> str:
    """What every claim owner of one request starts with (a cancel releases them all by it)."""
    return f"fleet:{request_id}:"


def claim_owner(request_id: str, manifest_digest: str) -> str:
    """Readable in the claims table; the same for every task (and retry) of this manifest."""
    return request_owner_prefix(request_id) + manifest_digest.partition(":")[2][:16]


def claims_of(job: dict[str, Any]) -> tuple[str, list[str]]:
    reuse = job.get("reuse") or {}
    return reuse.get("owner", ""), list(reuse.get("claims", []))


def _beat(owner: str, keys: list[str], ttl: float, stop: threading.Event) -> None:
    store = dedup_store()
    try:
        while True:
            try:  # one statement for all of them: every task of a request beats all its claims
                held = store.heartbeat_many(keys, owner, ttl)
                if held < len(keys):
                    # Taken over (another request converts it too) or released (the request is
                    # done). Our output is the same bytes (deterministic) and rows are upserts, so
                    # we carry on rather than fail.
                    log.warning("%d of the %d claims of %s were taken over or released", len(keys) - held,
                                len(keys), owner)
            except DatabaseError as e:
                log.warning("claim heartbeat of %s failed: %s", owner, e)
            if stop.wait(ttl / 3):
                return
    finally:
        store.close_thread()


@contextlib.contextmanager
def held_claims(job: dict[str, Any]) -> Iterator[None]:
    """Heartbeat the job's claims (if any) from a background thread while the block runs."""
    owner, keys = claims_of(job)
    if not keys or not settings().db_type:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_beat, args=(owner, keys, float(settings().claim_ttl), stop),
                              name="claim-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def release_claims(job: dict[str, Any]) -> None:
    owner, keys = claims_of(job)
    if not keys or not settings().db_type:
        return
    store = dedup_store()
    for key in keys:
        store.release(key, owner)
