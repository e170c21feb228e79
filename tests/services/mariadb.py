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

from tests.services.base import LOCAL, ManagedProcess, Place, ServiceError, free_port

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
    place: Place = LOCAL

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
        if self.place is not LOCAL:
            raise ServiceError("the test process does not dial a netns host: use .sql(), run on its place")
        return pymysql.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                               database=database, autocommit=True, connect_timeout=5)

    def sql(self, statement: str, database: str = "") -> list[list[str]]:
        """Rows of `statement` run as the test user by the `mariadb` client at the server's place."""
        argv = ["mariadb", "-h", self.host, "-P", str(self.port), "-u", self.user, "-N", "-B", "-e", statement]
        out = self.place.run([*argv, *([database] if database else [])], env={"MYSQL_PWD": self.password})
        return [line.split("\t") for line in out.stdout.decode().splitlines()]

    def create_database(self, name: str) -> str:
        """Create (or recreate empty) database `name`; returns the name."""
        if self.place is not LOCAL:
            self.sql(f"DROP DATABASE IF EXISTS `{name}`; CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
            self.created.append(name)
            return name
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        self.created.append(name)
        return name


def _root_can_connect(sock: str) -> bool:
    pymysql.connect(unix_socket=sock, user="root", password="", connect_timeout=1).close()
    return True


def start_mariadb(workdir: Path, durable: bool = False, place: Place = LOCAL, data_dir: str = "") -> MariaDB:
    """Initialise a datadir, start mariadbd on a free loopback port, create the test user.
    `durable=False` trades crash safety for speed; tests that SIGKILL the server and expect committed
    rows to survive pass `durable=True`. `place`: another host (tests/services/netns.py), with its
    files in `data_dir` there; the test user may then connect from any address of its network."""
    if place is not LOCAL:
        return _start_at(place, workdir, data_dir or "/var/lib/mysql-test", durable)
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
        [install_db, *_INSTALL_FLAGS, f"--datadir={datadir}"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
    )
    proc = ManagedProcess(
        "mariadbd",
        [mariadbd, *_server_flags(datadir, port, sock, "127.0.0.1", durable)],
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


_INSTALL_FLAGS = ["--no-defaults", "--auth-root-authentication-method=normal", "--user=root", "--skip-test-db",
                  "--skip-name-resolve"]


def _server_flags(datadir: Path | str, port: int, sock: str, bind: str, durable: bool) -> list[str]:
    return [
        "--no-defaults", f"--datadir={datadir}", f"--port={port}", f"--socket={sock}",
        f"--bind-address={bind}", "--user=root", f"--pid-file={Path(datadir).parent / 'mysqld.pid'}",
        "--skip-name-resolve", "--skip-log-bin", "--innodb-buffer-pool-size=32M",
        "--innodb-use-native-aio=0", "--max-connections=200",
        # Durability rarely matters for a throwaway test server; speed does.
        *([] if durable else ["--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0"])]


def _start_at(place: Place, workdir: Path, data_dir: str, durable: bool) -> MariaDB:
    datadir, sock, port = f"{data_dir}/data", f"{data_dir}/mysqld.sock", 3306
    place.run(["mkdir", "-p", data_dir])
    place.run(["mariadb-install-db", *_INSTALL_FLAGS, f"--datadir={datadir}"], timeout=60)

    def ready() -> bool:
        return place.run(["mariadb-admin", f"--socket={sock}", "-uroot", "ping"], check=False).returncode == 0

    mariadbd = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
    proc = ManagedProcess("mariadbd", place.command([mariadbd, *_server_flags(datadir, port, sock, place.address,
                                                                                durable)]),
                          workdir, ready=ready, timeout=60).start()
    try:
        users = (f"CREATE USER '{TEST_USER}'@'%' IDENTIFIED BY '{TEST_PASSWORD}'; "
                 f"GRANT ALL PRIVILEGES ON *.* TO '{TEST_USER}'@'%'")
        place.run(["mariadb", f"--socket={sock}", "-uroot", "-e", users])
        db = MariaDB(place.address, port, sock, TEST_USER, TEST_PASSWORD, DEFAULT_DATABASE, proc, place=place)
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
