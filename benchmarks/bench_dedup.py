"""Dedup store overhead: `DedupStore` lookups/records/claims against the reference's plain SQL.

Baseline (measured in the same run, same database): the reference convertor's own statements
(mysql.go: one `select ... from overlaybd_layers where host=? and repo=? and chain_id=?` per lookup,
one `insert` per record) through a bare DB-API connection. Reported: operations per second and the
ratio store/baseline (1.0 = no overhead; our lookups also check the profile table first, so a
reference-profile MISS costs up to two queries).

Runs on SQLite (a temp file) and, when mariadbd is installed, a throwaway MariaDB on 127.0.0.1.
Usage: python benchmarks/bench_dedup.py [--rows 2000] [--ops 2000]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from obdconv.dedup.store import REFERENCE_PROFILE, open_store

HOST = "registry.bench:5000"
REF_SELECT = "select host, repo, chain_id, data_digest, data_size from overlaybd_layers where host=? and repo=? and chain_id=?"
REF_INSERT = "insert into overlaybd_layers(host, repo, chain_id, data_digest, data_size) values(?, ?, ?, ?, ?)"


def rate(n: int, fn: Callable[[int], Any]) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def chain(i: int) -> str:
    return f"sha256:{i:064x}"


def bench(kind: str, db_str: str, connect: Callable[[], Any], rows: int, ops: int) -> None:
    store = open_store(kind, db_str, required=True)
    conn = connect()
    cur = conn.cursor()
    mark = "%s" if kind == "mysql" else "?"
    select, insert = REF_SELECT.replace("?", mark), REF_INSERT.replace("?", mark)

    base_insert = rate(rows, lambda i: cur.execute(insert, (HOST, "ref/repo", chain(i), chain(i + rows), i)))
    ours_insert = rate(rows, lambda i: store.record_layer(HOST, "our/repo", chain(i), REFERENCE_PROFILE,
                                                          chain(i + rows), i))

    def base_lookup(i: int) -> None:
        cur.execute(select, (HOST, "ref/repo", chain(i % rows)))
        cur.fetchall()

    base_hit = rate(ops, base_lookup)
    ours_hit = rate(ops, lambda i: store.get_layer(HOST, "our/repo", chain(i % rows), REFERENCE_PROFILE))
    ours_miss = rate(ops, lambda i: store.get_layer(HOST, "none/repo", chain(i % rows), REFERENCE_PROFILE))

    def claim_cycle(i: int) -> None:
        store.claim(f"bench|{i}", "bench", 30)
        store.release(f"bench|{i}", "bench")

    claims = rate(ops // 2, claim_cycle)
    print(f"[{kind}] record: {ours_insert:8.0f}/s  baseline insert {base_insert:8.0f}/s  ratio {ours_insert / base_insert:.2f}"
          " (ours writes 2 tables in a transaction)")
    print(f"[{kind}] lookup hit: {ours_hit:8.0f}/s  baseline select {base_hit:8.0f}/s  ratio {ours_hit / base_hit:.2f}")
    print(f"[{kind}] lookup miss (2 queries): {ours_miss:8.0f}/s  ratio {ours_miss / base_hit:.2f}")
    print(f"[{kind}] claim+release cycles: {claims:8.0f}/s")
    cur.close()
    conn.close()
    store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--ops", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        path = Path(tmp) / "dedup.sqlite"
        bench("sqlite", str(path), lambda: sqlite3.connect(str(path), isolation_level=None), args.rows, args.ops)
        try:
            from tests.services.mariadb import start_mariadb
        except ImportError:
            print("[mysql] skipped: tests/services/mariadb.py not importable")
            return 0
        server = start_mariadb(Path(tmp) / "mariadb", durable=True)
        try:
            bench("mysql", server.dsn_go, lambda: server.connect(server.database), args.rows, args.ops)
        finally:
            server.process.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
