"""A fleet on machines that share nothing but a network (tests/services/netns.py):

    svc  198.18.0.1   Redis, MariaDB, docker-registry
    w1   198.18.0.2   obdconv worker (node obdconv@w1)
    w2   198.18.0.3   obdconv worker (node obdconv@w2)
    w3   198.18.0.4   obdconv worker (node obdconv@w3)
    cli  198.18.0.5   the client: builds and pushes images, `obdconv submit/wait`, `obdconv convert`

Loopback is up on svc only (its servers check themselves through their own address): on the
others "localhost" reaches nothing. Every host has its own network, hostname, and private tmpfs /tmp, /var/tmp and /var/lib/obdconv
(so each worker's spool, at the default path, is its own), and sees /work read-only. The test
process itself never dials a host (its own namespace routes 198.18.x out of the machine): it runs
commands ON the hosts and reads their logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.services.base import ManagedProcess
from tests.services.mariadb import MariaDB, start_mariadb
from tests.services.netns import PRIVATE_DIRS, Host, HostNetwork, netns_available
from tests.services.redis import RedisServer
from tests.services.registry import RegistryService, start_registry
from workers.lease import alive_key

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
HOSTS = ("svc", "w1", "w2", "w3", "cli")
WORKERS = ("w1", "w2", "w3")
FAKETIME_SITE = Path(__file__).resolve().parent / "faketime"  # its sitecustomize.py: see there
LEASE_SECONDS = 18  # the shortest allowed: a dead host's tasks come back soon
# What `obdconv convert` and the workers log, parsed to learn which host ran what.
PREPARED_LOG = re.compile(r"prepared layer (sha256:[0-9a-f]+) for (\S+) on (\S+)")
# Celery's own line once a prepare task finished (its result names the node and the layer).
PREPARE_DONE_LOG = re.compile(r"Task obdconv\.prepare_layer\[\S+\] succeeded in [0-9.e-]+s: "
                              r"\{'node': '(\S+)', 'prepared': \{'source_digest': '(sha256:[0-9a-f]+)'")
ASSEMBLED_LOG = re.compile(r"assembled layer (sha256:[0-9a-f]+) \(index (\d+)\) for (\S+) on (\S+)( after preparing)?")


def node(host: str) -> str:
    return f"obdconv@{host}"


@dataclass
class MultiHostFleet:
    net: HostNetwork
    workdir: Path
    redis: RedisServer
    db: MariaDB
    registry: RegistryService
    env: dict[str, str]
    workers: dict[str, ManagedProcess] = field(default_factory=dict)

    # -- hosts and workers -----------------------------------------------------------------------

    def host(self, name: str) -> Host:
        return self.net[name]

    def worker_alive_key_set(self, name: str) -> bool:
        return self.redis.cli("EXISTS", alive_key(node(name))) == "1"

    def start_worker(self, name: str, clock_offset: str = "") -> ManagedProcess:
        """`clock_offset` (e.g. "-120"): the worker's wall clock is that many seconds off (libfaketime)."""
        host = self.net[name]
        if host.init is None:
            host.boot()  # a powered-off host comes back with empty disks
        self.redis.cli("DEL", alive_key(node(name)))
        argv = [PYTHON, "-m", "obdconv", "--log-level", "INFO", "worker", "--hostname", "obdconv@%h",
                "--concurrency", "1", "--loglevel", "INFO"]
        if clock_offset:
            argv = ["env", f"PYTHONPATH={FAKETIME_SITE}:{ROOT}", "faketime", "--exclude-monotonic", "-f",
                    clock_offset, *argv]
        proc = ManagedProcess(
            f"worker-{name}", host.command(argv),
            self.workdir / "logs", ready=lambda: self.worker_alive_key_set(name), env=self.env, timeout=90)
        self.workers[name] = proc.start()
        return proc

    def kill_host(self, name: str) -> None:
        """Power the host off: all its processes at once, and its private disks with them."""
        self.net[name].kill()
        proc = self.workers.pop(name, None)
        if proc is not None and proc.proc is not None:
            proc.proc.wait(10)

    def stop_worker(self, name: str) -> None:
        proc = self.workers.pop(name, None)
        if proc is not None:
            proc.stop(timeout=20)

    def log(self, name: str) -> str:
        return (self.workdir / "logs" / f"worker-{name}.log").read_text(errors="replace")

    def logs(self) -> dict[str, str]:
        return {p.stem.removeprefix("worker-"): p.read_text(errors="replace")
                for p in (self.workdir / "logs").glob("worker-*.log")}

    # -- the client host -------------------------------------------------------------------------

    def client(self, *argv: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return self.net["cli"].run([PYTHON, *argv], env=self.env, timeout=timeout, check=check)

    def push_image(self, repo: str, tag: str, *, layers: int, seed: int, file_bytes: int = 96 << 10,
                   shared_layers: int = 0) -> None:
        """Build a sample image on the client host and push it to the registry with skopeo."""
        layout = f"/tmp/images/{repo.replace('/', '_')}"
        self.client("-c", "import sys; from workers.sample_image import build_sample_image; "
                          "build_sample_image(sys.argv[1], sys.argv[2], layers=int(sys.argv[3]), seed=int(sys.argv[4]), "
                          "file_bytes=int(sys.argv[5]), shared_layers=int(sys.argv[6]))",
                    layout, tag, str(layers), str(seed), str(file_bytes), str(shared_layers))
        self.net["cli"].run(["skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false", "-q",
                             f"oci:{layout}:{tag}", f"docker://{self.registry.host}/{repo}:{tag}"], timeout=120)

    def submit(self, repo: str, tag: str, *outputs: str) -> str:
        out = self.client("-m", "obdconv", "submit", "-r", f"{self.registry.host}/{repo}", "-i", tag, "--plain",
                          *outputs)
        return out.stdout.decode().strip().splitlines()[-1]

    def wait(self, request_id: str, timeout: float = 180) -> dict[str, Any]:
        out = self.client("-m", "obdconv", "wait", request_id, "--json", "--timeout", str(timeout),
                          timeout=timeout + 60, check=False)
        try:
            return json.loads(out.stdout)
        except ValueError:
            raise AssertionError(f"obdconv wait: {out.stdout[-2000:]!r} {out.stderr[-2000:]!r}") from None

    def convert_locally(self, repo: str, tag: str, *outputs: str) -> dict[str, Any]:
        """The one-machine conversion (`obdconv convert`, no fleet, no database) on the client host."""
        out = self.client("-m", "obdconv", "convert", "-r", f"{self.registry.host}/{repo}", "-i", tag, "--plain",
                          "--json", *outputs)
        return json.loads(out.stdout)

    def manifest(self, repo: str, ref: str) -> dict[str, Any]:
        out = self.net["cli"].run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                   f"docker://{self.registry.host}/{repo}:{ref}"])
        return json.loads(out.stdout)

    # -- what the services recorded ------------------------------------------------------------------

    def runs(self, kind: str) -> dict[str, int]:
        """obdconv:runs:<kind> (layer digest -> runs), counted by the workers in the result backend."""
        flat = self.redis.cli("HGETALL", f"obdconv:runs:{kind}", db=1).splitlines()
        return {flat[i]: int(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}

    def sql(self, statement: str) -> list[list[str]]:
        return self.db.sql(statement, database=self.db.database)

    def prepares_finished(self, host: str) -> set[str]:
        """Layers whose prepare task finished on `host` (acknowledged: it will not run again)."""
        return {layer for where, layer in PREPARE_DONE_LOG.findall(self.log(host)) if where == node(host)}

    def where_ran(self, request_id: str) -> tuple[dict[str, set[str]], dict[str, set[str]], set[str]]:
        """From the workers' logs: layer -> hosts that prepared it, layer -> hosts that assembled
        it, and the layers assembled after preparing them again (their spool was elsewhere)."""
        prepared: dict[str, set[str]] = {}
        assembled: dict[str, set[str]] = {}
        reprepared: set[str] = set()
        for host, text in self.logs().items():
            for layer, rid, where in PREPARED_LOG.findall(text):
                if rid == request_id:
                    assert where == node(host), (where, host)  # a log is its own host's
                    prepared.setdefault(layer, set()).add(host)
            for layer, _, rid, where, again in ASSEMBLED_LOG.findall(text):
                if rid == request_id:
                    assert where == node(host), (where, host)
                    assembled.setdefault(layer, set()).add(host)
                    if again:
                        reprepared.add(layer)
        return prepared, assembled, reprepared


def fleet_env(db: MariaDB, redis: RedisServer) -> dict[str, str]:
    return {
        "OBDCONV_BROKER_URL": redis.url(0),
        "OBDCONV_RESULT_BACKEND": redis.url(1),
        "OBDCONV_DB_TYPE": "mysql",
        "OBDCONV_DB_STR": db.dsn_go,
        "OBDCONV_LEASE_SECONDS": str(LEASE_SECONDS),
        "OBDCONV_RETRY_BACKOFF_MAX": "4",
        "OBDCONV_CREDENTIALS_FILE": "/etc/obdconv/none.json",
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/tmp/home",  # on the host's own disk
    }


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (a CI timeout) as KeyboardInterrupt, so `finally` blocks tear the namespaces down."""
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHostFleet]:
    reason = netns_available()
    if reason:
        pytest.skip(f"multi-host fleet test: {reason}")
    hidden = next((d for d in PRIVATE_DIRS if ROOT.is_relative_to(d)), None)
    if hidden:  # the hosts would not see the code they are to run
        message = (f"multi-host fleet test: the checkout {ROOT} is under {hidden}, which every simulated host "
                   "replaces with a tmpfs of its own; run the tests from a checkout elsewhere")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    workdir = tmp_path_factory.mktemp("multihost")
    (workdir / "logs").mkdir()
    net = HostNetwork.create(HOSTS, loopback=("svc",))
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    mh: MultiHostFleet | None = None
    try:
        svc = net["svc"]
        redis = RedisServer(workdir / "logs", place=svc, data_dir="/tmp").start()
        db = start_mariadb(workdir / "logs", place=svc, data_dir="/var/lib/obdconv/mariadb")
        registry = start_registry(workdir / "logs", place=svc, data_dir="/var/lib/obdconv/registry")
        mh = MultiHostFleet(net, workdir, redis, db, registry, fleet_env(db, redis))
        for name in WORKERS:
            # Started one after the other: three cold Celery start-ups at once on a shared
            # two-core machine take longer than one after the other.
            mh.start_worker(name)
        yield mh
    finally:
        for name in list(mh.workers if mh is not None else []):
            with contextlib.suppress(Exception):
                mh.stop_worker(name)  # type: ignore[union-attr]
        net.destroy()
        signal.signal(signal.SIGTERM, previous_sigterm)
        if os.environ.get("OBDCONV_KEEP_MULTIHOST_LOGS"):
            print(f"multi-host logs kept in {workdir / 'logs'}")


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
