"""Celery tasks wrapping the per-layer and per-image pipeline stages (thin: the work is in
obdconv.pipeline). Orchestration (which task follows which) is in tasks/canvas.py.

Data movement: big bytes never travel. prepare keeps its output in the worker's spool and
returns where it is (`node`); the entry list and encoded ext4 metadata go through the result
backend by key (tasks/transfer.py); assemble runs on the node holding the spool, or re-prepares.

Prepare runs once per shared layer across concurrent requests: the first task to take
`obdconv:preparing:<spool key>` prepares; others retry shortly (without holding a worker slot)
and then reuse the holder's result, published under `obdconv:holder:<spool key>`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from obdconv.errors import ObdconvError
from obdconv.pipeline.assemble import assemble_layer
from obdconv.pipeline.baselayer import base_layer_of
from obdconv.pipeline.flatten import encode_ranges
from obdconv.pipeline.metadata import MetadataPass, decode_metadata, encode_metadata
from obdconv.pipeline.parents import read_back_parents
from obdconv.pipeline.prepare import PreparedLayer, prepare_layer, reuse_prepared, spool_key
from obdconv.request import ConversionRequest
from obdconv.status import record_running
from tasks.base import FleetTask, retry_later
from tasks.cancel import stop_if_cancelled
from tasks.claims import held_claims
from tasks.context import open_repository, settings, spool_dir
from tasks.dedup import remember_layer
from tasks.progress import ProgressReporter, backend_client, record_manifest_stage, redis_client
from tasks.spool import evict_spool, layer_in_use
from tasks.transfer import get_bytes, put_bytes
from workers import metrics
from workers.app import app
from workers.database import open_worker_database
from workers.lease import is_worker_alive
from workers.queues import TASK_ASSEMBLE_LAYER, TASK_BUILD_METADATA, TASK_PREPARE_LAYER

log = logging.getLogger(__name__)

HOLDER_PREFIX = "obdconv:holder:"
PREPARING_PREFIX = "obdconv:preparing:"
WAIT_FOR_HOLDER_SECONDS = 1.0
# Counts of stage runs per layer, for operators and the tests ("each shared layer prepared once").
RUNS_PREFIX = "obdconv:runs:"


def request_of(job: dict[str, Any]) -> ConversionRequest:
    return ConversionRequest.from_dict(job["request"])


def mark_stage(job: dict[str, Any], stage: str) -> None:
    if settings().db_type:
        open_worker_database()  # inside the task: an unreachable database is a retried DatabaseError
        record_running(job["request_id"], stage)
    record_manifest_stage(job, stage)


def _broker_client() -> Any:
    return redis_client(settings().broker_url, outlast_restarts=True)


def _count_run(kind: str, key: str) -> None:
    client = backend_client()
    if client is not None:
        client.hincrby(RUNS_PREFIX + kind, key, 1)


def _formats(request: ConversionRequest) -> tuple[bool, bool]:
    formats = {p.format for p in request.profiles()}
    return "native" in formats, "turbo" in formats


def _holder_info(client: Any, key: str, native: bool, turbo: bool) -> dict[str, Any] | None:
    raw = client.get(HOLDER_PREFIX + key)
    if raw is None:
        return None
    info = json.loads(raw)
    if not PreparedLayer.from_dict(info["prepared"]).covers(native=native, turbo=turbo):
        return None
    if not is_worker_alive(_broker_client(), info["node"]):
        return None
    if not client.exists(info["entries_key"]):
        # Written to a Redis that restarted without persistence between storing the entry list
        # and this record: the list is gone, so the layer must be prepared (and stored) again.
        return None
    return info


@contextlib.contextmanager
def _spool_space_named(node: str, what: str) -> Iterator[None]:
    """A full disk is reported by write() without a file name: say whose spool filled up."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ObdconvError(f"worker {node}: no space left in its spool {spool_dir(node)} ({what}): "
                               f"{e.strerror}") from e
        raise


def _prepare_here(task: Any, job: dict[str, Any], layer: dict[str, Any], node: str,
                  lock: tuple[Any, str, str, int] | None = None, stage: str = "prepare",
                  head_room: int = 0) -> PreparedLayer:
    """Prepare into this node's spool. `lock` = (redis client, key, owner, ttl): kept alive while
    bytes flow, so a long prepare is not mistaken for a dead one by tasks waiting for it.
    `head_room`: see `prepare_layer` (0 when the layer is prepared again at assemble: it is then
    copied into an OCI layout, not finished in place)."""
    request = request_of(job)
    native, turbo = _formats(request)
    repo = open_repository(request.repository, request.access)
    reporter = ProgressReporter(task, job, "prepare", layer["digest"])
    refreshed = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        reporter(done, total)
        if lock is not None and time.monotonic() - refreshed[0] > lock[3] / 3:
            refreshed[0] = time.monotonic()
            client, key, owner, ttl = lock
            if client.get(key) == owner.encode():
                client.expire(key, ttl)

    with _spool_space_named(node, f"preparing layer {layer['digest']}"):
        prepared = prepare_layer(repo, layer, spool_dir(node), native=native, turbo=turbo,
                                 algorithm=request.algorithm, block_size=request.block_size, progress=progress,
                                 head_room=head_room)
    reporter.done(prepared.source_size)
    metrics.count_bytes_read(stage, prepared.source_size)
    return prepared


@app.task(bind=True, base=FleetTask, name=TASK_PREPARE_LAYER)
def prepare_layer_task(self: Any, *, job: dict[str, Any], layer: dict[str, Any], head_room: int = 0) -> dict[str, Any]:
    """-> {"node": nodename holding the spool, "prepared": PreparedLayer dict, "entries_key": key}.
    `head_room` (the canvas's `native_head_room`): see `prepare_layer`."""
    request = request_of(job)
    native, turbo = _formats(request)
    key = spool_key(layer["digest"], request.algorithm, request.block_size)
    node = self.request.hostname
    client = backend_client()
    holder = _holder_info(client, key, native, turbo) if client is not None else None
    if holder is not None:
        return holder
    lock = PREPARING_PREFIX + key
    lease = settings().lease_seconds * 2
    me = self.request.id or node  # a redelivered task has the same id: it may take its own lock over
    if client is not None and not client.set(lock, me, nx=True, ex=lease):
        owner = client.get(lock)
        if owner is not None and owner.decode() != me:
            # Someone else is preparing this layer: come back shortly. The wait ends when it is
            # done or its lock's lease runs out (it died).
            raise retry_later(self, WAIT_FOR_HOLDER_SECONDS)
    try:
        mark_stage(job, "prepare")
        with metrics.stage_timer("prepare"), held_claims(job), layer_in_use(spool_dir(node), key):
            prepared = _prepare_here(self, job, layer, node,
                                     (client, lock, me, lease) if client is not None else None, head_room=head_room)
            _count_run("prepare", layer["digest"])
            log.info("prepared layer %s for %s on %s", layer["digest"], job["request_id"], node)
            entries_key = put_bytes("entries:" + key, prepared.entries_path.read_bytes())
        info = {"node": node, "prepared": prepared.to_dict(), "entries_key": entries_key}
        if client is not None:
            client.set(HOLDER_PREFIX + key, json.dumps(info), ex=settings().result_expires)
        return info
    finally:
        if client is not None and client.get(lock) == me.encode():
            client.delete(lock)
        _evict_spool(node)


def _evict_spool(node: str) -> None:
    """Keep this worker's spool within the settings' limits (never fails the task over it)."""
    s = settings()
    try:
        evict_spool(spool_dir(node), s.spool_max_bytes, s.spool_max_age)
    except OSError as e:
        log.warning("spool eviction on %s failed: %s", node, e)


@app.task(bind=True, base=FleetTask, name=TASK_BUILD_METADATA)
def build_metadata_task(self: Any, prepared_results: list[dict[str, Any]], *,
                        job: dict[str, Any]) -> dict[str, Any]:
    """All layers' ext4 metadata in order; needs only the entry lists (no file bytes).
    -> {"layers": prepared_results, "metadata_keys": [key per layer]} (+ "allocated_key": the final
    filesystem's allocated blocks, with --flatten)."""
    request = request_of(job)
    manifest = job["manifest"]
    mark_stage(job, "metadata")
    reuse = job.get("reuse") or {}
    start = int(reuse.get("start", 0))
    node = self.request.hostname
    scratch = Path(tempfile.mkdtemp(prefix="meta-", dir=_scratch_root(node)))
    try:
        with metrics.stage_timer("metadata"), held_claims(job), \
                _spool_space_named(node, f"metadata of {manifest['descriptor']['digest']}"):
            layers = []
            for i, info in enumerate(prepared_results):
                shadow = scratch / f"layer{start + i}"  # a spool holding only the entry list
                shadow.mkdir()
                prepared = PreparedLayer.from_dict(info["prepared"])
                prepared.spool = str(shadow)
                prepared.entries_path.write_bytes(get_bytes(info["entries_key"]))
                layers.append(prepared)
            base = base_layer_of(request, f"worker {node}")  # --mkfs=false: this worker's file, checked
            parents = base.device() if base is not None else None
            if start:  # layers 0..start-1 are dedup hits: continue from exactly what their blobs hold
                fmt = reuse["parents_format"]
                target = open_repository(request.output_repository or request.repository, request.access)
                parents = read_back_parents(target, fmt, [x["digest"] for x in reuse["layers"][fmt][:start]],
                                            [x["digest"] for x in manifest["layers"][:start]], scratch / "parents",
                                            below=[base.open()] if base is not None else [])
            metas, allocated = [], None
            if layers:
                with MetadataPass(request.vsize_gb, manifest["chain_ids"], scratch / "work", parents,
                                  keep_image=request.reserve) as metadata_pass:
                    metas = [metadata_pass.apply(p) for p in layers]
                    # --flatten: what the final filesystem uses, for the one assemble (tasks/flatten.py)
                    allocated = metadata_pass.allocated_blocks() if request.flatten else None
            prefix = f"{job['request_id']}:{manifest['descriptor']['digest']}"
            keys = [put_bytes(f"meta:{prefix}:{start + i}", encode_metadata(m)) for i, m in enumerate(metas)]
            extra = {"allocated_key": put_bytes(f"alloc:{prefix}", encode_ranges(allocated))} if allocated else {}
    finally:
        if request.reserve:  # the fleet's `reserve`: keep the metadata pass's scratch on this worker
            log.warning("%s: reserve: metadata scratch of %s kept at %s:%s", job["request_id"],
                        manifest["descriptor"]["digest"], node, scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"layers": prepared_results, "metadata_keys": keys, **extra}


def _scratch_root(node: str) -> Path:
    root = spool_dir(node) / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    return root


@app.task(bind=True, base=FleetTask, name=TASK_ASSEMBLE_LAYER)
def assemble_layer_task(self: Any, *, job: dict[str, Any], index: int, layer: dict[str, Any],
                        chain_id: str, parent_chain_id: str, metadata_key: str) -> dict[str, Any]:
    """Assemble + upload one layer in every requested format -> {format: ConvertedLayer dict}.
    Routed to the node that prepared the layer; anywhere else the layer is prepared again first."""
    request = request_of(job)
    native, turbo = _formats(request)
    node = self.request.hostname
    key = spool_key(layer["digest"], request.algorithm, request.block_size)
    out: dict[str, Any] = {}
    again = ""
    with metrics.stage_timer("assemble"), held_claims(job), layer_in_use(spool_dir(node), key):
        prepared = reuse_prepared(spool_dir(node), layer["digest"], request.algorithm, request.block_size)
        if prepared is None or not prepared.covers(native=native, turbo=turbo):
            log.warning("layer %s not in the spool of %s: preparing it again here", layer["digest"], node)
            prepared = _prepare_here(self, job, layer, node, stage="reprepare")
            _count_run("reprepare", layer["digest"])
            again = " after preparing it again here"
        metadata = decode_metadata(get_bytes(metadata_key))
        source_repo = open_repository(request.repository, request.access)
        target_repo = (open_repository(request.output_repository, request.access)
                       if request.output_repository else source_repo)
        for profile in request.profiles():
            if profile.format in (job.get("reuse") or {}).get("manifests", {}):
                continue  # this format's manifest is a dedup hit: nothing to assemble for it
            stop_if_cancelled(job, self.name)  # no layer blob committed for a cancelled request
            converted = assemble_layer(prepared, metadata, profile, chain_id, parent_chain_id, target_repo,
                                       upload=not request.no_upload, oci=request.oci or request.referrer,
                                       source_repo=source_repo)
            out[profile.format] = converted.to_dict()
            if not request.no_upload:
                remember_layer(target_repo, chain_id, profile, converted.digest, converted.size)
                metrics.count_bytes_written(profile.format, converted.size)
    _count_run("assemble", f"{layer['digest']}@{index}")
    log.info("assembled layer %s (index %d) for %s on %s%s", layer["digest"], index, job["request_id"], node, again)
    ProgressReporter(self, job, "assemble", layer["digest"]).done(prepared.source_size)
    return out
