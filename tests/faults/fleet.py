"""The fault matrix's fleet: real Redis (append-only file, as deploy/ runs it), the session's MariaDB
(its own database; tests stop, kill and restart the server), docker-registry behind the fault proxy, and workers
w1 (2 slots) and w2 (8 slots: the victim of the kill test holds a stalled task of every stage at
once). Helpers read outcomes from the database and the registry's storage directly."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from obdconv.pipeline.runner import RunnerOptions, convert
from obdconv.request import ConversionRequest, RegistryAccess
from tests.faults import storage
from tests.faults.conftest import layer_digests, run_cli
from tests.fleet.conftest import Fleet, push_layout, running_fleet
from tests.services.fault_proxy import FaultProxy
from tests.services.mariadb import MariaDB
from tests.services.redis import RedisServer
from tests.services.registry import RegistryService
from workers.sample_image import build_sample_image

SPOOL_TMPFS = "48M"  # the workers' spool, when root can mount it (the disk-full test fills it)
CLAIM_TTL = 5  # seconds: claims of a request Redis forgot expire soon (a redelivered task re-takes its own)


@dataclass
class FaultFleet:
    fleet: Fleet
    proxy: FaultProxy
    registry: RegistryService
    db: MariaDB
    database: str
    redis: RedisServer
    spool: Path
    spool_is_tmpfs: bool
    layout: Path
    workdir: Path
    baselines: dict[str, str] = field(default_factory=dict)

    # -- images
    def image(self, name: str, repo: str = "", tag: str = "src", **build: Any) -> str:
        """Build image `name` into the layout (once), push it to `faults/<repo or name>:<tag>`, return
        the undisturbed conversion's digest (a local run, no upload: the same bytes any worker makes)."""
        if name not in self.baselines:
            build_sample_image(self.layout, name, **build)
            push_layout(self.layout, name, f"{self.registry.host}/faults/{repo or name}:{tag}")
            request = ConversionRequest(f"oci:{self.layout}", input_tag=name, overlaybd_tag="obd", no_upload=True,
                                        workdir=str(self.workdir / "baseline" / name))
            result = convert(request, options=RunnerOptions(workers=1))
            self.baselines[name] = result.output("native").root_digest
        return self.baselines[name]

    def convert_locally(self, repo: str, src: str, tag: str) -> str:
        """`obdconv convert` of faults/<repo>:<src> through the proxy, recording dedup rows in the
        fleet's database (what a fleet request finds as converted parents)."""
        code, result, err = run_cli("convert", "-r", f"{self.proxy.host}/faults/{repo}", "-i", src,
                                    "--overlaybd", tag, "--plain", "--json", "--workers", "1",
                                    "-d", str(self.workdir / "local"), "--db-type", "mysql",
                                    "--db-str", self.db.dsn_go_for(self.database))
        assert code == 0, err
        return str(result["outputs"][0]["root_digest"])

    def layers(self, name: str) -> list[str]:
        return layer_digests(self.layout, name)

    def request(self, repo: str, tag: str = "obd", src: str = "src") -> ConversionRequest:
        return ConversionRequest(f"{self.proxy.host}/faults/{repo}", input_tag=src, overlaybd_tag=tag,
                                 access=RegistryAccess(plain=True))

    def make_commits_durable(self) -> None:
        """Commits survive a SIGKILL of the server from now on (the session's MariaDB trades that for
        speed; its restart turns it off again)."""
        with self.db.connect() as conn, conn.cursor() as cur:
            cur.execute("SET GLOBAL innodb_flush_log_at_trx_commit = 1")

    # -- outcomes, read straight from MariaDB and the registry's storage
    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.db.connect(self.database) as conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def status_rows(self, request_id: str) -> list[tuple[Any, ...]]:
        return self.query("SELECT state, stage, error_class, error_message, outputs_json FROM obdconv_requests "
                          "WHERE request_id = %s", request_id)

    def dedup_rows(self, name: str) -> tuple[list[str], list[str]]:
        """(layer data digests, manifest out digests) recorded for repository faults/<name>."""
        layers = self.query("SELECT data_digest FROM obdconv_layers WHERE host = %s AND repo = %s",
                            self.proxy.host, f"faults/{name}")
        manifests = self.query("SELECT out_digest FROM obdconv_manifests WHERE host = %s AND repo = %s",
                               self.proxy.host, f"faults/{name}")
        return sorted(r[0] for r in layers), sorted(r[0] for r in manifests)

    def assert_converted_once(self, name: str, request_id: str, final: dict[str, Any], tag: str = "obd",
                              repo: str = "") -> None:
        """SUCCESS with the undisturbed digest; one status row saying so; the tag never pointed
        anywhere else; one dedup row per layer and for the manifest, naming exactly the blobs the
        manifest references; no manifest of the repository references a missing blob."""
        assert final["state"] == "SUCCESS", (final, self.fleet.broker_state()[-3000:])
        digest = final["outputs"]["native"]["digest"]
        assert digest == self.baselines[name]
        rows = self.status_rows(request_id)
        assert [(r[0], r[1], r[2]) for r in rows] == [("SUCCESS", "done", "")], rows
        repo = f"faults/{repo or name}"
        assert storage.tag_history(self.registry, repo, tag) == [digest]
        converted = storage.manifest_blobs(self.registry, digest)[1:]
        layer_rows, manifest_rows = self.dedup_rows(repo.removeprefix("faults/"))
        assert sorted(set(converted) & set(layer_rows)) == sorted(converted), (converted, layer_rows)
        assert digest in manifest_rows
        assert storage.dangling_references(self.registry, repo) == []


@contextlib.contextmanager
def spool_directory(path: Path) -> Iterator[bool]:
    """A small tmpfs at `path` when root may mount one (True), else a plain directory (False)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if os.geteuid() == 0 and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SPOOL_TMPFS}", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def fault_fleet(workdir: Path, registry: RegistryService, proxy: FaultProxy, db: MariaDB) -> Iterator[FaultFleet]:
    """`db`: the session's MariaDB (tests stop, kill and restart it; it comes back on the same port)."""
    redis = RedisServer(workdir / "redis", appendonly=True).start()
    try:
        database = db.create_database("faults")
        with spool_directory(workdir / "spool") as tmpfs, running_fleet(
                workdir, {}, flower=False, workers=(), redis=redis, OBDCONV_DB_TYPE="mysql",
                OBDCONV_DB_STR=db.dsn_go_for(database), OBDCONV_SPOOL_DIR=str(workdir / "spool"),
                OBDCONV_RETRY_MAX="5", OBDCONV_CLAIM_TTL=str(CLAIM_TTL)) as fleet:
            fleet.start_worker("w1", 2)
            fleet.start_worker("w2", 8)
            yield FaultFleet(fleet, proxy, registry, db, database, redis, workdir / "spool", tmpfs,
                             workdir / "layout", workdir)
    finally:
        redis.stop()
        if db.process.proc is not None and db.process.proc.poll() is not None:
            db.process.start()  # a test that stopped it failed before starting it again
