"""Stream a large blob up to and down from a real docker-registry and report throughput and memory.

    .venv/bin/python benchmarks/bench_registry.py [--size 1G] [--registry HOST:PORT] [--json]

Without --registry it starts a plain docker-registry on 127.0.0.1 (tests/services/registry.py) in a temp
dir. Ours = obdconv.registry (upload_blob: POST + PATCH chunks + PUT; open_blob: sha256-verified read).
Baseline, measured in the same run = bare `requests` on the same registry: one monolithic PUT with a
chunked body, and a GET with iter_content (no hashing). Peak RSS growth is sampled with psutil while each
transfer runs, relative to the RSS just before it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from obdconv.registry import RegistryOptions, open_repository

CHUNK = 4 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def blob_chunks(size: int, seed: int) -> Iterator[bytes]:
    """Deterministic incompressible-looking chunks: one random block, each copy stamped with its index."""
    import random

    block = random.Random(seed).randbytes(CHUNK)
    sent = 0
    index = 0
    while sent < size:
        n = min(CHUNK, size - sent)
        yield index.to_bytes(8, "little") + block[8:n] if n > 8 else block[:n]
        sent += n
        index += 1


def expected_digest(size: int, seed: int) -> str:
    h = hashlib.sha256()
    for chunk in blob_chunks(size, seed):
        h.update(chunk)
    return "sha256:" + h.hexdigest()


class PeakRSS:
    """Samples this process's RSS every few ms while active; `.growth` = peak - RSS at start."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._stop = threading.Event()
        self.start_rss = 0
        self.peak_rss = 0

    def __enter__(self) -> PeakRSS:
        self.start_rss = self.peak_rss = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak_rss - self.start_rss


def sha256_rate(size: int) -> float:
    """MB/s of hashlib.sha256 alone over the same bytes: the ceiling for a verified download."""
    started = time.perf_counter()
    expected_digest(size, 99)
    return size / 1e6 / (time.perf_counter() - started)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    with PeakRSS() as rss:
        started = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - started
    return result, elapsed, rss.growth


def run_ours(host: str, size: int, seed: int) -> dict[str, float]:
    repo = open_repository(f"{host}/bench/ours", RegistryOptions(plain=True))
    (digest, sent), up_s, up_rss = timed(lambda: repo.upload_blob(blob_chunks(size, seed)))

    def download() -> int:
        n = 0
        with repo.open_blob(digest) as f:  # verifies sha256 at EOF
            while chunk := f.read(CHUNK):
                n += len(chunk)
        return n

    received, down_s, down_rss = timed(download)
    if sent != size or received != size:
        raise SystemExit(f"size mismatch: sent {sent}, received {received}, expected {size}")
    return {"digest": digest, "up_s": up_s, "down_s": down_s, "up_rss": up_rss, "down_rss": down_rss}


def run_baseline(host: str, size: int, seed: int, digest: str) -> dict[str, float]:
    session = requests.Session()
    session.trust_env = False
    base = f"http://{host}/v2/bench/baseline/blobs"

    def upload() -> None:
        r = session.post(f"{base}/uploads/")
        location = r.headers["Location"]
        location = location if location.startswith("http") else f"http://{host}{location}"
        sep = "&" if "?" in location else "?"
        r = session.put(f"{location}{sep}digest={digest}", data=blob_chunks(size, seed),
                        headers={"Content-Type": "application/octet-stream"})
        r.raise_for_status()

    def download() -> int:
        n = 0
        with session.get(f"{base}/{digest}", stream=True) as r:
            r.raise_for_status()
            for chunk in r.iter_content(CHUNK):
                n += len(chunk)
        return n

    _, up_s, up_rss = timed(upload)
    _, down_s, down_rss = timed(download)
    return {"up_s": up_s, "down_s": down_s, "up_rss": up_rss, "down_rss": down_rss}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G", help="blob size, e.g. 256M, 1G")
    parser.add_argument("--registry", default="", help="HOST:PORT of a plain-HTTP registry (default: start one)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    size = parse_size(args.size)
    service = None
    host = args.registry
    if not host:
        from tests.services.registry import start_registry

        service = start_registry(Path(tempfile.mkdtemp(prefix="bench-registry-")))
        host = service.host
    try:
        expected = expected_digest(size, args.seed)
        ours = run_ours(host, size, args.seed)
        if ours["digest"] != expected:
            raise SystemExit(f"digest mismatch: {ours['digest']} != {expected}")
        baseline = None if args.no_baseline else run_baseline(host, size, args.seed, expected)
        hash_rate = sha256_rate(min(size, 256 << 20))
    finally:
        if service is not None:
            service.stop()
    mb = size / 1e6
    result: dict[str, Any] = {
        "size": size, "digest": ours["digest"],
        "up_mb_s": mb / ours["up_s"], "down_mb_s": mb / ours["down_s"],
        "up_rss_growth_mib": ours["up_rss"] / (1 << 20), "down_rss_growth_mib": ours["down_rss"] / (1 << 20),
        "sha256_mb_s": hash_rate,
    }
    if baseline is not None:
        result.update({
            "baseline_up_mb_s": mb / baseline["up_s"], "baseline_down_mb_s": mb / baseline["down_s"],
            "up_ratio": baseline["up_s"] / ours["up_s"], "down_ratio": baseline["down_s"] / ours["down_s"],
            "baseline_up_rss_growth_mib": baseline["up_rss"] / (1 << 20),
            "baseline_down_rss_growth_mib": baseline["down_rss"] / (1 << 20),
        })
    if args.json:
        print(json.dumps(result))
    else:
        print(f"blob {size / (1 << 20):.0f} MiB  {result['digest']}")
        print(f"obdconv  up {result['up_mb_s']:8.1f} MB/s  down {result['down_mb_s']:8.1f} MB/s (sha256 verified)"
              f"  peak RSS growth up {result['up_rss_growth_mib']:.1f} MiB, down {result['down_rss_growth_mib']:.1f} MiB")
        if baseline is not None:
            print(f"baseline up {result['baseline_up_mb_s']:8.1f} MB/s  down {result['baseline_down_mb_s']:8.1f} MB/s"
                  f" (bare requests)  peak RSS growth up {result['baseline_up_rss_growth_mib']:.1f} MiB,"
                  f" down {result['baseline_down_rss_growth_mib']:.1f} MiB")
            print(f"ratio (obdconv / baseline): up {result['up_ratio']:.2f}  down {result['down_ratio']:.2f}")
        print(f"sha256 alone (generating + hashing the same bytes): {result['sha256_mb_s']:.1f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
