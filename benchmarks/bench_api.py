"""The HTTP API: intake rate and latency of POST /v1/conversions, and push-to-converted time.

    .venv/bin/python benchmarks/bench_api.py [--requests 1000] [--clients 16] [--skip-push]

1. Intake (no workers needed): `obdconv api` as its own uvicorn process, real Redis, SQLite status
   database. `--clients` threads send `--requests` POSTs in all (each: auth, rate limit, validation,
   PENDING row, `obdconv.convert` message + ledger entry). Baselines in the same run, same
   client: GET /healthz on the same server (the HTTP stack alone) and a bare Redis LPUSH of a
   message of the same size (the cheapest possible enqueue). Prints accepted/s, p50/p99 latency
   and the ratios.
2. Push to converted: a real docker-registry notifying the API, 2 workers (warmed up by one
   conversion). `skopeo copy` of a small image, then the time until the converted tag is in the
   registry. Baseline: the same kind of image (another seed, so no dedup) copied without a rule and
   converted with `obdconv.client.submit` + waiting for its tag. Medians of `--rounds`, the two
   paths alternating. The difference is what the event path costs.

The machine is shared: absolute numbers are noisy, the ratios less so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.services.api import ApiServer, write_api_files
from tests.services.redis import RedisServer

TOKEN = "bench-token-5b7e0c1a9d3f2468"
SECRET = "Bearer bench-event-secret-9f8e7d6c"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def hammer(call: Callable[[requests.Session, int], None], total: int, clients: int) -> tuple[float, list[float]]:
    """Run `call(session, n)` for n in range(total) from `clients` threads: (seconds, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def worker() -> None:
        session = requests.Session()
        mine = []
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                break
            started = time.perf_counter()
            call(session, n)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)
        session.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, latencies


def report(name: str, seconds: float, latencies: list[float]) -> float:
    rate = len(latencies) / seconds
    print(f"  {name:<34} {rate:8.0f}/s   p50 {1000 * statistics.median(latencies):7.2f} ms"
          f"   p99 {1000 * percentile(latencies, 0.99):7.2f} ms")
    return rate


def intake(workdir: Path, total: int, clients: int) -> None:
    server = RedisServer(workdir / "redis").start()
    try:
        env = {"OBDCONV_BROKER_URL": server.url(0), "OBDCONV_RESULT_BACKEND": server.url(1),
               "OBDCONV_DB_TYPE": "sqlite", "OBDCONV_DB_STR": str(workdir / "status.sqlite"),
               "OBDCONV_API_RATE_LIMIT": "0"}
        env.update(write_api_files(workdir / "conf", [{"name": "bench", "token": TOKEN,
                                                       "repositories": ["127.0.0.1:*/bench/*"]}]))
        api = ApiServer(workdir / "logs", env).start()
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            body = {"repository": "127.0.0.1:5999/bench/app", "input_tag": "v1", "overlaybd_tag": "v1-obd"}

            def post(session: requests.Session, n: int) -> None:
                r = session.post(api.url + "/v1/conversions", json={**body, "input_tag": f"v{n}"}, headers=headers,
                                 timeout=60)
                if r.status_code != 202:
                    raise SystemExit(f"POST failed: {r.status_code} {r.text}")

            def health(session: requests.Session, n: int) -> None:
                if session.get(api.url + "/healthz", timeout=60).status_code != 200:
                    raise SystemExit("healthz failed")

            hammer(post, min(100, total), clients)  # warm up (imports, connections, SQLite file)
            hammer(health, min(100, total), clients)
            client = server.client(2)
            message = json.dumps({"body": "x" * 1400, "headers": {"id": "0" * 36}}).encode()  # ~ a convert message

            def lpush(session: requests.Session, n: int) -> None:
                client.lpush("bench", message)

            print(f"intake: {total} requests from {clients} client threads (rate limit off)")
            post_rate = report("POST /v1/conversions (202)", *hammer(post, total, clients))
            health_rate = report("baseline GET /healthz", *hammer(health, total, clients))
            lpush_rate = report("baseline Redis LPUSH", *hammer(lpush, total, clients))
            queued = server.client(0).llen("control")
            print(f"  queued messages: {queued} (expected {total + min(100, total)})")
            print(f"  POST vs /healthz: {post_rate / health_rate:.2f}x the rate; "
                  f"POST vs LPUSH: {post_rate / lpush_rate:.3f}x")
        finally:
            api.stop()
    finally:
        server.stop()


def push_to_converted(workdir: Path, rounds: int) -> None:
    from obdconv.client import submit, wait
    from obdconv.registry import RegistryOptions, open_repository
    from obdconv.request import ConversionRequest, RegistryAccess
    from tests.fleet.conftest import push_layout, running_fleet
    from tests.services.registry import start_registry
    from workers.sample_image import build_sample_image

    layout = workdir / "images"
    for n in range(2 * rounds + 1):  # distinct seeds: no dedup between any two conversions
        build_sample_image(layout, f"img{n}", layers=2, file_bytes=1 << 20, seed=500 + n)
    rules = '[[rules]]\nname = "bench"\nrepository = "bench/evented*"\noverlaybd_tag = "{tag}-obd"\n'
    with running_fleet(workdir / "fleet", {}, flower=False) as fleet:
        env = {**fleet.env, **write_api_files(workdir / "conf", [{"name": "bench", "token": TOKEN,
                                                                   "repositories": ["127.0.0.1:*/bench/*"]}],
                                               rules, {"distribution": SECRET})}
        api = ApiServer(workdir / "logs", env).start()
        registry = start_registry(workdir / "registry", notifications={"endpoints": [{
            "name": "obdconv", "url": f"{api.url}/v1/events/distribution", "headers": {"Authorization": [SECRET]},
            "timeout": "10s", "threshold": 3, "backoff": "1s", "ignoredmediatypes": ["application/octet-stream"]}]})
        try:
            def wait_tag(name: str, tag: str) -> float:
                repo = open_repository(f"{registry.host}/{name}", RegistryOptions(plain=True))
                deadline = time.monotonic() + 300
                while tag not in repo.list_tags():
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{name}:{tag} never appeared")
                    time.sleep(0.05)
                return time.monotonic()

            def direct(n: int) -> float:
                push_layout(layout, f"img{n}", f"{registry.host}/bench/direct{n}:v1")  # no rule: no event request
                started = time.monotonic()
                submit(ConversionRequest(f"{registry.host}/bench/direct{n}", input_tag="v1", overlaybd_tag="v1-obd",
                                         access=RegistryAccess(plain=True)), app=fleet.app)
                return wait_tag(f"bench/direct{n}", "v1-obd") - started

            def evented(n: int) -> tuple[float, float]:
                started = time.monotonic()
                push_layout(layout, f"img{n}", f"{registry.host}/bench/evented{n}:v1")
                pushed = time.monotonic()
                return pushed - started, wait_tag(f"bench/evented{n}", "v1-obd") - pushed

            warm = submit(ConversionRequest(f"oci:{layout}", input_tag=f"img{2 * rounds}", overlaybd_tag="warm"),
                          app=fleet.app)
            wait(warm, 300, app=fleet.app)  # every worker process has imported and opened what it needs
            directs, events, pushes = [], [], []
            for r in range(rounds):  # alternate, so neither path always runs on the warmer fleet
                if r % 2:
                    directs.append(direct(2 * r))
                    push, event = evented(2 * r + 1)
                else:
                    push, event = evented(2 * r + 1)
                    directs.append(direct(2 * r))
                pushes.append(push)
                events.append(event)
            d, e = statistics.median(directs), statistics.median(events)
            print(f"push to converted tag: 2-layer 2 MiB images, 2 workers (2 pool slots each), median of {rounds}")
            print(f"  skopeo copy into the registry      {statistics.median(pushes):7.2f} s")
            print(f"  push done -> converted tag (event) {e:7.2f} s   (each: {', '.join(f'{x:.2f}' for x in events)})")
            print(f"  baseline: submit -> converted tag  {d:7.2f} s   (each: {', '.join(f'{x:.2f}' for x in directs)})")
            print(f"  event path vs direct submit: {e / d:.2f}x ({e - d:+.2f} s)")
        finally:
            registry.stop()
            api.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--skip-push", action="store_true", help="only the intake part")
    parser.add_argument("--rounds", type=int, default=3, help="push-to-converted measurements of each path")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-api-"))
    intake(workdir / "intake", args.requests, args.clients)
    if not args.skip_push:
        push_to_converted(workdir / "push", args.rounds)


if __name__ == "__main__":
    main()
