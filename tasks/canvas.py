"""The canvas: how the stage tasks are linked for one request (DESIGN §3-4).

    obdconv.convert (control)             plan the image; replaced by the canvas below, so the
                                          request id (= this task's id) gets the final result
    per manifest:
      chord([obdconv.prepare_layer for each of layers] (queue prepare, any worker),
            obdconv.build_metadata (queue metadata))
      -> obdconv.schedule_assemble (control), replaced by
         chord([obdconv.assemble_layer for each of layers] (queue worker.<node that prepared it>, or
               `assemble` when that worker is gone), obdconv.push_manifest (control))
    per index:
      chord([lane for each of min(concurrency_limit, manifests)], obdconv.push_index (control))
      where a lane is a chain of obdconv.convert_manifest tasks: at most `concurrency_limit`
      manifests convert at once (<= 0: unlimited); each lane accumulates its manifests' results.

Every task gets `job` = {"request_id", "request", ...}. The last task records SUCCESS in the
durable status record and returns {"outputs": {format: {"tag", "digest", "mediaType", "size"}}}.

Dedup, per manifest (root or index child), in `obdconv.convert_manifest` before any layer is touched
(`Reuse(wait=False)` of obdconv/pipeline/reuse.py, the local runner's lookups and claims):
* every format's manifest converted -> no canvas at all (re-tagged when root; `"dedup": true`);
* else the leading converted layers 0..k-1 are reused: only layers k.. are prepared, their metadata
  pass starts from the converted parents read back from their blobs, and only they are assembled
  (with two formats left to convert: k = 0, see `_start_layer`);
* claims another request holds -> the task retries itself shortly (no worker slot held) until the
  holder's results are recorded or its lease expires; claims taken travel in `job["reuse"]`, are
  heartbeated by every task of the manifest and released after its push (tasks/claims.py).

Cancel (tasks/cancel.py): every task of a cancelled request ends quietly when it starts; the tasks
that move the request's tags take the commit gate first (the root's push_manifest, push_index, and
the root's dedup lookup, which re-tags hits), so a cancel either wins before any tag moved or is
refused.

Flags with fleet semantics (the client cannot see a worker's disk):
* `dump_manifest`: the converted manifest/config (and root index) JSON are returned in the outputs
  under `"dump"` instead of being written to files;
* `reserve`: the worker running the metadata pass keeps its scratch directory (ext4 metadata image)
  in `<spool>/<node>/scratch/`, logged; spool eviction removes it after `spool_max_age`;
* `mkfs=false`: the base layer's digest is pinned here (every later task that reads the file checks
  its own copy against it), and pushed first in every manifest;
* `flatten`: one `obdconv.assemble_flat` task instead of one assemble per layer (tasks/flatten.py);
* formats the image cannot become are dropped from the request here, before any work, and reported
  by the last task: state PARTIAL (`all_or_nothing`: the request fails instead).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from celery import chain, chord
from celery.canvas import Signature

from obdconv.dedup.claims import ClaimTimeoutError
from obdconv.pipeline import push as push_stage
from obdconv.pipeline.assemble import ConvertedLayer, native_head_room
from obdconv.pipeline.baselayer import (
    BaseLayer,
    base_layer_of,
    push_base_layer,
    resolve_base_layer,
    with_base,
)
from obdconv.pipeline.feasibility import deliverable, refusals
from obdconv.pipeline.plan import ImagePlan, IndexPlan, ManifestPlan, resolve_image
from obdconv.pipeline.push import PushedManifest
from obdconv.pipeline.reuse import ClaimHeld, ManifestReuse
from obdconv.pipeline.validate import validate_request
from obdconv.request import ConversionProfile, ConversionRequest
from obdconv.status import PARTIAL, record_partial, record_success
from tasks.base import FleetTask, retry_later
from tasks.cancel import commit_or_stop, reopen_for_cancel
from tasks.claims import claim_owner, held_claims, release_claims
from tasks.context import open_repository, settings
from tasks.dedup import fleet_reuse, remember_manifest
from tasks.flatten import assemble_flat_signature
from tasks.progress import record_manifest_stage
from tasks.stages import (
    _broker_client,
    assemble_layer_task,
    build_metadata_task,
    mark_stage,
    prepare_layer_task,
    request_of,
)
from workers import metrics
from workers.app import app
from workers.clock import fleet_time
from workers.database import open_worker_database
from workers.lease import is_worker_alive
from workers.queues import (
    ASSEMBLE,
    TASK_CONVERT,
    TASK_CONVERT_MANIFEST,
    TASK_PUSH_INDEX,
    TASK_PUSH_MANIFEST,
    TASK_SCHEDULE_ASSEMBLE,
    worker_queue,
)

log = logging.getLogger(__name__)

CLAIM_POLL_SECONDS = 1.0  # how soon a request waiting for another's claim looks again


def compact_repr(**fields: Any) -> str:
    """What Flower and worker logs show as a task's kwargs: the request id and what the task works
    on, instead of the whole job (long, and truncated by Celery at 1 KiB)."""
    return json.dumps(fields, separators=(", ", ": "))


def output_tag(request: ConversionRequest, fmt: str) -> str:
    return request.overlaybd_tag if fmt == "native" else request.turbo_tag


def _target_repo(request: ConversionRequest) -> Any:
    return open_repository(request.output_repository or request.repository, request.access)


def manifest_canvas(job: dict[str, Any]) -> Signature:
    """prepare chord -> metadata -> schedule_assemble, for the layers of the manifest in
    `job["manifest"]` from `job["reuse"]["start"]` on (the ones below are dedup hits)."""
    slim = {"request_id": job["request_id"], "request": job["request"], "reuse": job.get("reuse") or {}}
    start = start_of(job)
    layers = job["manifest"]["layers"][start:]
    rid, digest = job["request_id"], job["manifest"]["descriptor"]["digest"]
    request = request_of(job)
    # A native blob assembled into an OCI layout is finished in its spool file (inplace.py).
    target, chain_ids, profiles = _target_repo(request), job["manifest"]["chain_ids"], request.profiles()
    prepares = [prepare_layer_task.signature(
                    kwargs={"job": slim, "layer": layer,
                            "head_room": native_head_room(profiles, not request.no_upload, target, chain_ids, i)},
                    kwargsrepr=compact_repr(request_id=rid, layer=layer["digest"]))
                for i, layer in enumerate(layers, start)]
    return chain(chord(prepares, build_metadata_task.signature(
                     kwargs={"job": job}, kwargsrepr=compact_repr(request_id=rid, manifest=digest))),
                 schedule_assemble_task.signature(kwargs={"job": job},
                                                  kwargsrepr=compact_repr(request_id=rid, manifest=digest)))


def start_of(job: dict[str, Any]) -> int:
    return int((job.get("reuse") or {}).get("start", 0))


def _manifest_job(job: dict[str, Any], manifest: ManifestPlan, *, is_root: bool) -> dict[str, Any]:
    return {"request_id": job["request_id"], "request": job["request"], "is_root": is_root,
            "refused": job.get("refused") or {},
            "manifest": {"descriptor": manifest.descriptor, "data": manifest.data, "config": manifest.config,
                         "layers": manifest.layers, "diff_ids": manifest.diff_ids,
                         "chain_ids": manifest.chain_ids}}


def lanes(items: list[Any], limit: int) -> list[list[Any]]:
    """Split `items` round-robin into at most `limit` lanes (limit <= 0: one lane per item)."""
    count = len(items) if limit <= 0 else max(1, min(limit, len(items)))
    out: list[list[Any]] = [[] for _ in range(count)]
    for i, item in enumerate(items):
        out[i % count].append(item)
    return out


@app.task(bind=True, base=FleetTask, name=TASK_CONVERT)
def convert_task(self: Any, *, job: dict[str, Any]) -> Any:
    """The entry point: job = {"request_id", "request": ConversionRequest dict}."""
    request = request_of(job)
    validate_request(request)  # the local runner's checks and errors
    # --mkfs=false: the base layer pinned by this worker's file (every later task checks its own)
    request, base = resolve_base_layer(request, f"worker {self.request.hostname}")
    job = {**job, "request": request.to_dict()}
    if settings().db_type:
        from obdconv.client import source_of
        from obdconv.status import record_running

        open_worker_database()
        record_running(job["request_id"], "plan", source=source_of(request), request=job["request"])
    source_repo = open_repository(request.repository, request.access)
    plan = resolve_image(source_repo, request.input_tag or request.input_digest, request.platforms)
    job = _drop_refused(job, plan, source_repo, base)
    if not plan.root_is_index:
        manifest_job = _manifest_job(job, plan.manifests[plan.root["digest"]], is_root=True)
        return self.replace(convert_manifest_task.signature(args=(None,), kwargs={"job": manifest_job},
                                                            kwargsrepr=_mrepr(manifest_job)))
    manifest_jobs = [_manifest_job(job, m, is_root=False) for m in plan.manifests.values()]
    header = []
    for lane in lanes(manifest_jobs, request.concurrency_limit):
        steps = [convert_manifest_task.signature(args=(None,), kwargs={"job": lane[0]}, kwargsrepr=_mrepr(lane[0]))]
        steps += [convert_manifest_task.signature(kwargs={"job": j}, kwargsrepr=_mrepr(j)) for j in lane[1:]]
        header.append(chain(*steps) if len(steps) > 1 else steps[0])
    index_job = {"request_id": job["request_id"], "request": job["request"], "root": plan.root,
                 "refused": job.get("refused") or {},
                 "indexes": [{"descriptor": i.descriptor, "data": i.data, "children": i.children}
                             for i in plan.indexes]}
    return self.replace(chord(header, push_index_task.signature(
        kwargs={"job": index_job}, kwargsrepr=compact_repr(request_id=job["request_id"], index=plan.root["digest"]))))


def _drop_refused(job: dict[str, Any], plan: ImagePlan, source_repo: Any, base: BaseLayer | None) -> dict[str, Any]:
    """Formats the image cannot become (obdconv/pipeline/feasibility.py) leave the request (its tag
    cleared, so no task converts them) for `job["refused"]`, which the final result reports
    (PARTIAL). With `all_or_nothing`, or nothing left, the request fails here, before any work."""
    request = request_of(job)
    refused = refusals(plan, request.profiles(), source_repo, base)
    deliverable(request.profiles(), refused, all_or_nothing=request.all_or_nothing)
    if not refused:
        return job
    kept = replace(request, overlaybd_tag="" if "native" in refused else request.overlaybd_tag,
                   turbo_tag="" if "turbo" in refused else request.turbo_tag)
    return {**job, "request": kept.to_dict(),
            "refused": {fmt: {"tag": output_tag(request, fmt), "error": r.to_dict()} for fmt, r in refused.items()}}


def _mrepr(job: dict[str, Any]) -> str:
    return compact_repr(request_id=job["request_id"], manifest=job["manifest"]["descriptor"]["digest"])


@app.task(bind=True, base=FleetTask, name=TASK_CONVERT_MANIFEST)
def convert_manifest_task(self: Any, previous: list[dict[str, Any]] | None, *, job: dict[str, Any]) -> Any:
    """One manifest (the root, or one of an index's in a lane: `previous` = results of the lane's
    earlier manifests): dedup lookups and claims, then nothing more, or push only, or the canvas."""
    request = request_of(job)
    mark_stage(job, "dedup")
    job = {**job, "acc": previous or []}
    manifest = job["manifest"]
    profiles = request.profiles()
    tags = {p.format: output_tag(request, p.format) for p in profiles} if job["is_root"] else {}
    owner = claim_owner(job["request_id"], manifest["descriptor"]["digest"])
    reuse = fleet_reuse(request, _target_repo(request), owner)
    found = ManifestReuse()
    if reuse is not None:
        gated = bool(tags)  # the lookup re-tags a root's converted manifest: no cancel meanwhile
        if gated:
            commit_or_stop(job, settings().result_expires)
        try:
            found = reuse.lookup(ManifestPlan(**manifest), profiles, tags)
        except ClaimHeld as held:
            if not job.get("claim_wait_since"):
                metrics.count_dedup("claim_wait")
            if gated:
                reopen_for_cancel(job)
            since = job.get("claim_wait_since") or fleet_time()  # (the next try may run on another host)
            if fleet_time() - since > settings().claim_timeout:
                raise ClaimTimeoutError(f"waited {settings().claim_timeout}s for another request converting "
                                        f"{held.key}") from None
            log.info("%s: waiting for %s", job["request_id"], held)
            raise retry_later(self, CLAIM_POLL_SECONDS, args=(previous,),
                              kwargs={"job": {**job, "claim_wait_since": since}}) from None
        if gated and not found.manifests:  # nothing re-tagged: the request may still be cancelled
            reopen_for_cancel(job)
    todo = found.todo(profiles)
    start = _start_layer(found, todo)
    metrics.count_dedup("manifest_hit", len(found.manifests))
    metrics.count_dedup("layer_hit", start * len(todo))
    job["reuse"] = {
        "owner": owner, "claims": [lease.key for lease in found.leases], "start": start,
        "manifests": {fmt: {**pm.to_dict(), "dedup": True} for fmt, pm in found.manifests.items()},
        "layers": {p.format: [x.to_dict() for x in found.layers.get(p.format, [])[:start]] for p in todo},
        "parents_format": todo[0].format if todo else "",
    }
    if not todo:  # every format's manifest already converted
        return _manifest_done(job, {})
    if start == len(manifest["layers"]):  # every layer converted, the manifest not yet
        return self.replace(push_manifest_task.signature(args=([],), kwargs={"job": job}, kwargsrepr=_mrepr(job)))
    return self.replace(manifest_canvas(job))


def _start_layer(found: ManifestReuse, todo: list[ConversionProfile]) -> int:
    """First layer to convert. One format left: after its leading converted layers. Two: their
    converted parents may differ in bytes (made by different converters) while one metadata pass
    serves both here, so both start from mkfs (correct, less reuse; the local runner runs one pass
    per format instead)."""
    if len(todo) != 1:
        return 0
    return len(found.layers.get(todo[0].format, []))


@app.task(bind=True, base=FleetTask, name=TASK_SCHEDULE_ASSEMBLE)
def schedule_assemble_task(self: Any, metadata_result: dict[str, Any], *, job: dict[str, Any]) -> Any:
    """Route each layer's assemble to the worker holding its spool (if alive), then push."""
    mark_stage(job, "assemble")
    manifest = job["manifest"]
    chain_ids = manifest["chain_ids"]
    start = start_of(job)
    slim = {"request_id": job["request_id"], "request": job["request"], "reuse": job.get("reuse") or {}}
    broker = _broker_client()
    push = push_manifest_task.signature(
        kwargs={"job": job}, kwargsrepr=compact_repr(request_id=job["request_id"],
                                                     manifest=manifest["descriptor"]["digest"]))
    if request_of(job).flatten and metadata_result["layers"]:  # ONE assemble: tasks/flatten.py
        flat = assemble_flat_signature(slim, manifest, metadata_result, broker, compact_repr(
            request_id=job["request_id"], manifest=manifest["descriptor"]["digest"], flatten=True))
        return self.replace(chord([flat], push))
    header = []
    for j, (info, key) in enumerate(zip(metadata_result["layers"], metadata_result["metadata_keys"], strict=True)):
        i = start + j
        queue = worker_queue(info["node"]) if is_worker_alive(broker, info["node"]) else ASSEMBLE
        kwargs = {"job": slim, "index": i, "layer": manifest["layers"][i], "chain_id": chain_ids[i],
                  "parent_chain_id": chain_ids[i - 1] if i else "", "metadata_key": key}
        header.append(assemble_layer_task.signature(
            kwargs=kwargs, queue=queue,
            kwargsrepr=compact_repr(request_id=job["request_id"], layer=manifest["layers"][i]["digest"], index=i)))
    return self.replace(chord(header, push))


def finish(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    """Record and return the request's result: SUCCESS, or PARTIAL when a format was refused (it is
    in `outputs` with its "tag" and "error", not converted)."""
    refused = job.get("refused") or {}
    outputs = {**outputs, **refused}
    if settings().db_type:
        open_worker_database()
        if refused:
            record_partial(job["request_id"], outputs)
        else:
            record_success(job["request_id"], outputs)
    return {"outputs": outputs, "state": PARTIAL} if refused else {"outputs": outputs}


@app.task(bind=True, base=FleetTask, name=TASK_PUSH_MANIFEST)
def push_manifest_task(self: Any, assembled: list[dict[str, Any]], *, job: dict[str, Any]) -> Any:
    """Config + manifest per format still to convert (dedup-hit layers below the assembled ones),
    record them, release the manifest's claims. Root manifest: tagged, request finished."""
    request = request_of(job)
    mark_stage(job, "push")
    manifest = job["manifest"]
    reuse = job.get("reuse") or {}
    target = _target_repo(request)
    outputs: dict[str, Any] = {}
    if job["is_root"]:
        commit_or_stop(job, settings().result_expires)  # a cancel from here on is refused
    with metrics.stage_timer("push"), held_claims(job):
        base = base_layer_of(request, f"worker {self.request.hostname}")
        for profile in request.profiles():
            if profile.format in reuse.get("manifests", {}):
                continue
            hits = [ConvertedLayer.from_dict(x) for x in reuse.get("layers", {}).get(profile.format, [])]
            layers = hits + [ConvertedLayer.from_dict(a[profile.format]) for a in assembled]
            if base is not None:  # --mkfs=false: the base layer comes first
                layers = with_base(push_base_layer(target, base, profile.format, oci=request.oci or request.referrer,
                                                   upload=not request.no_upload), layers)
            tag = output_tag(request, profile.format) if job["is_root"] else ""
            with tempfile.TemporaryDirectory(prefix="dump-") as dump:
                dump_dir = Path(dump) if request.dump_manifest else None
                pushed = push_stage.push_manifest(
                    target, source_manifest=manifest["data"].encode(), source_config=manifest["config"].encode(),
                    source_desc=manifest["descriptor"], fmt=profile.format, layers=[x.descriptor() for x in layers],
                    diff_ids=[x.diff_id for x in layers], oci=request.oci, referrer=request.referrer, ref=tag,
                    upload=not request.no_upload, dump_dir=dump_dir,
                    flattened=len(manifest["layers"]) if profile.flatten and manifest["layers"] else 0)
                outputs[profile.format] = {**pushed.to_dict(), "tag": tag}
                if dump_dir is not None:
                    outputs[profile.format]["dump"] = {f.name: f.read_text() for f in sorted(dump_dir.iterdir())}
            if not request.no_upload:
                remember_manifest(request, target, manifest["descriptor"]["digest"], profile, pushed.media_type,
                                  pushed.digest, pushed.size)
    release_claims(job)  # results are recorded: waiters find them now
    return _manifest_done(job, outputs)


def _manifest_done(job: dict[str, Any], outputs: dict[str, Any]) -> Any:
    """Merge this manifest's converted `outputs` with its dedup hits; finish a root, or hand the
    lane's accumulated results on."""
    request = request_of(job)
    record_manifest_stage(job, "done")
    for fmt, hit in (job.get("reuse") or {}).get("manifests", {}).items():
        outputs[fmt] = {**hit, "tag": output_tag(request, fmt) if job["is_root"] else ""}
        if request.dump_manifest:  # a hit is dumped too: read back what the target holds
            outputs[fmt]["dump"] = _dump_of(_target_repo(request), hit["digest"])
    if job["is_root"]:
        return finish(job, {fmt: _public(o) for fmt, o in outputs.items()})
    return [*job.get("acc", []), {"source_digest": job["manifest"]["descriptor"]["digest"], "outputs": outputs}]


def _dump_of(target: Any, digest: str) -> dict[str, str]:
    manifest = target.get_manifest(digest).data
    config = target.read_blob(json.loads(manifest)["config"]["digest"])
    return {"config.json": config.decode(), "manifest.json": manifest.decode()}


def _public(o: dict[str, Any]) -> dict[str, Any]:
    out = {"tag": o.get("tag", ""), "digest": o["digest"], "mediaType": o.get("media_type", o.get("mediaType")),
           "size": o["size"]}
    for extra in ("dedup", "dump"):
        if extra in o:
            out[extra] = o[extra]
    return out


_PUSHED_FIELDS = ("media_type", "digest", "size", "config_digest", "layer_digests")


@app.task(bind=True, base=FleetTask, name=TASK_PUSH_INDEX)
def push_index_task(self: Any, lane_results: list[list[dict[str, Any]]], *, job: dict[str, Any]) -> Any:
    """Rebuild every index (children first) per format; tag the root; finish the request."""
    request = request_of(job)
    mark_stage(job, "push")
    started = time.monotonic()
    commit_or_stop(job, settings().result_expires)  # a cancel from here on is refused
    target = _target_repo(request)
    by_source = {r["source_digest"]: r["outputs"] for lane in lane_results for r in lane}
    root_digest = job["root"]["digest"]
    outputs: dict[str, Any] = {}
    index_dump = ""
    for profile in request.profiles():
        converted: dict[str, dict[str, Any] | None] = {
            digest: PushedManifest.from_dict({k: v for k, v in outs[profile.format].items()
                                              if k in _PUSHED_FIELDS}).descriptor()
            for digest, outs in by_source.items()}
        for raw in job["indexes"]:
            index = IndexPlan(**raw)
            is_root = index.digest == root_digest
            tag = output_tag(request, profile.format) if is_root else ""
            with tempfile.TemporaryDirectory(prefix="dump-") as dump:
                dump_path = Path(dump) / "index.json" if request.dump_manifest and is_root else None
                converted[index.digest] = push_stage.push_index(
                    target, source_index=index.data.encode(), source_desc=index.descriptor,
                    children=[converted.get(c) if c else None for c in index.children], fmt=profile.format,
                    oci=request.oci, referrer=request.referrer, ref=tag, upload=not request.no_upload,
                    dump_path=dump_path)
                if dump_path is not None:
                    index_dump = dump_path.read_text()
        root = converted[root_digest]
        assert root is not None
        outputs[profile.format] = {"tag": output_tag(request, profile.format), "digest": root["digest"],
                                   "mediaType": root["mediaType"], "size": root["size"]}
        if request.dump_manifest:
            outputs[profile.format]["dump"] = {
                "index.json": index_dump,
                "manifests": {d: outs[profile.format].get("dump", {}) for d, outs in by_source.items()}}
    metrics.observe_stage("push", time.monotonic() - started)
    return finish(job, outputs)
