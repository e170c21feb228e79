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
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import chain, chord
from celery.canvas import Signature

from obdconv.pipeline import push as push_stage
from obdconv.pipeline.assemble import ConvertedLayer
from obdconv.pipeline.plan import IndexPlan, ManifestPlan, resolve_image
from obdconv.pipeline.push import PushedManifest
from obdconv.pipeline.request import ConversionRequest
from obdconv.status import record_success
from tasks.base import FleetTask
from tasks.context import open_repository, open_worker_database, settings
from tasks.dedup import find_manifest_hits, remember_manifest
from tasks.stages import (
    _broker_client,
    assemble_layer_task,
    build_metadata_task,
    mark_stage,
    prepare_layer_task,
    request_of,
)
from workers.app import app
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


def compact_repr(**fields: Any) -> str:
    """What Flower and worker logs show as a task's kwargs: the request id and what the task works
    on, instead of the whole job (long, and truncated by Celery at 1 KiB)."""
    return json.dumps(fields, separators=(", ", ": "))


def output_tag(request: ConversionRequest, fmt: str) -> str:
    return request.overlaybd_tag if fmt == "native" else request.turbo_tag


def _target_repo(request: ConversionRequest) -> Any:
    return open_repository(request.output_repository or request.repository, request.access)


def manifest_canvas(job: dict[str, Any]) -> Signature:
    """prepare chord -> metadata -> schedule_assemble, for the manifest in `job["manifest"]`."""
    slim = {"request_id": job["request_id"], "request": job["request"]}
    layers = job["manifest"]["layers"]
    rid, digest = job["request_id"], job["manifest"]["descriptor"]["digest"]
    prepares = [prepare_layer_task.signature(kwargs={"job": slim, "layer": layer},
                                             kwargsrepr=compact_repr(request_id=rid, layer=layer["digest"]))
                for layer in layers]
    return chain(chord(prepares, build_metadata_task.signature(
                     kwargs={"job": job}, kwargsrepr=compact_repr(request_id=rid, manifest=digest))),
                 schedule_assemble_task.signature(kwargs={"job": job},
                                                  kwargsrepr=compact_repr(request_id=rid, manifest=digest)))


def _manifest_job(job: dict[str, Any], manifest: ManifestPlan, *, is_root: bool) -> dict[str, Any]:
    return {"request_id": job["request_id"], "request": job["request"], "is_root": is_root,
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
    if not request.profiles():
        from obdconv.errors import UsageError

        raise UsageError("nothing to do: the request names no output tag")
    if settings().db_type:
        from obdconv.client import source_of
        from obdconv.status import record_running

        open_worker_database()
        record_running(job["request_id"], "plan", source=source_of(request), request=job["request"])
    source_repo = open_repository(request.repository, request.access)
    plan = resolve_image(source_repo, request.input_tag or request.input_digest, request.platforms)
    if not plan.root_is_index:
        manifest = plan.manifests[plan.root["digest"]]
        tags = {p.format: output_tag(request, p.format) for p in request.profiles()}
        if not request.no_upload:
            hits = find_manifest_hits(request, _target_repo(request), manifest.digest, tags)
            if hits is not None:  # every format already converted: nothing to run
                return finish(job, hits)
        return self.replace(manifest_canvas(_manifest_job(job, manifest, is_root=True)))
    manifest_jobs = [_manifest_job(job, m, is_root=False) for m in plan.manifests.values()]
    header = []
    for lane in lanes(manifest_jobs, request.concurrency_limit):
        steps = [convert_manifest_task.signature(args=(None,), kwargs={"job": lane[0]}, kwargsrepr=_mrepr(lane[0]))]
        steps += [convert_manifest_task.signature(kwargs={"job": j}, kwargsrepr=_mrepr(j)) for j in lane[1:]]
        header.append(chain(*steps) if len(steps) > 1 else steps[0])
    index_job = {"request_id": job["request_id"], "request": job["request"], "root": plan.root,
                 "indexes": [{"descriptor": i.descriptor, "data": i.data, "children": i.children}
                             for i in plan.indexes]}
    return self.replace(chord(header, push_index_task.signature(
        kwargs={"job": index_job}, kwargsrepr=compact_repr(request_id=job["request_id"], index=plan.root["digest"]))))


def _mrepr(job: dict[str, Any]) -> str:
    return compact_repr(request_id=job["request_id"], manifest=job["manifest"]["descriptor"]["digest"])


@app.task(bind=True, base=FleetTask, name=TASK_CONVERT_MANIFEST)
def convert_manifest_task(self: Any, previous: list[dict[str, Any]] | None, *, job: dict[str, Any]) -> Any:
    """One manifest of an index, in a lane: `previous` = results of the lane's earlier manifests."""
    return self.replace(manifest_canvas({**job, "acc": previous or []}))


@app.task(bind=True, base=FleetTask, name=TASK_SCHEDULE_ASSEMBLE)
def schedule_assemble_task(self: Any, metadata_result: dict[str, Any], *, job: dict[str, Any]) -> Any:
    """Route each layer's assemble to the worker holding its spool (if alive), then push."""
    mark_stage(job, "assemble")
    manifest = job["manifest"]
    chain_ids = manifest["chain_ids"]
    broker = _broker_client()
    header = []
    for i, (info, key) in enumerate(zip(metadata_result["layers"], metadata_result["metadata_keys"], strict=True)):
        queue = worker_queue(info["node"]) if is_worker_alive(broker, info["node"]) else ASSEMBLE
        kwargs = {"job": {"request_id": job["request_id"], "request": job["request"]}, "index": i,
                  "layer": manifest["layers"][i], "chain_id": chain_ids[i],
                  "parent_chain_id": chain_ids[i - 1] if i else "", "metadata_key": key}
        header.append(assemble_layer_task.signature(
            kwargs=kwargs, queue=queue,
            kwargsrepr=compact_repr(request_id=job["request_id"], layer=manifest["layers"][i]["digest"], index=i)))
    push = push_manifest_task.signature(
        kwargs={"job": job}, kwargsrepr=compact_repr(request_id=job["request_id"],
                                                     manifest=manifest["descriptor"]["digest"]))
    return self.replace(chord(header, push))


def finish(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    if settings().db_type:
        open_worker_database()
        record_success(job["request_id"], outputs)
    return {"outputs": outputs}


@app.task(bind=True, base=FleetTask, name=TASK_PUSH_MANIFEST)
def push_manifest_task(self: Any, assembled: list[dict[str, Any]], *, job: dict[str, Any]) -> Any:
    """Config + manifest per format. Root manifest: tagged, request finished. Otherwise the lane's
    accumulated results + this manifest's."""
    request = request_of(job)
    mark_stage(job, "push")
    manifest = job["manifest"]
    target = _target_repo(request)
    outputs: dict[str, Any] = {}
    for profile in request.profiles():
        layers = [ConvertedLayer.from_dict(a[profile.format]) for a in assembled]
        tag = output_tag(request, profile.format) if job["is_root"] else ""
        pushed = push_stage.push_manifest(
            target, source_manifest=manifest["data"].encode(), source_config=manifest["config"].encode(),
            source_desc=manifest["descriptor"], fmt=profile.format, layers=[x.descriptor() for x in layers],
            diff_ids=[x.diff_id for x in layers], oci=request.oci, referrer=request.referrer, ref=tag,
            upload=not request.no_upload)
        outputs[profile.format] = {**pushed.to_dict(), "tag": tag}
        if not request.no_upload:
            remember_manifest(request, target, manifest["descriptor"]["digest"], profile, pushed.media_type,
                              pushed.digest, pushed.size)
    if job["is_root"]:
        return finish(job, {fmt: _public(o) for fmt, o in outputs.items()})
    return [*job.get("acc", []), {"source_digest": manifest["descriptor"]["digest"], "outputs": outputs}]


def _public(o: dict[str, Any]) -> dict[str, Any]:
    return {"tag": o.get("tag", ""), "digest": o["digest"], "mediaType": o.get("media_type", o.get("mediaType")),
            "size": o["size"]}


@app.task(bind=True, base=FleetTask, name=TASK_PUSH_INDEX)
def push_index_task(self: Any, lane_results: list[list[dict[str, Any]]], *, job: dict[str, Any]) -> Any:
    """Rebuild every index (children first) per format; tag the root; finish the request."""
    request = request_of(job)
    mark_stage(job, "push")
    target = _target_repo(request)
    by_source = {r["source_digest"]: r["outputs"] for lane in lane_results for r in lane}
    root_digest = job["root"]["digest"]
    outputs: dict[str, Any] = {}
    for profile in request.profiles():
        converted: dict[str, dict[str, Any] | None] = {
            digest: PushedManifest.from_dict({k: v for k, v in outs[profile.format].items() if k != "tag"}).descriptor()
            for digest, outs in by_source.items()}
        for raw in job["indexes"]:
            index = IndexPlan(**raw)
            is_root = index.digest == root_digest
            tag = output_tag(request, profile.format) if is_root else ""
            converted[index.digest] = push_stage.push_index(
                target, source_index=index.data.encode(), source_desc=index.descriptor,
                children=[converted.get(c) if c else None for c in index.children], fmt=profile.format,
                oci=request.oci, referrer=request.referrer, ref=tag, upload=not request.no_upload)
        root = converted[root_digest]
        assert root is not None
        outputs[profile.format] = {"tag": output_tag(request, profile.format), "digest": root["digest"],
                                   "mediaType": root["mediaType"], "size": root["size"]}
    return finish(job, outputs)
