"""A throwaway MariaDB server on 127.0.0.1 for tests (real grants, own datadir, port and socket).

Use the session fixture `mariadb` (import it into your area's conftest.py:
`from tests.services.mariadb import mariadb  # noqa: F401`). It yields a `MariaDB` with `host`, `port`,
`user`, `password` (contains ':' and '@' on purpose, to exercise DSN parsing), `socket`, `database`
(a database created at start), `dsn_go` / `url` for that database, and `create_database(name)`.
The server is stopped by pid at session end, also when tests fail.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pymysql
import pytest

from tests.services.base import ManagedProcess, ServiceError, free_port

TEST_USER = "obdconv"
# ':' and '@' in the password: the reference DSN form must be split at the LAST '@' and first ':'.
TEST_PASSWORD = "s3cr:et@pa:ss@word"
DEFAULT_DATABASE = "conversioncache"


@dataclass
class MariaDB:
    host: str
    port: int
    socket: str
    user: str
    password: str
    database: str
    process: ManagedProcess
    created: list[str] = field(default_factory=list)

    def dsn_go_for(self, database: str) -> str:
        """The reference convertor's go-sql-driver form: `user:pass@tcp(host:port)/db`."""
        return f"{self.user}:{self.password}@tcp({self.host}:{self.port})/{database}"

    def url_for(self, database: str) -> str:
        return f"mysql://{quote(self.user, safe='')}:{quote(self.password, safe='')}@{self.host}:{self.port}/{database}"

    @property
    def dsn_go(self) -> str:
        return self.dsn_go_for(self.database)

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def connect(self, database: str | None = None) -> pymysql.connections.Connection:
        """A plain pymysql connection as the test user (autocommit), for raw SQL in tests."""
        return pymysql.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               database=database, autocommit=True, connect_timeout=5)

    def create_database(self, name: str) -> str:
        """Create (or recreate empty) database `name`; returns the name."""
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        self.created.append(name)
        return name


def _root_can_connect(sock: str) -> bool:
    pymysql.connect(unix_socket=sock, user="root", password="", connect_timeout=1).close()
    return True


def start_mariadb(workdir: Path, durable: bool = False) -> MariaDB:
    """Initialise a datadir, start mariadbd on a free loopback port, create the test user.
    `durable=False` trades crash safety for speed; tests that SIGKILL the server and expect committed
    rows to survive pass `durable=True`."""
    mariadbd = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
    install_db = shutil.which("mariadb-install-db")
    if install_db is None:
        raise ServiceError("mariadb-install-db not found (apt-get install mariadb-server)")
    datadir = workdir / "data"
    sock = str(workdir / "mysqld.sock")
    port = free_port()
    # --auth-root-authentication-method=normal: root@localhost with an empty password (no unix_socket
    # plugin), so the fixture can connect as root to create the real test user below.
    subprocess.run(
        [install_db, "--no-defaults", "--auth-root-authentication-method=normal", f"--datadir={datadir}",
         "--user=root", "--skip-test-db", "--skip-name-resolve"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
    )
    proc = ManagedProcess(
        "mariadbd",
        [mariadbd, "--no-defaults", f"--datadir={datadir}", f"--port={port}", f"--socket={sock}",
         "--bind-address=127.0.0.1", "--user=root", f"--pid-file={workdir / 'mysqld.pid'}",
         "--skip-name-resolve", "--skip-log-bin", "--innodb-buffer-pool-size=32M",
         "--innodb-use-native-aio=0", "--max-connections=200",
         # Durability rarely matters for a throwaway test server; speed does.
         *([] if durable else ["--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0"])],
        workdir, ready=lambda: _root_can_connect(sock), timeout=30,
    ).start()
    try:
        conn = pymysql.connect(unix_socket=sock, user="root", password="", autocommit=True)
        with conn, conn.cursor() as cur:
            for host in ("127.0.0.1", "localhost"):
                cur.execute("CREATE USER %s@%s IDENTIFIED BY %s", (TEST_USER, host, TEST_PASSWORD))
                cur.execute(f"GRANT ALL PRIVILEGES ON *.* TO '{TEST_USER}'@'{host}'")
        db = MariaDB("127.0.0.1", port, sock, TEST_USER, TEST_PASSWORD, DEFAULT_DATABASE, proc)
        db.create_database(DEFAULT_DATABASE)
        return db
    except BaseException:
        proc.stop()
        raise


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDB]:
    workdir = Path(tempfile.mkdtemp(prefix="obdconv-mariadb-"))
    server = None
    try:
        server = start_mariadb(workdir)
        yield server
    finally:
        if server is not None:
            server.process.stop()
        shutil.rmtree(workdir, ignore_errors=True)
