"""`--flatten` in the fleet: prepares and the metadata pass run as for a layered image; then ONE
task, `obdconv.assemble_flat`, builds and uploads the flattened layer (obdconv/pipeline/flatten.py)
from the prepared data areas of every layer.

Where it runs: on the worker whose spool holds the most prepared bytes of the manifest (its own
queue; the shared `assemble` queue when that worker is gone). Each layer's prepared data is then
taken, in this order, from:
1. this worker's spool;
2. the spool of the worker that prepared it, when that is readable here: workers on one machine
   share the spool root (`OBDCONV_SPOOL_DIR/<node>`), as do machines sharing it over the network;
   the layer is held against eviction there (flock) while it is read;
3. otherwise the layer is prepared again here (counted in `obdconv:runs:reprepare`). On a fleet of
   machines with separate spools that is the price of one assemble: every layer not prepared on the
   chosen worker is downloaded and decompressed again, once.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from typing import Any

from celery.canvas import Signature

from obdconv.errors import BadInputError
from obdconv.pipeline.assemble import upload_built
from obdconv.pipeline.flatten import build_flat_layer, decode_ranges
from obdconv.pipeline.metadata import decode_metadata
from obdconv.pipeline.prepare import PreparedLayer, reuse_prepared, spool_key
from tasks.base import FleetTask
from tasks.claims import held_claims
from tasks.context import open_repository, spool_dir
from tasks.progress import ProgressReporter
from tasks.spool import layer_in_use
from tasks.stages import _count_run, _prepare_here, _scratch_root, request_of
from tasks.transfer import get_bytes
from workers.app import app
from workers.lease import is_worker_alive
from workers.queues import ASSEMBLE, TASK_ASSEMBLE_FLAT, worker_queue

log = logging.getLogger(__name__)


def flat_node(prepared_results: list[dict[str, Any]], alive: Any) -> str | None:
    """The live worker holding the most prepared bytes among `prepared_results` (prepare task
    results); None when none of them is alive. Ties go to the first in layer order."""
    held: dict[str, int] = {}
    for info in prepared_results:
        held[info["node"]] = held.get(info["node"], 0) + int(info["prepared"].get("compressed_size") or 0)
    for node in sorted(held, key=lambda n: -held[n]):  # stable: layer order among equals
        if alive(node):
            return node
    return None


def assemble_flat_signature(job: dict[str, Any], manifest: dict[str, Any], metadata_result: dict[str, Any],
                            broker: Any, kwargsrepr: str) -> Signature:
    """The one assemble of a flattened manifest, routed to `flat_node`."""
    node = flat_node(metadata_result["layers"], lambda n: is_worker_alive(broker, n))
    return assemble_flat_task.signature(
        kwargs={"job": job, "layers": manifest["layers"], "prepared": metadata_result["layers"],
                "metadata_keys": metadata_result["metadata_keys"], "allocated_key": metadata_result["allocated_key"],
                "chain_id": manifest["chain_ids"][-1]},
        queue=worker_queue(node) if node else ASSEMBLE, kwargsrepr=kwargsrepr)


def _prepared_here(task: Any, job: dict[str, Any], layer: dict[str, Any], holder: str, node: str,
                   stack: contextlib.ExitStack) -> PreparedLayer:
    """The layer's prepared data readable by this worker, held against eviction until `stack` closes."""
    request = request_of(job)
    key = spool_key(layer["digest"], request.algorithm, request.block_size)
    for owner in dict.fromkeys([node, holder]):
        spool = spool_dir(owner)
        if not spool.is_dir():
            continue  # another machine's spool
        stack.enter_context(layer_in_use(spool, key))
        prepared = reuse_prepared(spool, layer["digest"], request.algorithm, request.block_size)
        if prepared is not None and prepared.native:
            return prepared
    log.warning("layer %s is not in a spool %s can read: preparing it again here", layer["digest"], node)
    stack.enter_context(layer_in_use(spool_dir(node), key))
    prepared = _prepare_here(task, job, layer, node)
    _count_run("reprepare", layer["digest"])
    return prepared


@app.task(bind=True, base=FleetTask, name=TASK_ASSEMBLE_FLAT)
def assemble_flat_task(self: Any, *, job: dict[str, Any], layers: list[dict[str, Any]],
                       prepared: list[dict[str, Any]], metadata_keys: list[str], allocated_key: str,
                       chain_id: str) -> dict[str, Any]:
    """Build and upload the flattened layer of a manifest -> {"native": ConvertedLayer dict}."""
    request = request_of(job)
    node = self.request.hostname
    profiles = [p for p in request.profiles() if p.flatten]
    if not profiles:
        raise BadInputError("obdconv.assemble_flat: the request does not ask for --flatten")
    with held_claims(job), contextlib.ExitStack() as stack:
        local = [_prepared_here(self, job, layer, info["node"], node, stack)
                 for layer, info in zip(layers, prepared, strict=True)]
        applied = [decode_metadata(get_bytes(key)) for key in metadata_keys]
        allocated = decode_ranges(get_bytes(allocated_key))
        out_dir = tempfile.mkdtemp(prefix="flat-", dir=_scratch_root(node))
        try:
            built = build_flat_layer(local, applied, allocated, profiles[0], chain_id, out_dir)
            source_repo = open_repository(request.repository, request.access)
            target_repo = (open_repository(request.output_repository, request.access)
                           if request.output_repository else source_repo)
            converted = upload_built(built, target_repo, upload=not request.no_upload,
                                     oci=request.oci or request.referrer)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
    _count_run("assemble", f"flat@{chain_id}")
    ProgressReporter(self, job, "assemble", chain_id).done(sum(p.source_size for p in local))
    return {"native": converted.to_dict()}
