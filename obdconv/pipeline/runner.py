"""The local runner: `convert(request)` runs the four stages on this machine, no servers needed.

    plan (resolve the image) -> prepare every distinct layer   [process pool, all at once]
    per manifest (at most `concurrency_limit` at once):
        metadata (layers in order, in the manifest's thread, each as soon as its prepare is done)
        -> build each layer x format [pool; as soon as its metadata is applied]
        -> send it into an upload session [threads of this process; as soon as it is built]
        -> commit it [once every prepare of the manifest is done and verified; else cancel]
        -> push config + manifest per format
    then every index per format, children before parents; only the root is tagged.

`--overlaybd` and `--turboOCI` together share ONE download/prepare and ONE metadata pass per
manifest; only assemble and push run per format. Worker processes open repositories themselves
(by name + options), so no connection or file handle crosses a process boundary.

Worker processes start through multiprocessing's "forkserver" (not "fork": the runner has threads
running, and forking a process with threads can copy held locks), so a script calling `convert`
with workers > 1 needs the usual `if __name__ == "__main__":` guard.

Progress: `progress(event)` gets `ProgressEvent`s (stage, format, manifest, layer index/digest,
bytes done/total); prepare reports bytes read while it streams.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from obdconv.dedup.store import open_store
from obdconv.entries import LayerEntry
from obdconv.errors import BadInputError, ObdconvError
from obdconv.gcpause import gc_paused
from obdconv.interpreter import start_forkserver
from obdconv.leftovers import RunRecord, remove_leftovers
from obdconv.pipeline.assemble import ConvertedLayer, native_head_room
from obdconv.pipeline.baselayer import push_base_layer, resolve_base_layer, with_base
from obdconv.pipeline.entrystream import streamed_entries
from obdconv.pipeline.feasibility import Refusal, deliverable, refusals
from obdconv.pipeline.flatten import encode_ranges
from obdconv.pipeline.forkserver import PRELOAD, pool_size
from obdconv.pipeline.metadata import MetadataPass, encode_metadata
from obdconv.pipeline.parents import read_back_parents
from obdconv.pipeline.plan import ImagePlan, ManifestPlan, resolve_image
from obdconv.pipeline.pool import (
    InlineExecutor,
    ProgressDrain,
    init_worker,
    process_repositories,
    run_all,
    stop_workers_now,
    task_build,
    task_build_flat,
    task_commit,
    task_prepare,
    task_send,
    thread_priority_raised,
)
from obdconv.pipeline.prepare import OLD_PREFIX, PREP_PREFIX, PreparedLayer, load_prepared, spool_key
from obdconv.pipeline.push import PushedManifest, push_index, push_manifest
from obdconv.pipeline.results import ConversionResult, OutputResult, ProgressEvent, ProgressFn, RunnerOptions
from obdconv.pipeline.reuse import ManifestReuse, Reuse
from obdconv.pipeline.validate import validate_request
from obdconv.registry import PendingBlob, RegistryOptions, open_repository
from obdconv.request import ConversionProfile, ConversionRequest

log = logging.getLogger(__name__)

STREAMS_DIR = ".entry-streams"  # under the work directory: the prepares' entry streams (entrystream.py)




# --------------------------------------------------------------------------------------------
# the run


class _Run:
    def __init__(self, request: ConversionRequest, options: RunnerOptions, progress: ProgressFn | None) -> None:
        validate_request(request)
        # --mkfs=false: the base layer pinned by digest (profiles name it), the vsize its own
        self.request, self.base = resolve_base_layer(request)
        request = self.request
        self.options = options
        self.progress = progress
        self.profiles = request.profiles()
        self.refused: dict[str, Refusal] = {}  # formats the image cannot become (feasibility.py)
        self.registry = options.registry or RegistryOptions.from_access(request.access)
        self.source_name = request.repository
        self.target_name = request.output_repository or request.repository
        self.workdir = Path(request.workdir)
        self.spool_dir = Path(options.spool_dir) if options.spool_dir else self.workdir / "spool"
        self.upload = not request.no_upload
        self.oci = request.oci or request.referrer
        self.timings: dict[str, float] = {}
        self.timing_lock = threading.Lock()
        self.push_lock = threading.Lock()
        self.prepare_futures: dict[str, Future[tuple[dict[str, Any], float]]] = {}
        self.entry_streams: dict[str, str] = {}  # digest -> file its prepare streams entries to ("" none)
        self.prepared: dict[str, PreparedLayer] = {}
        self.created_spools: list[Path] = []
        self.metadata_workdirs: list[Path] = []
        self.prepare_lock = threading.Lock()
        self.reuse_of: dict[str, ManifestReuse] = {}
        self.native = any(p.format == "native" for p in self.profiles)
        self.turbo = any(p.format == "turbo" for p in self.profiles)

    # -- helpers
    def emit(self, event: ProgressEvent) -> None:
        if self.progress is not None:
            try:
                self.progress(event)
            except Exception:  # a broken progress display must never fail a conversion
                log.exception("progress callback failed")

    def add_time(self, stage: str, seconds: float) -> None:
        with self.timing_lock:
            self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def tag_for(self, profile: ConversionProfile) -> str:
        return self.request.overlaybd_tag if profile.format == "native" else self.request.turbo_tag

    # -- stages
    def ensure_prepares(self, pool: Executor, m: ManifestPlan, start: int) -> None:
        """Submit a prepare for each layer of `m` from `start` not submitted yet (one per distinct
        digest, shared by every manifest of the run)."""
        r = self.request
        with self.prepare_lock:
            for k, layer in enumerate(m.layers[start:], start):
                digest = layer["digest"]
                if digest in self.prepare_futures:
                    continue
                i = len(self.prepare_futures)
                if load_prepared(self.spool_dir, digest, r.algorithm, r.block_size) is None:
                    self.created_spools.append(self.spool_dir / spool_key(digest, r.algorithm, r.block_size))
                    if not (r.reserve or self.options.keep_spool):
                        self.record.add(self.created_spools[-1])
                self.emit(ProgressEvent("prepare", i, digest, 0, int(layer.get("size") or 0)))
                # A pool worker streams the entries to the metadata pass as it scans them (inline
                # tasks are done before the pass starts: they need not).
                stream = "" if isinstance(pool, InlineExecutor) else str(self.workdir / STREAMS_DIR / f"{i}.entries")
                self.entry_streams[digest] = stream
                self.prepare_futures[digest] = pool.submit(
                    task_prepare, self.source_name, self.registry, layer, str(self.spool_dir),
                    self.native, self.turbo, r.algorithm, r.block_size, i, stream,
                    native_head_room(self.profiles, self.upload, self.target_repo, m.chain_ids, k))

    def entry_parts(self, digest: str) -> Iterator[list[LayerEntry]]:
        """The layer's entries in parts, as its prepare finds them (see entrystream.py)."""
        return streamed_entries(self.entry_streams.get(digest) or None, self.prepare_futures[digest].done,
                                partial(self.wait_prepared, digest))

    def wait_prepared(self, digest: str) -> PreparedLayer:
        result, seconds = self.prepare_futures[digest].result()
        with self.timing_lock:
            if digest not in self.prepared:
                self.prepared[digest] = PreparedLayer.from_dict(result)
                self.timings["prepare"] = self.timings.get("prepare", 0.0) + seconds
            return self.prepared[digest]

    def convert_manifest(self, pool: Executor, m: ManifestPlan, root: bool,
                         outputs: dict[str, OutputResult]) -> dict[str, PushedManifest]:
        # Dedup lookups and claims happen here, in this manifest's own thread and in chain order, so
        # a runner never waits for another while holding claims that one needs (no deadlock).
        reuse = self.reuse.lookup(m, self.profiles, {p.format: self.tag_for(p) for p in self.profiles}
                                  if root else {})
        self.reuse_of[m.digest] = reuse
        pushed: dict[str, PushedManifest] = dict(reuse.manifests)
        for fmt, hit in reuse.manifests.items():
            outputs[fmt].manifests[m.digest] = hit.digest
        todo = reuse.todo(self.profiles)
        if not todo:
            return pushed
        n = len(m.layers)
        starts = {p.format: len(reuse.layers.get(p.format, [])) for p in todo}
        name = m.platform.replace("/", "_") or "image"
        workdir = self.workdir / f"{name}-{m.digest.partition(':')[2][:16]}"
        self.metadata_workdirs.append(workdir)  # removed at the end of the run even when it fails
        if not self.request.reserve:
            self.record.add(workdir)  # or by a later run, if this one is killed
        # One metadata pass serves every format when all start from mkfs; formats continuing from
        # dedup hits each start from their own converted parents (which may differ in bytes).
        groups = [(0, todo)] if all(v == 0 for v in starts.values()) else [(starts[p.format], [p]) for p in todo]
        self.ensure_prepares(pool, m, min(starts.values()))
        futures: dict[tuple[str, int], Future[tuple[dict[str, Any], float]]] = {}
        for start, group in groups:
            if start < n:
                self.metadata_and_assemble(pool, m, start, group, reuse, workdir / group[0].format, futures)
        for profile in todo:
            layers = list(reuse.layers.get(profile.format, []))
            # a flattened image has one layer, filed under the top chain id (none for no layers)
            indexes = ([n - 1] if n else []) if profile.flatten else range(len(layers), n)
            for i in indexes:
                result, seconds = futures[(profile.format, i)].result()
                self.add_time("assemble", seconds)
                layer = ConvertedLayer.from_dict(result)
                layers.append(layer)
                if self.upload and not profile.flatten:  # flattened output is deduplicated per manifest only
                    self.reuse.record_layer(profile, m.chain_ids[i], layer)
                self.emit(ProgressEvent("assemble", i, m.layers[i]["digest"], 1, 1, m.digest, profile.format,
                                        finished=True))
            chain_keys = m.chain_ids[-1:] if profile.flatten else m.chain_ids
            for chain_id, layer in zip(chain_keys, layers, strict=False):
                outputs[profile.format].layers[chain_id] = layer.to_dict()
            t = time.monotonic()
            dump_dir = self.dump_dir(profile, m) if self.request.dump_manifest else None
            with self.push_lock:
                self.check_not_aborted()
                base = (push_base_layer(self.target_repo, self.base, profile.format, oci=self.oci, upload=self.upload)
                        if self.base is not None else None)
                layers = with_base(base, layers)
                pushed[profile.format] = push_manifest(
                    self.target_repo, source_manifest=m.data.encode(), source_config=m.config.encode(),
                    source_desc=m.descriptor, fmt=profile.format, layers=[x.descriptor() for x in layers],
                    diff_ids=[x.diff_id for x in layers], oci=self.oci, referrer=self.request.referrer,
                    ref=self.tag_for(profile) if root else "", upload=self.upload, dump_dir=dump_dir,
                    flattened=n if profile.flatten else 0)
            if self.upload:
                self.reuse.record_manifest(profile, m, pushed[profile.format])
            self.add_time("push", time.monotonic() - t)
            outputs[profile.format].manifests[m.digest] = pushed[profile.format].digest
            self.emit(ProgressEvent("push", manifest=m.digest, format=profile.format, finished=True))
        reuse.release()  # results are recorded: waiters find them now
        if not self.request.reserve:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)
        return pushed

    def metadata_and_assemble(self, pool: Executor, m: ManifestPlan, start: int, group: list[ConversionProfile],
                              reuse: ManifestReuse, workdir: Path,
                              futures: dict[tuple[str, int], Future[tuple[dict[str, Any], float]]]) -> None:
        """Apply layers start.. to ext4 in order, here, as each one's prepare finishes (metadata
        overlaps the prepares of later layers). Each applied layer's assembles then go in three
        steps, each as early as it may:
          build  (pool; CPU only, no registry access) at once, so a worker with no prepare left
                 to run builds instead of idling;
          send   (upload threads) as soon as built: the bytes stream into an upload session,
                 which is not a blob, so nothing is visible in the target yet;
          commit (in layer order) once every layer of the manifest has prepared, its digest
                 verified. A corrupt blob anywhere in the manifest leaves the registry untouched:
                 every sent layer is cancelled, before the error is raised. (An error in the
                 metadata of a later layer can leave earlier layer blobs committed but
                 unreferenced, as the reference convertor does.)

        `futures[(format, i)]` gets, at once, a future of (ConvertedLayer dict, build + upload
        seconds), resolved when that commit is done. With a process pool three helper threads run
        beside this loop: one opens the commit gate the moment the last prepare finishes (not when
        the metadata apply under way returns: a big layer's metadata takes seconds, and it is the
        critical path), one starts the sends, one commits (or cancels)."""
        n = len(m.layers)
        parents = self.base.device() if self.base is not None else None
        if start:
            fmt = group[0].format
            t = time.monotonic()
            parents = read_back_parents(self.target_repo, fmt, [x.digest for x in reuse.layers[fmt][:start]],
                                        [x["digest"] for x in m.layers[:start]], workdir / "parents",
                                        below=[self.base.open()] if self.base is not None else [])
            self.add_time("parents", time.monotonic() - t)
        self.emit(ProgressEvent("metadata", manifest=m.digest, total=n - start))
        own_prepares = [self.prepare_futures[layer["digest"]] for layer in m.layers[start:]]
        built_dir = str(workdir / "built")

        def all_prepared() -> bool:
            """Every layer prepared, its blob digest verified and its diff_id as the config says."""
            return all(f.done() and not f.cancelled() and f.exception() is None
                       and f.result()[0]["diff_id"] == m.diff_ids[start + k] for k, f in enumerate(own_prepares))

        gate_open = threading.Event()  # every prepare finished cleanly (or the loop stopped)
        stopped = threading.Event()  # the metadata loop failed: commit nothing more
        Result = Future[tuple[dict[str, Any], float]]
        # Builds in submission (= layer) order, for the sender; then sends, for the committer.
        # None ends each queue.
        builds: queue.Queue[tuple[Result, Result] | None] = queue.Queue()
        sends: queue.Queue[tuple[Result, dict[str, Any], float, Future[tuple[PendingBlob, float]]] | None] = \
            queue.Queue()

        def sender() -> None:
            """Starts each layer's upload session as soon as it is built: the bytes go to the
            registry before the gate opens, but no blob exists until the committer commits."""
            try:
                while (item := builds.get()) is not None:
                    build, result = item
                    if stopped.is_set() or self.aborted.is_set():
                        result.set_exception(ObdconvError("conversion stopped before this layer was sent"))
                        continue
                    try:
                        built, build_seconds = build.result()
                        self.add_time("assemble.build", build_seconds)
                        send = self.uploads.submit(task_send, built, self.target_repo, self.upload)
                    except BaseException as e:  # handed to the manifest thread waiting on `result`
                        result.set_exception(e)
                        continue
                    sends.put((result, built, build_seconds, send))
            finally:
                sends.put(None)

        def committer() -> None:
            """Once every prepare is verified, commits the sent layers in order; if the manifest
            failed instead, cancels them (nothing sent becomes a blob)."""
            gate_open.wait()
            while (item := sends.get()) is not None:
                result, built, build_seconds, send = item
                try:
                    pending, send_seconds = send.result()
                except BaseException as e:  # likewise
                    result.set_exception(e)
                    continue
                if stopped.is_set() or self.aborted.is_set():
                    pending.cancel()
                    result.set_exception(ObdconvError("conversion stopped before this layer was committed"))
                    continue
                # In an upload thread, not here: a turbo commit may copy the whole source blob into
                # another registry first, and layers should not wait for each other's copies.
                try:
                    commit = self.uploads.submit(task_commit, built, pending, self.target_repo, self.source_repo,
                                                 self.upload, self.oci)
                except BaseException as e:  # likewise
                    pending.cancel()
                    result.set_exception(e)
                    continue
                commit.add_done_callback(partial(self.resolve_layer, result, pending, build_seconds, send_seconds))

        def open_gate_when_prepared() -> None:
            wait(own_prepares)
            if all_prepared():
                gate_open.set()

        # Inline (workers=1) tasks run at submit time, in the submitting thread: keep them all in
        # this one, in order (uploads after the loop), so a one-process run stays simple to debug.
        helpers: list[threading.Thread] = []
        if not isinstance(pool, InlineExecutor):
            helpers = [threading.Thread(target=fn, name=f"assemble-{fn.__name__}", daemon=True)
                       for fn in (open_gate_when_prepared, sender, committer)]
            for helper in helpers:
                helper.start()
            with self.timing_lock:
                self.helper_threads.extend(helpers)
        flat_inputs: list[tuple[dict[str, Any], bytes]] = []  # --flatten: (prepared, metadata) per layer
        t = time.monotonic()
        try:
            with thread_priority_raised(self.options.metadata_boost), \
                    MetadataPass(self.request.vsize_gb, m.chain_ids, workdir, parents,
                                 keep_image=self.request.reserve) as metadata_pass:
                self.add_time("metadata", time.monotonic() - t)
                for i in range(start, n):
                    # Applied while the layer is still being prepared (its entries stream in); the
                    # layer's objects are dropped before the collector may walk them (gcpause.py).
                    busy = metadata_pass.busy_seconds
                    with gc_paused():
                        digest = m.layers[i]["digest"]
                        applied = metadata_pass.apply_parts(self.entry_parts(digest), digest)
                        prepared = self.wait_prepared(digest)
                        if prepared.diff_id != m.diff_ids[i]:
                            raise BadInputError(f"manifest {m.digest}: layer {m.layers[i]['digest']} has diff_id "
                                                f"{prepared.diff_id}, config says {m.diff_ids[i]}")
                        t = time.monotonic()
                        encoded = encode_metadata(applied)
                        del applied
                    self.add_time("metadata", metadata_pass.busy_seconds - busy + time.monotonic() - t)
                    self.emit(ProgressEvent("metadata", i, m.layers[i]["digest"], 1, 1, m.digest, finished=True))
                    for profile in group:
                        if profile.flatten:  # one build of all layers, after the last one
                            flat_inputs.append((prepared.to_dict(), encoded))
                            continue
                        result: Future[tuple[dict[str, Any], float]] = Future()
                        futures[(profile.format, i)] = result
                        build = pool.submit(task_build, prepared.to_dict(), encoded, asdict(profile), m.chain_ids[i],
                                            m.chain_ids[i - 1] if i else "", built_dir)
                        builds.put((build, result))
                for profile in (p for p in group if p.flatten):
                    # The flattened layer stands for the whole chain: filed under the top layer.
                    futures[(profile.format, n - 1)] = result = Future()
                    build = pool.submit(task_build_flat, flat_inputs, encode_ranges(metadata_pass.allocated_blocks()),
                                        asdict(profile), m.chain_ids[-1], built_dir)
                    builds.put((build, result))
        except BaseException:
            stopped.set()
            gate_open.set()
            builds.put(None)
            # Sent layers must be cancelled before the error reaches the caller (no upload session
            # or temp file left behind): wait for the sender and committer to drain.
            for helper in helpers[1:]:
                helper.join()
            raise
        # Every layer was waited for and checked by the loop above, so all prepared cleanly here.
        gate_open.set()
        builds.put(None)
        if not helpers:
            sender()
            committer()

    def check_not_aborted(self) -> None:
        if self.aborted.is_set():
            raise ObdconvError("conversion aborted: not pushing")

    def resolve_layer(self, result: Future[tuple[dict[str, Any], float]], pending: PendingBlob, build_seconds: float,
                      send_seconds: float, commit: Future[tuple[dict[str, Any], float]]) -> None:
        """Hand a committed layer (or the commit's error) to the manifest thread waiting on `result`."""
        try:
            layer, commit_seconds = commit.result()
        except BaseException as e:  # the waiting manifest thread raises it
            pending.cancel()  # a commit cancelled with the run never ran (no-op when it failed itself)
            result.set_exception(e)
            return
        self.add_time("assemble.upload", send_seconds + commit_seconds)
        result.set_result((layer, build_seconds + send_seconds + commit_seconds))

    def dump_dir(self, profile: ConversionProfile, m: ManifestPlan) -> Path:
        platform = m.platform.replace("/", "_")
        return self.workdir / profile.format / f"{platform}-{m.digest.partition(':')[2]}"

    def run(self) -> ConversionResult:
        started = time.monotonic()
        request = self.request
        self.source_repo = open_repository(self.source_name, self.registry)
        self.target_repo = (self.source_repo if self.target_name == self.source_name
                            else open_repository(self.target_name, self.registry))
        _repos_in_process = {self.source_name: self.source_repo, self.target_name: self.target_repo}
        ref = request.input_tag or request.input_digest
        t = time.monotonic()
        self.emit(ProgressEvent("plan"))
        plan = resolve_image(self.source_repo, ref, request.platforms)
        self.add_time("plan", time.monotonic() - t)
        self.emit(ProgressEvent("plan", finished=True, total=len(plan.manifests)))
        outputs = {p.format: OutputResult(p.format, self.target_name, self.tag_for(p)) for p in self.profiles}
        self.refused = refusals(plan, self.profiles, self.source_repo, self.base)
        self.profiles = deliverable(self.profiles, self.refused, all_or_nothing=request.all_or_nothing)
        for fmt, refusal in self.refused.items():
            outputs[fmt].error = refusal.to_dict()
        self.native = any(p.format == "native" for p in self.profiles)
        self.turbo = any(p.format == "turbo" for p in self.profiles)
        workers = pool_size(self.options.workers)
        drain: ProgressDrain | None = None
        # Uploads run in threads of this process, not in the pool: an upload mostly waits for the
        # registry (it hashes and sends with the GIL released), and in a pool worker it would hold
        # a slot that a prepare or build could use meanwhile. Threads share this process's
        # repositories (one connection pool) and need nothing pickled.
        self.uploads: Executor = (ThreadPoolExecutor(max(2, workers), thread_name_prefix="upload") if workers > 1
                                  else InlineExecutor())
        self.aborted = threading.Event()  # the run failed: committers cancel instead of committing
        self.helper_threads: list[threading.Thread] = []
        if workers > 1:
            # The fork server imports the pipeline once and every worker forks with it loaded,
            # instead of each worker importing it (~0.2 s of CPU each) before its first task.
            # "__main__" is multiprocessing's default preload, kept. (No effect once the server
            # runs, e.g. on a second convert in the same process.) Started with a safe sys.path:
            # see obdconv/interpreter.py.
            ctx = start_forkserver(PRELOAD)
            progress_queue = ctx.Queue()
            pool: Executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker,
                                                 initargs=(progress_queue, os.getpid()))
            drain = ProgressDrain(progress_queue, self.emit)
        else:
            process_repositories.update(_repos_in_process)
            init_worker(_DirectQueue(self))
            pool = InlineExecutor()
        # What this run makes under --dir and in the spool is recorded, so that a later run removes
        # it if this one is killed; and it removes what killed runs left (obdconv/leftovers.py).
        self.record = RunRecord.start(self.workdir, self.spool_dir)
        if not isinstance(pool, InlineExecutor):
            self.record.add(self.workdir / STREAMS_DIR)  # the prepares' entry streams (ensure_prepares)
        remove_leftovers(self.spool_dir, [PREP_PREFIX, OLD_PREFIX], time.time())
        try:
            self.open_reuse()
            results = self.convert_manifests(pool, plan, outputs)
            self.push_indexes(plan, results, outputs)
        except BaseException:
            self.aborted.set()
            for f in self.prepare_futures.values():
                f.cancel()
            raise
        finally:
            def stop_executors() -> None:
                pool.shutdown(wait=True, cancel_futures=True)
                self.uploads.shutdown(wait=True, cancel_futures=True)
                # A failed run leaves no upload session open: committers still holding sent layers
                # cancel them (their manifest may have failed elsewhere, e.g. in another layer's upload).
                for thread in self.helper_threads:
                    thread.join()

            def stop_progress() -> None:
                if drain is not None:
                    drain.stop()
                if workers <= 1:
                    init_worker(None)
                    for name in _repos_in_process:
                        process_repositories.pop(name, None)

            def release() -> None:
                for reuse in getattr(self, "reuse_of", {}).values():
                    reuse.release()
                store = getattr(self, "store", None)
                if store is not None:
                    store.close()
                for repo in {id(r): r for r in _repos_in_process.values()}.values():
                    with contextlib.suppress(Exception):
                        repo.close()

            def remove_files() -> None:
                if not (request.reserve or self.options.keep_spool):
                    for path in self.created_spools:
                        shutil.rmtree(path, ignore_errors=True)
                # A failed manifest's metadata work directory: MetadataPass removed the image inside,
                # the directories stay (a successful manifest removed its own already).
                if not request.reserve:
                    for path in self.metadata_workdirs:
                        shutil.rmtree(path, ignore_errors=True)
                shutil.rmtree(self.workdir / STREAMS_DIR, ignore_errors=True)
                # Spools being written by workers an interrupt killed (their locks died with them).
                remove_leftovers(self.spool_dir, [PREP_PREFIX, OLD_PREFIX], time.time())
                self.record.finish()  # also removes the spool and --dir if this run made them and they are empty

            run_all(stop_executors, stop_progress, release, remove_files)
        self.timings["total"] = time.monotonic() - started
        self.emit(ProgressEvent("done", finished=True))
        return ConversionResult(list(outputs.values()), plan.root["digest"], self.upload, dict(self.timings))

    def open_reuse(self) -> None:
        """The dedup store (a disabled one without --db-type) and the lookups over it."""
        request = self.request
        self.store = open_store(request.db_type, self.options.db_str, request.db_required)
        host = getattr(self.target_repo, "host", "")

        def open_sibling(name: str) -> Any:
            return open_repository(f"{host}/{name}", self.registry)

        self.reuse = Reuse(self.store, self.target_repo, open_sibling, oci=self.oci, referrer=request.referrer,
                           enabled=self.upload and bool(host), claim_timeout=self.options.claim_timeout)

    def convert_manifests(self, pool: Executor, plan: ImagePlan,
                          outputs: dict[str, OutputResult]) -> dict[str, dict[str, PushedManifest]]:
        manifests = list(plan.manifests.values())
        root_is_manifest = not plan.root_is_index
        limit = self.request.concurrency_limit if self.request.concurrency_limit > 0 else len(manifests)
        results: dict[str, dict[str, PushedManifest]] = {}
        with ThreadPoolExecutor(max(1, min(limit, len(manifests) or 1)), thread_name_prefix="manifest") as threads:
            futures = {m.digest: threads.submit(self.convert_manifest, pool, m, root_is_manifest, outputs)
                       for m in manifests}
            try:
                for digest, f in futures.items():
                    results[digest] = f.result()
            except BaseException as e:
                # E.g. Ctrl-C here, or another manifest failed: manifests still running must not go
                # on to commit layers or push (leaving this `with` waits for them).
                self.aborted.set()
                for f in futures.values():
                    f.cancel()
                if isinstance(e, KeyboardInterrupt):  # Ctrl-C, SIGTERM: running tasks are not waited for
                    stop_workers_now(pool)
                raise
        if root_is_manifest:
            for fmt, out in outputs.items():
                if out.error:  # a format the image could not become: nothing converted
                    continue
                pm = results[plan.root["digest"]][fmt]
                out.root_digest, out.root_media_type, out.root_size = pm.digest, pm.media_type, pm.size
        return results

    def push_indexes(self, plan: ImagePlan, manifests: dict[str, dict[str, PushedManifest]],
                     outputs: dict[str, OutputResult]) -> None:
        for profile in self.profiles:
            fmt = profile.format
            converted: dict[str, dict[str, Any]] = {d: r[fmt].descriptor() for d, r in manifests.items()}
            for index in plan.indexes:  # children before parents
                root = index.digest == plan.root["digest"]
                start = time.monotonic()
                dump = self.workdir / fmt / "index.json" if self.request.dump_manifest and root else None
                children = [converted[c] if c else None for c in index.children]
                with self.push_lock:
                    desc = push_index(self.target_repo, source_index=index.data.encode(),
                                      source_desc=index.descriptor, children=children, fmt=fmt, oci=self.oci,
                                      referrer=self.request.referrer, ref=self.tag_for(profile) if root else "",
                                      upload=self.upload, dump_path=dump)
                self.add_time("push", time.monotonic() - start)
                converted[index.digest] = desc
                outputs[fmt].indexes[index.digest] = desc["digest"]
                if root:
                    out = outputs[fmt]
                    out.root_digest, out.root_media_type, out.root_size = desc["digest"], desc["mediaType"], desc["size"]
                self.emit(ProgressEvent("index", manifest=index.digest, format=fmt, finished=True))


class _DirectQueue:
    """Progress events of inline tasks go straight to the callback."""

    def __init__(self, run: _Run) -> None:
        self.run = run

    def put(self, event: ProgressEvent) -> None:
        self.run.emit(event)


def convert(request: ConversionRequest, *, options: RunnerOptions | None = None,
            progress: ProgressFn | None = None) -> ConversionResult:
    """Convert `request` on this machine. Raises an `ObdconvError` subclass on failure; with any
    failure nothing more is pushed (layers already uploaded stay, like the reference)."""
    run = _Run(request, options or RunnerOptions(), progress)
    try:
        return run.run()
    except ObdconvError:
        raise
    except OSError as e:
        # A full disk is reported by write(), without a file name: say which directory filled up.
        full = e.errno in (errno.ENOSPC, errno.EDQUOT) and not e.filename
        where = f" (writing under --dir {request.workdir})" if full else ""
        raise ObdconvError(f"conversion failed: {e}{where}") from e
