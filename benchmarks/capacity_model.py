"""Capacity model of an obdconv fleet: a small discrete-event simulation (stdlib only), fed with the
costs benchmarks/measure_fleet_costs.py measured on this machine (benchmarks/capacity_costs.json).
docs/CAPACITY.md explains the model, its assumptions and its results.

    .venv/bin/python benchmarks/capacity_model.py                      # N = 1 ... 1000 workers
    .venv/bin/python benchmarks/capacity_model.py --workers 1,10,100 --slots 2 --hours 0.5
    .venv/bin/python benchmarks/capacity_model.py --validate           # bench_fleet.py's setup, N = 1, 2, 3

What is simulated, per request (one output format, as bench_fleet.py): the canvas of tasks/canvas.py
- convert, convert_manifest (dedup lookups and claims; a claim another request holds -> poll again
in 1 s), a prepare per layer still to convert (queue `prepare`), one metadata pass (`metadata`),
schedule_assemble, an assemble per layer on the worker that prepared it (its private queue), push.
Workers have `slots` pool processes; a free slot takes the next task from its private queue or the
shared queues, rotating between them (kombu's BRPOP over the queue list). Task times = measured CPU
seconds (a + b * MiB of tar) + registry transfer at `--link-mib-s` + a per-task dispatch overhead.
Workers on one machine share its cores (processor sharing: `--validate` puts N workers on this
2-core machine; the fleet gives each worker its own `slots` cores).

The image mix: `--repos` repositories with Zipf(`--zipf`) popularity; each on one of `--bases` base
images (Zipf popularity too; 3-10 layers, 20-80 MiB each), its own middle layers (so 5-50 layers in
all) and 1-3 top layers. A request asks for a repository's new tag (new top layers: the base and
middle layers are dedup hits once converted) or, with probability `--repeat`, a tag already
converted (a manifest dedup hit). Requests arrive as fast as the fleet takes them (a backlog is
kept), so images/hour is the fleet's capacity.

Redis and database load: per request, the commands and queries measured on a real fleet (cold
conversions of 3 and 12 layers give the per-layer and fixed parts; dedup hits their own; the claim
heartbeats every task of a request does are counted per task and claim), plus per worker and second
the idle traffic (BRPOP polls, leases, heartbeat events), plus the scan of the broker's keyspace
every worker's lease keeper does (workers/lease.py, `rescue_orphaned_queues`: SCAN COUNT 10 over
db 0, whose size grows with N), plus the fan-out of each worker heartbeat event to every other
worker's gossip subscription. Server cost = calls x (measured microseconds per call + the server's
per-command overhead measured by redis-benchmark).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
COSTS = HERE / "capacity_costs.json"
QUEUES = ("control", "prepare", "metadata", "assemble")


# -- inputs ----------------------------------------------------------------------------------------


@dataclass
class Costs:
    """Per-task costs in seconds, per-request service load, from capacity_costs.json."""

    prepare: tuple[float, float]  # CPU s = a + b * MiB of tar
    metadata: tuple[float, float]
    assemble: tuple[float, float]
    push: float
    control: float  # a control task's own work (plan, lookups, scheduling)
    overhead: float  # per task: dispatch, status rows, claims, results (fitted at N = 1 by --validate)
    blob_ratio: float  # compressed source blob / tar
    out_ratio: float  # converted blob / tar
    redis_cold: tuple[float, float, float]  # commands per request = a + b * converted + c * dedup-hit layers
    redis_hit: float  # commands of a manifest dedup hit
    redis_usec: float  # server microseconds per command, in the request mix (commandstats)
    db_cold: tuple[float, float, float]  # queries = a + b * converted + c * hit layers (heartbeats apart)
    db_hit: float
    idle_cmds: float  # per worker-second, at small N (BRPOP polls, lease ticks, heartbeats)
    idle_usec: float  # server microseconds per idle command
    scan_usec: float  # per SCAN COUNT 10 call
    redis_overhead_usec: float  # per command beyond its own execution (I/O, event loop): redis-benchmark
    db_cpu_per_query: float  # mariadbd CPU seconds per query (concurrent dedup-store queries)

    @classmethod
    def load(cls, path: Path) -> Costs:
        d = json.loads(path.read_text())
        fits = d["fits"]
        rows = d["stages_usr"]["layers"] + d["stages_sample"]["layers"]
        fleet = d["fleet"][0]
        poll_calls, _ = _totals(fleet["status_read"]["redis"])
        poll_db = fleet["status_read"]["db_queries"]

        def net(kind: str) -> tuple[float, float, float]:
            """(Redis commands, server usec, DB queries) of one request, minus idle traffic and polls."""
            r = fleet[kind]
            calls, usec = _totals(r["redis"])
            idle_calls, idle_usec = _totals(fleet["idle"]["redis"])
            share = r["seconds"] / fleet["idle"]["seconds"]
            db = r["db_queries"] - fleet["idle"]["db_queries"] * share - r["polls"] * poll_db
            return (calls - idle_calls * share - r["polls"] * poll_calls, usec - idle_usec * share,
                    db)

        c3, c12, hit, part = net("cold3"), net("cold12"), net("manifest_hit"), net("base_hit")
        # Claim heartbeats: every task that holds claims (L prepares, L assembles, metadata, push)
        # heartbeats all L + 1 claims once at its start: taken apart, it grows as L squared.
        per_claim = d.get("heartbeats") != "per-task"  # how the measured fleet beat its claims
        hb3, hb12 = heartbeat_queries(3, per_claim), heartbeat_queries(12, per_claim)
        db_b = ((c12[2] - hb12) - (c3[2] - hb3)) / 9
        db_a = c3[2] - hb3 - 3 * db_b
        red_b = (c12[0] - c3[0]) / 9
        red_a = c3[0] - 3 * red_b
        # base_hit: 3 layers, the 2 lowest dedup hits (read back as parents), 1 converted
        db_h = max((part[2] - heartbeat_queries(1, per_claim) - db_a - db_b) / 2, 0.0)
        red_h = max((part[0] - red_a - red_b) / 2, 0.0)
        idle_calls, idle_usec = _totals(fleet["idle"]["redis"])
        scan = fleet["idle"]["redis"].get("scan", [1, 12.0])
        bench = fleet.get("redis_benchmark") or {"set": 15000.0}
        set_usec = _usec_per_call(fleet, "set") or 2.0
        mariadb = d["mariadb_capacity"]
        return cls(
            prepare=tuple(fits["prepare_cpu"]), metadata=tuple(fits["metadata_cpu"]),  # type: ignore[arg-type]
            assemble=tuple(fits["assemble_cpu"]), push=d["stages_sample"]["push_cpu"],  # type: ignore[arg-type]
            control=0.02, overhead=0.15,
            blob_ratio=sum(r["blob_mib"] for r in rows) / sum(r["tar_mib"] for r in rows),
            out_ratio=sum(r["out_mib"] for r in rows) / sum(r["tar_mib"] for r in rows),
            redis_cold=(red_a, red_b, red_h), redis_hit=hit[0],
            redis_usec=(c3[1] + c12[1]) / max(c3[0] + c12[0], 1),
            db_cold=(db_a, db_b, db_h), db_hit=hit[2],
            idle_cmds=idle_calls / (fleet["idle"]["seconds"] * fleet["workers"]),
            idle_usec=idle_usec / max(idle_calls, 1),
            scan_usec=scan[1] / max(scan[0], 1),
            redis_overhead_usec=max(1e6 / bench["set"] - set_usec, 0.0),
            db_cpu_per_query=mariadb["server_cpu_s_per_query"],
        )


def heartbeat_queries(layers: int, per_claim: bool = False) -> int:
    """Claim heartbeats of a request converting `layers` layers: each task holding its claims (the
    prepares, the assembles, metadata, push) beats them once as it starts, in one statement now
    (tasks/claims.py); `per_claim`: one statement per claim, as before (quadratic)."""
    tasks = 2 * layers + 2
    return tasks * (layers + 1) if per_claim else tasks


def _totals(redis: dict[str, list[float]]) -> tuple[float, float]:
    return sum(v[0] for v in redis.values()), sum(v[1] for v in redis.values())


def _usec_per_call(fleet: dict[str, Any], command: str) -> float:
    calls, usec = fleet["cold12"]["redis"].get(command, [0, 0.0])
    return usec / calls if calls else 0.0


@dataclass
class Layer:
    chain: int  # chain id (identifies the layer with everything under it)
    mib: float  # uncompressed tar


@dataclass
class Image:
    repo: int
    tag: int
    layers: list[Layer]


class ImageMix:
    """Repositories on shared bases; each request is a new tag of a Zipf-popular repository, or a
    repeat of one already converted."""

    def __init__(self, rng: random.Random, repos: int, bases: int, zipf: float, repeat: float) -> None:
        self.rng = rng
        self.repeat = repeat
        self.next_chain = 0
        self.base_layers = [self._layers(rng.randint(3, 10), 20, 80) for _ in range(bases)]
        self.repo_weights = [1 / (i + 1) ** zipf for i in range(repos)]
        base_weights = [1 / (i + 1) ** zipf for i in range(bases)]
        self.repo_base = rng.choices(range(bases), base_weights, k=repos)
        self.repo_middle: dict[int, list[Layer]] = {}
        self.tags: dict[int, list[Image]] = {}

    def _layers(self, count: int, lo: float, hi: float) -> list[Layer]:
        out = []
        for _ in range(count):
            self.next_chain += 1
            out.append(Layer(self.next_chain, math.exp(self.rng.uniform(math.log(lo), math.log(hi)))))
        return out

    def next(self) -> Image:
        repo = self.rng.choices(range(len(self.repo_weights)), self.repo_weights)[0]
        known = self.tags.setdefault(repo, [])
        if known and self.rng.random() < self.repeat:
            return self.rng.choice(known)
        base = self.base_layers[self.repo_base[repo]]
        if repo not in self.repo_middle:  # the repository's own build layers, 5-50 in all
            total = self.rng.randint(max(5, len(base) + 2), 50)
            self.repo_middle[repo] = self._layers(max(total - len(base) - 2, 0), 0.5, 30)
        top = self._layers(self.rng.randint(1, 3), 0.01, 5)
        image = Image(repo, len(known), base + self.repo_middle[repo] + top)
        known.append(image)
        return image


# -- the simulation --------------------------------------------------------------------------------


@dataclass
class Task:
    kind: str
    request: Request
    work: float  # seconds on a dedicated core
    layer: int = -1


@dataclass
class Request:
    image: Image
    arrived: float
    start: int = 0  # first layer to convert (the leading ones are dedup hits)
    pending: int = 0
    preparer: dict[int, int] = field(default_factory=dict)  # layer index -> worker
    polls: int = 0
    manifest_hit: bool = False
    claimed: list[int] = field(default_factory=list)


@dataclass
class Machine:
    cores: float
    running: list[list[Any]] = field(default_factory=list)  # [remaining work, task, worker]
    last: float = 0.0
    version: int = 0


class Fleet:
    def __init__(self, costs: Costs, workers: int, slots: int, link_mib_s: float, shared_cores: float,
                 mix: ImageMix, backlog: int, rescue: str = "locked", heartbeats: str = "per-task") -> None:
        self.c = costs
        self.rescue = rescue
        self.heartbeats = heartbeats
        self.workers = workers
        self.slots = slots
        self.link = link_mib_s
        self.mix = mix
        self.backlog = backlog
        self.machines = ([Machine(shared_cores)] if shared_cores else
                         [Machine(float(slots)) for _ in range(workers)])
        self.machine_of = [0 if shared_cores else w for w in range(workers)]
        self.free = [slots] * workers
        self.shared: dict[str, deque[Task]] = {q: deque() for q in QUEUES}
        self.private: list[deque[Task]] = [deque() for _ in range(workers)]
        self.turn = [0] * workers
        self.idle_workers: set[int] = set(range(workers))
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.now = 0.0
        self.converted: set[int] = set()  # chains
        self.converted_images: set[tuple[int, int]] = set()
        self.claims: dict[int, int] = {}  # chain -> request id
        self.stats: dict[str, float] = {"done": 0, "manifest_hits": 0, "layers": 0, "layer_hits": 0,
                                        "polls": 0, "redis": 0, "db": 0, "tasks": 0}
        self.queue_area: dict[str, float] = dict.fromkeys((*QUEUES, "private"), 0.0)
        self.busy_area = 0.0
        self.private_len = 0
        self.arrivals: dict[str, int] = dict.fromkeys((*QUEUES, "private"), 0)
        self.busy = 0
        self.finished_at: list[float] = []
        self.started = 0.0

    # event plumbing
    def at(self, t: float, kind: str, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def account(self, dt: float) -> None:
        for q, tasks in self.shared.items():
            self.queue_area[q] += len(tasks) * dt
        self.queue_area["private"] += self.private_len * dt
        self.busy_area += self.busy * dt

    # requests
    def arrive(self) -> None:
        request = Request(self.mix.next(), self.now)
        self.enqueue(Task("convert", request, self.c.control + self.c.overhead))

    def enqueue(self, task: Task, worker: int | None = None) -> None:
        (self.private[worker] if worker is not None else self.shared[QUEUE_OF[task.kind]]).append(task)
        self.arrivals["private" if worker is not None else QUEUE_OF[task.kind]] += 1
        if worker is not None:
            self.private_len += 1
            if worker in self.idle_workers:
                self.dispatch(worker)
        elif self.idle_workers:
            self.dispatch(next(iter(self.idle_workers)))

    def dispatch(self, w: int) -> None:
        while self.free[w]:
            task = self._next_for(w)
            if task is None:
                self.idle_workers.add(w)
                return
            self.free[w] -= 1
            self.start(w, task)
        self.idle_workers.discard(w)

    def _next_for(self, w: int) -> Task | None:
        order = [self.private[w], *self.shared.values()]
        for i in range(len(order)):
            k = (self.turn[w] + i) % len(order)
            q = order[k]
            if q:
                self.turn[w] = (k + 1) % len(order)
                self.private_len -= k == 0
                self.busy += 1
                return q.popleft()
        return None

    # processor sharing per machine
    def start(self, w: int, task: Task) -> None:
        m = self.machines[self.machine_of[w]]
        self._advance(m)
        m.running.append([task.work, task, w])
        self._schedule(m)

    def _advance(self, m: Machine) -> None:
        if m.running:
            rate = min(1.0, m.cores / len(m.running))
            for entry in m.running:
                entry[0] -= (self.now - m.last) * rate
        m.last = self.now

    def _schedule(self, m: Machine) -> None:
        m.version += 1
        if m.running:
            rate = min(1.0, m.cores / len(m.running))
            t = self.now + max(min(e[0] for e in m.running), 0.0) / rate
            self.at(t, "machine", (m, m.version))

    def on_machine(self, m: Machine, version: int) -> None:
        if version != m.version:
            return
        self._advance(m)
        done = [e for e in m.running if e[0] <= 1e-9]
        m.running = [e for e in m.running if e[0] > 1e-9]
        self._schedule(m)
        for _, task, w in done:
            self.free[w] += 1
            self.busy -= 1
            self.finish(task, w)
            self.dispatch(w)

    # the canvas
    def finish(self, task: Task, w: int) -> None:
        r, c = task.request, self.c
        self.stats["tasks"] += 1
        if task.kind == "convert":
            self.enqueue(Task("convert_manifest", r, c.control + c.overhead))
        elif task.kind == "convert_manifest":
            self._lookup(r)
        elif task.kind == "prepare":
            r.preparer[task.layer] = w
            r.pending -= 1
            if not r.pending:
                layers = r.image.layers[r.start:]
                work = sum(c.metadata[0] + c.metadata[1] * x.mib for x in layers) + c.overhead + 0.05 * r.start
                self.enqueue(Task("metadata", r, work))
        elif task.kind == "metadata":
            self.enqueue(Task("schedule", r, c.control + c.overhead))
        elif task.kind == "schedule":
            r.pending = len(r.image.layers) - r.start
            for i in range(r.start, len(r.image.layers)):
                mib = r.image.layers[i].mib
                work = c.assemble[0] + c.assemble[1] * mib + mib * c.out_ratio / self.link + c.overhead
                self.enqueue(Task("assemble", r, work, i), worker=r.preparer[i])
        elif task.kind == "assemble":
            r.pending -= 1
            if not r.pending:
                self.enqueue(Task("push", r, c.push + c.overhead))
        elif task.kind == "push":
            for layer in r.image.layers:
                self.converted.add(layer.chain)
            for chain in r.claimed:
                self.claims.pop(chain, None)
            self.converted_images.add((r.image.repo, r.image.tag))
            self._done(r)

    def _lookup(self, r: Request) -> None:
        c = self.c
        if (r.image.repo, r.image.tag) in self.converted_images:
            r.manifest_hit = True
            self._done(r)
            return
        start = 0
        while start < len(r.image.layers) and r.image.layers[start].chain in self.converted:
            start += 1
        todo = [x.chain for x in r.image.layers[start:]]
        if any(self.claims.get(chain, id(r)) != id(r) for chain in todo):
            r.polls += 1  # another request converts some of them: look again in 1 s
            self.at(self.now + 1.0, "poll", r)
            return
        for chain in todo:
            self.claims[chain] = id(r)
        r.claimed, r.start, r.pending = todo, start, len(todo)
        for i in range(start, len(r.image.layers)):
            mib = r.image.layers[i].mib
            work = c.prepare[0] + c.prepare[1] * mib + mib * c.blob_ratio / self.link + c.overhead
            self.enqueue(Task("prepare", r, work, i))

    def _done(self, r: Request) -> None:
        c, s = self.c, self.stats
        converted = len(r.image.layers) - r.start if not r.manifest_hit else 0
        s["done"] += 1
        s["manifest_hits"] += r.manifest_hit
        s["layers"] += len(r.image.layers)
        s["layer_hits"] += len(r.image.layers) if r.manifest_hit else r.start
        s["polls"] += r.polls
        self.finished_at.append(self.now)
        if r.manifest_hit:
            s["redis"] += c.redis_hit + r.polls * c.redis_hit / 2
            s["db"] += c.db_hit + r.polls * c.db_hit / 2
        else:
            s["redis"] += (c.redis_cold[0] + c.redis_cold[1] * converted + c.redis_cold[2] * r.start
                           + r.polls * c.redis_hit / 2)
            s["db"] += (c.db_cold[0] + c.db_cold[1] * converted + c.db_cold[2] * r.start
                        + heartbeat_queries(converted, self.heartbeats == "per-claim") + r.polls * c.db_hit / 2)
        self.arrive()

    def warm(self, requests: int) -> None:
        """History before the measured window: `requests` conversions applied at once (the dedup
        database's state after them), not simulated task by task."""
        for _ in range(requests):
            image = self.mix.next()
            self.converted.update(x.chain for x in image.layers)
            self.converted_images.add((image.repo, image.tag))

    def run(self, requests: int) -> dict[str, float]:
        """Simulate until `requests` have finished; measure between the first fifth and the end."""
        for _ in range(self.backlog):
            self.arrive()
        mark = max(requests // 5, 1)
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            self.account(t - self.now)
            self.now = t
            if kind == "machine":
                self.on_machine(*payload)
            elif kind == "poll":
                self.enqueue(Task("convert_manifest", payload, self.c.control + self.c.overhead))
            if len(self.finished_at) == mark and kind != "reset":
                self.stats = dict.fromkeys(self.stats, 0)
                self.queue_area = dict.fromkeys(self.queue_area, 0.0)
                self.arrivals = dict.fromkeys(self.arrivals, 0)
                self.busy_area = 0.0
                self.started = self.now
                self.finished_at.append(-1.0)  # (marks the reset as done)
            if len(self.finished_at) > requests:
                break
        return self.report(self.now - self.started)

    def report(self, seconds: float) -> dict[str, float]:
        s, c, n = self.stats, self.c, self.workers
        keys_db0 = 10 + 3 * n + n * self.slots  # alive keys, private queues, bindings, in-flight ledger entries
        if self.rescue == "per-worker":  # before: every worker every lease/3 = 10 s, SCAN COUNT 10 over db 0
            scans_per_s = n / 10 * math.ceil(keys_db0 / 10)
        else:  # workers/lease.py now: one worker per period, SCAN COUNT 1000
            scans_per_s = 1 / 10 * math.ceil(keys_db0 / 1000)
        heartbeat_deliveries = n / 2 * (n - 1)  # an event every 2 s to every other worker (gossip)
        redis_cmds = s["redis"] / seconds + n * c.idle_cmds + scans_per_s
        def redis_busy(overhead_usec: float) -> float:
            return (s["redis"] / seconds * (c.redis_usec + overhead_usec)
                    + n * c.idle_cmds * (c.idle_usec + overhead_usec)
                    + scans_per_s * (c.scan_usec + overhead_usec)
                    + heartbeat_deliveries * DELIVERY_USEC) / 1e6

        db_q = s["db"] / seconds
        queues = {q: a / seconds for q, a in self.queue_area.items()}
        rates = {q: a / seconds for q, a in self.arrivals.items()}
        return {
            "workers": n, "images_per_hour": s["done"] / seconds * 3600,
            "manifest_hit_share": s["manifest_hits"] / max(s["done"], 1),
            "layer_hit_share": s["layer_hits"] / max(s["layers"], 1),
            "redis_cmds_per_s": redis_cmds, "redis_core_busy": redis_busy(c.redis_overhead_usec),
            "redis_core_busy_ref": redis_busy(max(1e6 / REDIS_REFERENCE_OPS - c.redis_usec, 0.0)),
            "redis_scan_share": scans_per_s / redis_cmds,
            "db_queries_per_s": db_q, "db_cpu_cores": db_q * c.db_cpu_per_query,
            "db_busy_ref": db_q / DB_REFERENCE_QPS,
            "busiest_queue": max(rates, key=lambda q: rates[q]), "busiest_queue_tasks_per_s": max(rates.values()),
            "longest_queue": max(queues, key=lambda q: queues[q]), "longest_queue_len": max(queues.values()),
            "slot_utilisation": self.busy_area / seconds / (n * self.slots),
            "polls_per_request": s["polls"] / max(s["done"], 1),
        }


QUEUE_OF = {"convert": "control", "convert_manifest": "control", "schedule": "control", "push": "control",
            "prepare": "prepare", "metadata": "metadata", "assemble": "assemble"}
DELIVERY_USEC = 2.0  # assumed: Redis's cost to deliver one pub/sub message to one subscriber
# Assumed capacities of dedicated servers (docs/CAPACITY.md says where they come from).
REDIS_REFERENCE_OPS = 100_000.0  # simple commands/s, one core, no pipelining
DB_REFERENCE_QPS = 20_000.0  # point queries and single-row upserts/s, 8-vCPU MySQL, group commit


# -- validation against bench_fleet.py ----------------------------------------------------------------


def bench_fleet_prediction(costs: Costs, workers: int, images: int = 6, layers: int = 3, many: int = 12,
                           layer_mib: float = 7.5, cores: float = 2.0) -> tuple[float, float]:
    """(seconds for `images` x `layers`-layer images at once, seconds for one `many`-layer image) on
    a fleet of `workers` 1-slot workers sharing this machine's `cores` (bench_fleet.py's setup: oci:
    layouts, so no registry transfer and no dedup)."""

    class Fixed:
        def __init__(self, batch: list[Image]) -> None:
            self.batch = deque(batch)

        def next(self) -> Image:
            return self.batch.popleft()

    out = []
    for batch in ([Image(i, 0, [Layer(1000 * i + j, layer_mib) for j in range(layers)]) for i in range(images)],
                  [Image(99, 0, [Layer(99000 + j, layer_mib) for j in range(many)])]):
        fleet = Fleet(costs, workers, 1, math.inf, cores, Fixed(batch), 0)  # type: ignore[arg-type]
        fleet.arrive = lambda: None  # type: ignore[method-assign]  # (a batch, not a backlog)
        for image in batch:
            fleet.enqueue(Task("convert", Request(image, 0.0), costs.control + costs.overhead))
        while fleet.events and len(fleet.finished_at) < len(batch):
            t, _, kind, payload = heapq.heappop(fleet.events)
            fleet.now = t
            if kind == "machine":
                fleet.on_machine(*payload)
        out.append(max(fleet.finished_at))
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--costs", default=str(COSTS))
    ap.add_argument("--workers", default="1,2,3,5,10,20,50,100,200,500,1000")
    ap.add_argument("--slots", type=int, default=2, help="pool processes (and cores) per worker")
    ap.add_argument("--link-mib-s", type=float, default=100.0, help="registry transfer per worker, MiB/s")
    ap.add_argument("--repos", type=int, default=5000)
    ap.add_argument("--bases", type=int, default=40)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--repeat", type=float, default=0.3, help="share of requests for a tag already converted")
    ap.add_argument("--history", type=int, default=20000, help="requests converted before the measured ones")
    ap.add_argument("--requests", type=int, default=1000, help="requests simulated (at least 4 per slot)")
    ap.add_argument("--overhead", type=float, default=None, help="per-task dispatch overhead, s (default: fitted)")
    ap.add_argument("--redis-ops", type=float, default=None,
                    help="Redis capacity, simple commands/s on its core (default: redis-benchmark here)")
    ap.add_argument("--validate", action="store_true", help="predict bench_fleet.py at N = 1, 2, 3")
    ap.add_argument("--measured", default="", help="with --validate: bench_fleet seconds 'b1,m1;b2,m2;b3,m3'")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--heartbeats", choices=("per-task", "per-claim"), default="per-task",
                    help="claim heartbeats: one statement per task (now) or per claim (before)")
    ap.add_argument("--rescue", choices=("locked", "per-worker"), default="locked",
                    help="orphan-queue scans: one worker per period (now) or every worker (before)")
    args = ap.parse_args()
    costs = Costs.load(Path(args.costs))
    if args.overhead is not None:
        costs.overhead = args.overhead
    if args.redis_ops:
        costs.redis_overhead_usec = max(1e6 / args.redis_ops - 1.0, 0.0)
    if args.validate:
        measured = [tuple(map(float, x.split(","))) for x in args.measured.split(";")] if args.measured else []
        if measured and args.overhead is None:  # the one fitted parameter: N = 1's batch time
            lo, hi = 0.0, 2.0
            for _ in range(40):
                costs.overhead = (lo + hi) / 2
                lo, hi = (costs.overhead, hi) if bench_fleet_prediction(costs, 1)[0] < measured[0][0] else (lo, costs.overhead)
        print(f"per-task overhead {costs.overhead * 1000:.0f} ms (fitted to N=1's batch); stage CPU from {args.costs}")
        for i, n in enumerate((1, 2, 3)):
            batch, many = bench_fleet_prediction(costs, n)
            line = f"N={n}: predicted batch {batch:6.1f} s, many-layer {many:6.1f} s"
            if i < len(measured):
                line += (f"; measured {measured[i][0]:6.1f} s, {measured[i][1]:6.1f} s "
                         f"(ratio {measured[i][0] / batch:.2f}, {measured[i][1] / many:.2f})")
            print(line)
        return
    print(f"{'N':>5} {'images/h':>9} {'manifest':>8} {'layer':>6} {'Redis':>9} {'Redis busy':>11} {'scan':>5} "
          f"{'DB':>8} {'DB busy':>11} {'busiest':>9} {'tasks':>7} {'longest':>9} {'mean':>7} {'slots':>6}")
    print(f"{'':>5} {'':>9} {'hits':>8} {'hits':>6} {'cmds/s':>9} {'here':>5} {'ref':>5} {'share':>5} "
          f"{'q/s':>8} {'here':>5} {'ref':>5} {'queue':>9} {'/s':>7} {'queue':>9} {'length':>7} {'busy':>6}")
    for n in (int(x) for x in args.workers.split(",")):
        mix = ImageMix(random.Random(args.seed), args.repos, args.bases, args.zipf, args.repeat)
        fleet = Fleet(costs, n, args.slots, args.link_mib_s, 0, mix, backlog=max(4, 3 * n * args.slots),
                      rescue=args.rescue, heartbeats=args.heartbeats)
        fleet.warm(args.history)
        r = fleet.run(max(args.requests, 4 * n * args.slots))
        print(f"{n:5d} {r['images_per_hour']:9.0f} {r['manifest_hit_share']:8.0%} {r['layer_hit_share']:6.0%} "
              f"{r['redis_cmds_per_s']:9.0f} {r['redis_core_busy']:5.2f} {r['redis_core_busy_ref']:5.2f} "
              f"{r['redis_scan_share']:5.0%} {r['db_queries_per_s']:8.0f} "
              f"{r['db_cpu_cores']:5.2f} {r['db_busy_ref']:5.2f} {r['busiest_queue']:>9} {r['busiest_queue_tasks_per_s']:7.1f} "
              f"{r['longest_queue']:>9} {r['longest_queue_len']:7.1f} {r['slot_utilisation']:6.0%}", flush=True)


if __name__ == "__main__":
    main()
