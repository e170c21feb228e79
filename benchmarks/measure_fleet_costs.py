"""Measure what the capacity model (benchmarks/capacity_model.py, docs/CAPACITY.md) is fed with.

    .venv/bin/python benchmarks/measure_fleet_costs.py [--out benchmarks/capacity_costs.json] [--quick]

On this machine, in one run:
1. stages: per layer, prepare / metadata / assemble (+ upload to a local docker-registry) CPU and
   wall seconds, for layers made of real files (slices of this machine's /usr, ~1-64 MiB of tar)
   and for the sample layers bench_fleet.py converts; push per manifest. Fitted as a + b * MiB.
2. fleet: a real fleet (workers.localfleet: Redis, MariaDB, N = 1..3 workers, a local registry):
   Redis commands (INFO commandstats: calls and server microseconds per command) and database
   queries (MariaDB global status: Questions) while idle (per worker-second) and per request:
   a cold conversion of 3 and of 12 layers, a manifest dedup hit, a request whose base layers
   are dedup hits. The measuring client's own status polls are counted apart and taken out.
3. capacity: redis-benchmark against that Redis (ops/s, and so the server's per-command cost
   beyond the command itself); MariaDB under concurrent dedup-store queries (queries/s, and
   mariadbd CPU seconds per query).
The machine is shared: CPU seconds are the robust figures, walls are noisy (say so when quoting).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from build_image import pack_layer, walk_sorted, write_layout  # noqa: E402

from obdconv.pipeline.assemble import assemble_layer  # noqa: E402
from obdconv.pipeline.metadata import MetadataPass  # noqa: E402
from obdconv.pipeline.plan import resolve_image  # noqa: E402
from obdconv.pipeline.prepare import prepare_layer  # noqa: E402
from obdconv.pipeline.push import push_manifest  # noqa: E402
from obdconv.registry import open_repository  # noqa: E402
from obdconv.registry.copy import copy_image  # noqa: E402
from obdconv.registry.options import RegistryOptions  # noqa: E402
from obdconv.request import ConversionProfile, ConversionRequest, RegistryAccess  # noqa: E402

MIB = 1 << 20


# -- 1. stage costs ------------------------------------------------------------------------------


def usr_slices(work: Path, targets_mib: list[int]) -> list[Path]:
    """Directories holding consecutive slices of /usr/share's then /usr/lib's regular files (many
    small files, as in distribution layers), of about `targets_mib` each."""
    roots = [work / f"slice{i}" for i in range(len(targets_mib))]
    files = ((f"{top}/{arc}", p) for top in ("share", "lib") for arc, p in walk_sorted(Path("/usr") / top)
             if p.is_file() and not p.is_symlink())
    for root, target in zip(roots, targets_mib, strict=True):
        total = 0
        for arc, path in files:
            try:
                size = path.stat().st_size
                dest = root / "usr" / arc
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
            except OSError:
                continue
            total += size
            if total >= target * MIB:
                break
    return roots


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def measure_stages(layout: Path, tag: str, registry_host: str, repo_name: str) -> dict[str, Any]:
    source = open_repository(f"oci:{layout}")
    target = open_repository(f"{registry_host}/{repo_name}", RegistryOptions(plain=True))
    plan = resolve_image(source, tag)
    manifest = next(iter(plan.manifests.values()))
    profile = ConversionProfile()
    rows = []
    with tempfile.TemporaryDirectory(prefix="obdconv-costs-") as tmp:
        prepared = []
        for layer in manifest.layers:
            spool = Path(tmp) / "spool" / layer["digest"][7:19]
            wall, cpu, p = timed(lambda layer=layer, spool=spool: prepare_layer(source, layer, spool, native=True,
                                                                              turbo=False))
            prepared.append(p)
            rows.append({"digest": layer["digest"], "blob_mib": layer["size"] / MIB, "tar_mib": p.tar_size / MIB,
                         "entries": p.entry_count, "prepare_wall": wall, "prepare_cpu": cpu})
        with MetadataPass(profile.vsize_gb, manifest.chain_ids, Path(tmp) / "meta") as metadata_pass:
            metadata = []
            for row, p in zip(rows, prepared, strict=True):
                wall, cpu, md = timed(lambda p=p: metadata_pass.apply(p))
                metadata.append(md)
                row.update(metadata_wall=wall, metadata_cpu=cpu)
        converted = []
        for i, (row, p, md) in enumerate(zip(rows, prepared, metadata, strict=True)):
            parent = manifest.chain_ids[i - 1] if i else ""
            wall, cpu, out = timed(lambda p=p, md=md, i=i, parent=parent: assemble_layer(
                p, md, profile, manifest.chain_ids[i], parent, target, upload=True))
            converted.append(out)
            row.update(assemble_wall=wall, assemble_cpu=cpu, out_mib=out.size / MIB)
        wall, cpu, _ = timed(lambda: push_manifest(
            target, source_manifest=manifest.data.encode(), source_config=manifest.config.encode(),
            source_desc=manifest.descriptor, fmt="native", layers=[c.descriptor() for c in converted],
            diff_ids=[c.diff_id for c in converted], oci=False, referrer=False, ref="costs", upload=True))
    return {"layers": rows, "push_wall": wall, "push_cpu": cpu}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


# -- 2. fleet counts ------------------------------------------------------------------------------


def commandstats(client: Any) -> dict[str, tuple[int, float]]:
    """command -> (calls, server microseconds) from INFO commandstats."""
    out = {}
    for name, stats in client.info("commandstats").items():
        out[name.removeprefix("cmdstat_")] = (int(stats["calls"]), float(stats["usec"]))
    return out


def delta(after: dict[str, tuple[int, float]], before: dict[str, tuple[int, float]]) -> dict[str, tuple[int, float]]:
    return {k: (v[0] - before.get(k, (0, 0))[0], v[1] - before.get(k, (0, 0))[1])
            for k, v in after.items() if v[0] != before.get(k, (0, 0))[0]}


def questions(db: Any) -> int:
    with db.connect() as conn, conn.cursor() as cur:
        cur.execute("SHOW GLOBAL STATUS LIKE 'Questions'")
        return int(cur.fetchone()[1])


@contextmanager
def counted(client: Any, db: Any) -> Iterator[dict[str, Any]]:
    """Redis commandstats and MariaDB Questions over the block (the two status reads themselves:
    1 INFO and 2 queries, taken out)."""
    out: dict[str, Any] = {}
    r0, q0, t0 = commandstats(client), questions(db), time.monotonic()
    yield out
    r1, q1 = commandstats(client), questions(db)
    redis_delta = delta(r1, r0)
    calls, usec = redis_delta.pop("info", (1, 0.0))
    if calls > 1:
        redis_delta["info"] = (calls - 1, usec)
    out.update(seconds=time.monotonic() - t0, redis=redis_delta, db_queries=q1 - q0 - 2)


def totals(redis_delta: dict[str, tuple[int, float]]) -> tuple[int, float]:
    return sum(c for c, _ in redis_delta.values()), sum(u for _, u in redis_delta.values())


def measure_fleet(work: Path, workers: int, registry_host: str, db: Any, idle_seconds: float) -> dict[str, Any]:
    import redis as redis_lib

    from config.settings import load_settings
    from obdconv.client import status, submit
    from workers.app import create_app
    from workers.localfleet import LocalFleet

    database = db.create_database(f"costs{workers}")
    fleet = LocalFleet(work / f"fleet{workers}", workers=workers, concurrency=1, flower=False, db_type="mysql",
                       db_str=db.dsn_go_for(database))
    result: dict[str, Any] = {"workers": workers}
    with fleet:
        client = redis_lib.Redis(port=fleet.redis_port)
        app = create_app(load_settings(env=fleet.env()))
        time.sleep(3)  # start-up traffic (mingle, first leases) settles
        with counted(client, db) as idle:
            time.sleep(idle_seconds)
        result["idle"] = idle
        # One status read (what the polling below costs), to take out of each request's figures.
        with counted(client, db) as one_poll:
            status("no-such-request", app=app)
        result["status_read"] = one_poll

        def run(repo: str, tag: str, out_tag: str) -> dict[str, Any]:
            polls = 0
            with counted(client, db) as c:
                request_id = submit(ConversionRequest(f"{registry_host}/{repo}", input_tag=tag, overlaybd_tag=out_tag,
                                                      access=RegistryAccess(plain=True)), app=app)
                while True:
                    time.sleep(0.5)
                    polls += 1
                    s = status(request_id, app=app)
                    if s["state"] in ("SUCCESS", "FAILURE"):
                        break
            if s["state"] != "SUCCESS":
                raise SystemExit(f"conversion failed: {s}")
            c["polls"] = polls
            c["dedup"] = any(o.get("dedup") for o in s["outputs"].values())
            return c

        prefix = f"costs{workers}"
        result["cold3"] = run(f"{prefix}/a", "src", "obd")
        result["cold12"] = run(f"{prefix}/b", "src", "obd")
        result["manifest_hit"] = run(f"{prefix}/a", "src", "obd-again")
        result["base_hit"] = run(f"{prefix}/c", "src", "obd")  # 2 of 3 layers shared with a
        result["keys"] = {f"db{n}": redis_lib.Redis(port=fleet.redis_port, db=n).dbsize() for n in (0, 1)}
        if workers == 3:
            result["monitor"] = monitor_request(fleet.redis_port, lambda: run(f"{prefix}/d", "src", "obd"))
        capacity = redis_capacity(fleet.redis_port) if workers == 1 else None
    if capacity is not None:
        result["redis_benchmark"] = capacity
    return result


def monitor_request(port: int, fn: Callable[[], Any]) -> dict[str, int]:
    """Redis MONITOR during fn(): commands by (command, key family), e.g. "HSET obdconv:progress"."""
    import redis as redis_lib

    families: dict[str, int] = {}
    stop = threading.Event()

    def watch() -> None:
        with redis_lib.Redis(port=port).monitor() as m:
            for event in m.listen():
                if stop.is_set():
                    return
                words = event["command"].split()
                if not words:
                    continue
                key = words[1] if len(words) > 1 else ""
                family = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|sha256[-:][0-9a-f]{64}|\d+", "*", key)[:48]
                name = f"{words[0].upper()} {family}"
                families[name] = families.get(name, 0) + 1

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    time.sleep(0.5)
    fn()
    stop.set()
    redis_lib.Redis(port=port).ping()  # wakes the monitor so it sees `stop`
    thread.join(5)
    return dict(sorted(families.items(), key=lambda kv: -kv[1]))


# -- 3. capacity of the services ------------------------------------------------------------------


def redis_capacity(port: int) -> dict[str, float]:
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-q", "-n", "50000", "-c", "50",
                          "-t", "set,get,lpush,rpop,zadd,hset"], capture_output=True, text=True, timeout=300).stdout
    rates = {}
    for line in out.replace("\r", "\n").splitlines():
        m = re.match(r"(\w+)(?: \(.*\))?: ([0-9.]+) requests per second", line.strip())
        if m:
            rates[m.group(1).lower()] = float(m.group(2))
    return rates


def mariadb_capacity(db: Any, seconds: float = 5.0, threads: int = 8) -> dict[str, float]:
    """Concurrent dedup-store queries (lookups, upserts, claim updates) against MariaDB: queries/s
    and mariadbd CPU seconds per query."""
    import pymysql

    database = db.create_database("capacity")
    with db.connect(database) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (k VARCHAR(255) PRIMARY KEY, v VARCHAR(255), n BIGINT)")
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def work(i: int) -> None:
        conn = pymysql.connect(host=db.host, port=db.port, user=db.user, password=db.password, database=database,
                               autocommit=True)
        with conn, conn.cursor() as cur:
            n = 0
            while time.monotonic() < stop:
                key = f"layer|host|sha256:{i}-{n % 500}|native/ext4"
                cur.execute("SELECT v, n FROM t WHERE k = %s", (key,))
                cur.execute("INSERT INTO t (k, v, n) VALUES (%s, %s, 1) ON DUPLICATE KEY UPDATE n = n + 1",
                            (key, "sha256:x"))
                cur.execute("UPDATE t SET v = %s WHERE k = %s AND n > 0", ("y", key))
                n += 3
            counts[i] = n

    pid = int((Path(db.socket).parent / "mysqld.pid").read_text())
    cpu0 = _proc_cpu(pid)
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    t0 = time.monotonic()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.monotonic() - t0
    cpu = _proc_cpu(pid) - cpu0
    total = sum(counts)
    return {"queries_per_s": total / elapsed, "server_cpu_s_per_query": cpu / total, "threads": threads}


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- main ----------------------------------------------------------------------------------------


def build_sources(work: Path, quick: bool) -> Path:
    """An OCI layout with the /usr-slice image ("usr") and the bench_fleet-like sample images."""
    from workers.sample_image import build_sample_image

    layout = work / "layout"
    targets = [2, 8] if quick else [2, 8, 24, 64]
    roots = usr_slices(work / "roots", targets)
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (work / "layers").mkdir()
    infos = [pack_layer(f"usr{i}", root, blobs, work / "layers") for i, root in enumerate(roots)]
    write_layout(layout, infos)  # tag "bench"
    build_sample_image(layout, "sample", layers=3, file_bytes=4 << 20, seed=1000)  # what bench_fleet converts
    build_sample_image(layout, "a", layers=3, file_bytes=256 << 10, seed=1, shared_layers=2)
    build_sample_image(layout, "b", layers=12, file_bytes=256 << 10, seed=2)
    build_sample_image(layout, "c", layers=3, file_bytes=256 << 10, seed=3, shared_layers=2)
    build_sample_image(layout, "d", layers=12, file_bytes=256 << 10, seed=4)
    return layout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "capacity_costs.json"))
    ap.add_argument("--quick", action="store_true", help="smaller layers, 1 and 2 workers, short idle windows")
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    args = ap.parse_args()
    from tests.services.mariadb import start_mariadb
    from tests.services.registry import start_registry

    work = Path(tempfile.mkdtemp(prefix="obdconv-costs-"))
    try:
        layout = build_sources(work, args.quick)
        with start_registry(work / "registry") as registry:
            source = open_repository(f"oci:{layout}")
            for name in ("a", "b", "c", "d"):
                for n in (1, 2, 3):
                    copy_image(source, open_repository(f"{registry.host}/costs{n}/{name}", RegistryOptions(plain=True)),
                               name, "src")
            out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()},
                                   "heartbeats": "per-task"}  # tasks/claims.py: one statement per task
            out["stages_usr"] = measure_stages(layout, "bench", registry.host, "costs/usr")
            out["stages_sample"] = measure_stages(layout, "sample", registry.host, "costs/sample")
            rows = out["stages_usr"]["layers"] + out["stages_sample"]["layers"]
            out["fits"] = {f"{stage}_{kind}": fit([r["tar_mib"] for r in rows], [r[f"{stage}_{kind}"] for r in rows])
                           for stage in ("prepare", "metadata", "assemble") for kind in ("cpu", "wall")}
            db = start_mariadb(work / "mariadb")
            try:
                out["fleet"] = [measure_fleet(work, n, registry.host, db, args.idle_seconds / (2 if args.quick else 1))
                                for n in ((1, 2) if args.quick else (1, 2, 3))]
                out["mariadb_capacity"] = mariadb_capacity(db)
            finally:
                db.process.stop()
            out["machine"]["load_after"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(out, indent=1, sort_keys=True))
    print(summary(out))
    return 0


def summary(out: dict[str, Any]) -> str:
    lines = [f"load average before/after: {out['machine']['load_before'][0]:.1f} / {out['machine']['load_after'][0]:.1f}"]
    for name, (a, b) in out["fits"].items():
        lines.append(f"{name:16} = {a * 1000:7.1f} ms + {b * 1000:7.1f} ms/MiB of tar")
    for f in out["fleet"]:
        idle_calls, idle_usec = totals(f["idle"]["redis"])
        per = f["idle"]["seconds"] * f["workers"]
        lines.append(f"N={f['workers']}: idle {idle_calls / per:6.1f} Redis cmds/worker-s ({idle_usec / per:7.1f} us), "
                     f"{f['idle']['db_queries'] / per:5.2f} DB queries/worker-s")
        poll_calls, _ = totals(f["status_read"]["redis"])
        for kind in ("cold3", "cold12", "manifest_hit", "base_hit"):
            r = f[kind]
            calls, _ = totals(r["redis"])
            idle_share = idle_calls / f["idle"]["seconds"] * r["seconds"]
            net = calls - idle_share - r["polls"] * poll_calls
            db_net = r["db_queries"] - f["idle"]["db_queries"] / f["idle"]["seconds"] * r["seconds"] \
                - r["polls"] * f["status_read"]["db_queries"]
            lines.append(f"   {kind:13} {r['seconds']:6.1f} s: {net:7.0f} Redis cmds, {db_net:6.0f} DB queries")
    lines.append(f"redis-benchmark: {out['fleet'][0].get('redis_benchmark')}")
    lines.append(f"mariadb: {out['mariadb_capacity']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
